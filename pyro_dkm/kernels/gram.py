r"""Kernels as functions of Gram matrices: the layer maps :math:`K(G)` of deep
kernel machines.

A Gram kernel computes :math:`K_{ij} = k(G_{ij}, G_{ii}, G_{jj})` elementwise, so
it applies both to a full Gram (``P x P``) and to the inducing-point form used
by sparse DKMs::

    k = ReluGram()
    K = k(G)                                  # (..., P, P) -> (..., P, P)
    K_ii, K_ti, k_t = k.blocks(G_ii, G_ti, g_t)
    #   (..., Pi, Pi), (..., Pt, Pi), (..., Pt) -> same shapes

where ``G_ti`` is the cross block between ``Pt`` train/test points and ``Pi``
inducing points and ``g_t`` the train/test diagonal.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import Tensor

from ..linalg import check_tensor
from ._fused import arccos_cov
from .nngp import _as_variance, erf_diag, erf_expectations, relu_diag

__all__ = [
    "arccos_cov",
    "GramKernel",
    "ReluGram",
    "ErfGram",
    "SqExpGram",
    "NormalisedGaussianGram",
    "SumGram",
    "check_gram_blocks",
]


def _check_gram(G: Tensor, name: str) -> None:
    check_tensor(G, name, min_ndim=2)
    if G.shape[-1] != G.shape[-2]:
        raise ValueError(f"{name} must be square (..., P, P), got shape {tuple(G.shape)}")


def check_gram_blocks(G_ii: Tensor, G_ti: Tensor, g_t: Tensor) -> None:
    """Validate the (inducing, cross, diagonal) Gram blocks' shapes and values."""
    _check_gram(G_ii, "G_ii")
    check_tensor(G_ti, "G_ti", min_ndim=2)
    check_tensor(g_t, "g_t", min_ndim=1)
    if G_ti.shape[-1] != G_ii.shape[-1]:
        raise ValueError(f"G_ti must have {G_ii.shape[-1]} columns (one per inducing point, "
                         f"like G_ii), got shape {tuple(G_ti.shape)}")
    if g_t.shape[-1] != G_ti.shape[-2]:
        raise ValueError(f"g_t must have one entry per row of G_ti ({G_ti.shape[-2]}), got "
                         f"shape {tuple(g_t.shape)}")


