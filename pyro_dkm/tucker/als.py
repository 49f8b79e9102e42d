"""Discrete Tucker / CP decomposition of a sparsely observed tensor by ridge ALS.

Indexes are categories: every index value of mode k has its own free factor row
``U_k[:, i]`` (no smoothness across coordinates). Alternating least squares with an
L2 penalty ``reg`` on the factor rows and on the core: each factor row solves an R_k x R_k
ridge system built from the entries that share that index (grouped statistics of
:mod:`pyro_dkm.tucker.moments`, linear in the number of entries), then the core solves a
P x P ridge system. Used as a baseline for FunBaT and to initialise its CEP fit.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import Tensor

from .moments import core_statistics, factor_statistics

__all__ = ["als_fit", "als_predict"]


def als_fit(
    idx: Sequence[Tensor],
    y: Tensor,
    ranks: Sequence[int],
    n_index: Sequence[int],
    *,
    reg: float = 0.1,
    n_iter: int = 30,
    core: str = "tucker",
    seed: int = 0,
    init_scale: float = 1.0,
) -> tuple[list[Tensor], Tensor]:
    """Ridge ALS on observed entries ``y[n]`` at integer indexes ``idx[k][n]``.

    :param idx: K long tensors (N,), entries' index per mode, in ``[0, n_index[k])``.
    :param y: (N,) float64 values.
    :param ranks: rank per mode (CP: equal ranks).
    :param reg: L2 penalty (>= 0) on factor rows and core entries.
    :returns: ``factors`` (K tensors (R_k, n_index[k])) and the flat core (Tucker: (P,),
        CP: (R,) diagonal). Index values without entries keep a zero row.
    """
    if reg < 0:
        raise ValueError(f"reg must be >= 0, got {reg}")
    if core not in ("tucker", "cp"):
        raise ValueError(f"core must be 'tucker' or 'cp', got {core!r}")
    ranks = list(ranks)
    K, cp = len(ranks), core == "cp"
    g = torch.Generator().manual_seed(seed)
    U = [init_scale * torch.randn(R, n, generator=g, dtype=y.dtype) for R, n in zip(ranks, n_index)]
    V = [torch.zeros_like(u) for u in U]
    P = ranks[0] if cp else math.prod(ranks)
    w = torch.ones(P, dtype=y.dtype) if cp else torch.randn(P, generator=g, dtype=y.dtype)
    for _ in range(n_iter):
        for k in range(K):
            Eaa, Eay = factor_statistics(U, V, idx, y, k, w, torch.outer(w, w), ranks, cp=cp)
            eye = torch.eye(ranks[k], dtype=y.dtype)
            U[k] = torch.linalg.solve(Eaa + reg * eye, Eay.unsqueeze(-1)).squeeze(-1).T
        S, h = core_statistics(U, V, idx, y, ranks, cp=cp)
        w = torch.linalg.solve(S + reg * torch.eye(P, dtype=y.dtype), h)
    return U, w


def als_predict(factors: Sequence[Tensor], core: Tensor, idx: Sequence[Tensor],
                *, cp: bool = False) -> Tensor:
    """Entries ``W x_1 U_1[:, i_1] ... x_K U_K[:, i_K]`` at integer indexes (each (M,))."""
    if cp:
        out = core[None, :]
        for Uk, ik in zip(factors, idx):
            out = out * Uk[:, ik].T
        return out.sum(-1)
    ranks = [Uk.shape[0] for Uk in factors]
    out = core.reshape(1, -1).expand(idx[0].shape[0], -1)
    # contract the last mode first: (M, R_1..R_k) . u^k -> (M, R_1..R_{k-1})
    for k in range(len(factors) - 1, -1, -1):
        lead = math.prod(ranks[:k])
        out = (out.reshape(-1, lead, ranks[k]) * factors[k][:, idx[k]].T[:, None, :]).sum(-1)
    return out.reshape(-1)
