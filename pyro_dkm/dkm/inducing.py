"""Choosing the inducing inputs of a sparse DKM."""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import check_tensor

__all__ = ["select_inducing_points"]


def select_inducing_points(X: Tensor, num_inducing: int, *, method: str = "kmeans",
                           seed: int = 0, iters: int = 25) -> Tensor:
    """Pick ``num_inducing`` inducing inputs from ``X`` ``(N, d)``: a random subset
    (``method="random"``) or k-means centres started from one (``"kmeans"``, default)."""
    check_tensor(X, "X", ndim=2)
    N = X.shape[0]
    if not isinstance(num_inducing, int) or num_inducing < 1:
        raise ValueError(f"num_inducing must be a positive int, got {num_inducing!r}")
    if num_inducing > N:
        raise ValueError(f"num_inducing ({num_inducing}) cannot exceed the number of rows of X "
                         f"({N})")
    if method not in ("kmeans", "random"):
        raise ValueError(f"method must be 'kmeans' or 'random', got {method!r}")
    g = torch.Generator().manual_seed(seed)
    Z = X[torch.randperm(N, generator=g)[:num_inducing]].clone()
    if method == "random":
        return Z
    for _ in range(iters):
        assign = torch.cdist(X, Z).argmin(1)
        counts = torch.bincount(assign, minlength=num_inducing).to(X.dtype)
        sums = torch.zeros_like(Z).index_add_(0, assign, X)
        keep = counts > 0  # empty clusters keep their centre
        Z[keep] = sums[keep] / counts[keep, None]
    return Z