class GramKernel:
    """Base class: subclasses implement ``cross(G12, g1, g2)`` and ``diag(g)``."""

    def cross(self, G12: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
        """Elementwise kernel from cross Gram ``G12`` and the two diagonals
        (already broadcast to ``G12``'s shape)."""
        raise NotImplementedError

    def diag(self, g: Tensor) -> Tensor:
        """Kernel at coincident points, from the Gram diagonal ``g``."""
        raise NotImplementedError

    def __call__(self, G: Tensor) -> Tensor:
        """Full form: ``(..., P, P) -> (..., P, P)``."""
        _check_gram(G, "G")
        g = G.diagonal(dim1=-2, dim2=-1)
        K = self.cross(G, g[..., :, None], g[..., None, :])
        # exact values on the diagonal (no clamping error there)
        return K.diagonal_scatter(self.diag(g), dim1=-2, dim2=-1)

    full = __call__

    def blocks(self, G_ii: Tensor, G_ti: Tensor, g_t: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Inducing form: ``(G_ii, G_ti, g_t) -> (K_ii, K_ti, k_t)``."""
        check_gram_blocks(G_ii, G_ti, g_t)
        K_ii = self(G_ii)
        g_i = G_ii.diagonal(dim1=-2, dim2=-1)
        K_ti = self.cross(G_ti, g_t[..., :, None], g_i[..., None, :])
        return K_ii, K_ti, self.diag(g_t)

    def __add__(self, other: "GramKernel") -> "SumGram":
        return SumGram([self, other])

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ReluGram(GramKernel):
    r"""Arc-cosine kernel: :math:`K_{ij} = E[\mathrm{relu}(f_i)\mathrm{relu}(f_j)]`,
    :math:`f\sim\mathcal N(0, G)`, times ``variance`` (default 2, which keeps the
    diagonal of :math:`K` equal to that of :math:`G`, as He initialisation does)."""

    def __init__(self, variance=2.0):
        self.variance = _as_variance(variance, "variance", allow_zero=False)

    def cross(self, G12, g1, g2):
        return self.variance * arccos_cov(G12, g1, g2)

    def diag(self, g):
        return self.variance * relu_diag(g)[0]


class ErfGram(GramKernel):
    r""":math:`K_{ij} = E[\mathrm{erf}(f_i)\mathrm{erf}(f_j)]`, :math:`f\sim\mathcal N(0, G)`,
    times ``variance``."""

    def __init__(self, variance=1.0):
        self.variance = _as_variance(variance, "variance", allow_zero=False)

    def cross(self, G12, g1, g2):
        return self.variance * erf_expectations(G12, g1, g2)[0]

    def diag(self, g):
        return self.variance * erf_diag(g)[0]


class SqExpGram(GramKernel):
    r"""Squared exponential in feature space from the Gram alone:
    :math:`K_{ij} = \sigma^2 \exp(-R_{ij}/\ell^2)`,
    :math:`R_{ij} = g_i/2 + g_j/2 - G_{ij}` (half the squared feature distance
    :math:`\|f_i - f_j\|^2 / (2N)`, clamped at 0)."""

    def __init__(self, lengthscale=1.0, variance=1.0):
        self.lengthscale = _as_variance(lengthscale, "lengthscale", allow_zero=False)
        self.variance = _as_variance(variance, "variance", allow_zero=False)

    def cross(self, G12, g1, g2):
        R = (0.5 * g1 + 0.5 * g2 - G12).clamp_min(0)
        return self.variance * torch.exp(-R / self.lengthscale**2)

    def diag(self, g):
        return self.variance * torch.ones_like(g)


class NormalisedGaussianGram(GramKernel):
    r"""Squared exponential on unit-normalised features:
    :math:`K_{ij} = \sigma^2\exp(-(1 - C_{ij})/\ell^2)`,
    :math:`C_{ij} = G_{ij}/\sqrt{g_i g_j}` (the feature cosine). Invariant to the
    scale of each point's features, so deep stacks do not drift in magnitude."""

    def __init__(self, lengthscale=1.0, variance=1.0):
        self.lengthscale = _as_variance(lengthscale, "lengthscale", allow_zero=False)
        self.variance = _as_variance(variance, "variance", allow_zero=False)

    def cross(self, G12, g1, g2):
        norm = (g1 * g2).clamp_min(torch.finfo(G12.dtype).tiny).sqrt()
        C = (G12 / norm).clamp(-1, 1)
        return self.variance * torch.exp(-(1 - C) / self.lengthscale**2)

    def diag(self, g):
        return self.variance * torch.ones_like(g)


class SumGram(GramKernel):
    r"""Weighted sum :math:`\sum_k w_k K_k(G)` (weights default to 1)."""

    def __init__(self, kernels: Sequence[GramKernel], weights: Sequence | None = None):
        kernels = list(kernels)
        if not kernels:
            raise ValueError("kernels must hold at least one GramKernel")
        for i, k in enumerate(kernels):
            if not isinstance(k, GramKernel):
                raise TypeError(f"kernels[{i}] must be a GramKernel, got {type(k).__name__}")
        if weights is None:
            weights = [1.0] * len(kernels)
        if len(weights) != len(kernels):
            raise ValueError(f"weights must have one entry per kernel ({len(kernels)}), got "
                             f"{len(weights)}")
        self.kernels = kernels
        self.weights = [_as_variance(w, f"weights[{i}]", allow_zero=True)
                        for i, w in enumerate(weights)]

    def cross(self, G12, g1, g2):
        return sum(w * k.cross(G12, g1, g2) for w, k in zip(self.weights, self.kernels))

    def diag(self, g):
        return sum(w * k.diag(g) for w, k in zip(self.weights, self.kernels))

    def __repr__(self) -> str:
        terms = " + ".join(f"{w}*{k!r}" for w, k in zip(self.weights, self.kernels))
        return f"SumGram({terms})"

