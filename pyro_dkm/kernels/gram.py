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

import math
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..linalg import check_tensor
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


class _ArcCosineCov(torch.autograd.Function):
    r"""Fused arc-cosine covariance with a hand-derived backward (see :func:`arccos_cov`)."""

    @staticmethod
    def forward(ctx, k12, k11, k22):
        prod = k11 * k22
        finfo = torch.finfo(k12.dtype)
        floor = (prod * finfo.eps).clamp_min(finfo.tiny)
        s2 = prod - k12 * k12
        floored = s2 < floor
        s = torch.where(floored, floor, s2).sqrt()
        pmt = torch.atan2(s, -k12)  # pi - theta, theta = atan2(s, k12) in [0, pi]
        ctx.save_for_backward(k12, k11, k22, s, pmt, floored, prod)
        return (s + pmt * k12) / (2 * math.pi)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        k12, k11, k22, s, pmt, floored, prod = ctx.saved_tensors
        # cov = (s + (pi - theta) k12) / 2pi with theta = atan2(s, k12); r = s^2 + k12^2:
        #   d cov / d s = s^2 / (2 pi r),  d cov / d k12 |_s = (pi - theta + k12 s / r) / 2pi.
        # Unfloored, s = sqrt(k11 k22 - k12^2): d cov / d k12 = (pi - theta) / 2pi and
        #   d cov / d k11 = s k22 / (4 pi r). Floored, s = sqrt(eps k11 k22) (no k12 term):
        #   d cov / d k12 = (pi - theta + k12 s / r) / 2pi, d cov / d k11 = eps s k22 / (4 pi r)
        #   (0 where the floor is the constant `tiny`).
        d12 = d11 = d22 = None
        need12, need11, need22 = ctx.needs_input_grad
        any_floored = bool(floored.any())
        if need11 or need22 or any_floored:
            r = s * s + k12 * k12
            s_over_r = s / r
        if need12:
            d12 = pmt
            if any_floored:
                d12 = d12 + torch.where(floored, k12 * s_over_r, 0.0)
            d12 = (grad * d12 / (2 * math.pi)).sum_to_size(k12.shape)
        if need11 or need22:
            finfo = torch.finfo(k12.dtype)
            c = s_over_r / (4 * math.pi)
            if any_floored:
                c_fl = torch.where(prod * finfo.eps > finfo.tiny, finfo.eps, 0.0)
                c = torch.where(floored, c * c_fl, c)
            gc = grad * c
            if need11:
                d11 = (gc * k22).sum_to_size(k11.shape)
            if need22:
                d22 = (gc * k11).sum_to_size(k22.shape)
        return d12, d11, d22


def arccos_cov(k12: Tensor, k11: Tensor, k22: Tensor) -> Tensor:
    r""":math:`E[\mathrm{relu}(u)\mathrm{relu}(v)]` for :math:`(u, v) \sim \mathcal N(0, K)`,
    :math:`\frac{1}{2\pi}(s + (\pi - \theta) k_{12})`, :math:`s = \sqrt{k_{11}k_{22} -
    k_{12}^2}`, :math:`\theta = \operatorname{atan2}(s, k_{12})`.

    Same values (and, where it is differentiable, the same gradients) as
    ``pyro_dkm.kernels.nngp.relu_expectations(k12, k11, k22)[0]``, including the floor
    :math:`s^2 \ge \epsilon k_{11}k_{22}`, but as one autograd node with a hand-derived
    backward (no ``atan2``/``sqrt`` recomputation; :math:`\partial/\partial k_{12} =
    (\pi - \theta)/2\pi`, :math:`\partial/\partial k_{11} = s/(4\pi k_{11})`), which
    is several times cheaper than differentiating the elementwise graph. ``k11`` and
    ``k22`` broadcast against ``k12`` (e.g. ``(T, 1)`` and ``(1, M)``). Differentiable
    once (a second derivative raises).
    """
    k11, k22 = torch.as_tensor(k11, dtype=k12.dtype), torch.as_tensor(k22, dtype=k12.dtype)
    return _ArcCosineCov.apply(k12, k11, k22)


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

