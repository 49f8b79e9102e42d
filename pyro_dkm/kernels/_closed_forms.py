r"""The pure closed forms of the NNGP/NTK activations: Gaussian expectations
:math:`E[\phi(u)\phi(v)]` and :math:`E[\phi'(u)\phi'(v)]` for :math:`(u, v) \sim \mathcal
N(0, K)`, elementwise in (cross covariance, the two variances). Re-exported by
:mod:`pyro_dkm.kernels.nngp`; the fused and blocked forms (:mod:`._fused`,
:mod:`._blocked`) repeat their floating-point operations.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def clamp_eps(dtype: torch.dtype) -> float:
    """Margin keeping arccos/arcsin arguments inside (-1, 1), where their
    derivatives are finite."""
    return 1e-12 if dtype == torch.float64 else 1e-6


def relu_expectations(k12: Tensor, k11: Tensor, k22: Tensor) -> tuple[Tensor, Tensor]:
    r"""ReLU (arc-cosine, order 1) Gaussian expectations for :math:`(u,v)\sim\mathcal N(0,K)`.

    .. math::
        E[\mathrm{relu}(u)\mathrm{relu}(v)] = \frac{1}{2\pi}
            \left(s + (\pi-\theta)\,k_{12}\right),\qquad
        E[\mathrm{relu}'(u)\mathrm{relu}'(v)] = \frac{\pi-\theta}{2\pi},

    with :math:`s = \sqrt{k_{11}k_{22} - k_{12}^2}` and
    :math:`\theta = \operatorname{atan2}(s, k_{12}) = \arccos(k_{12}/\sqrt{k_{11}k_{22}})`.

    The atan2 form avoids :math:`\arccos` of a clamped cosine (whose derivative
    is infinite at 1). ``s^2`` is floored at its rounding level
    :math:`\epsilon k_{11}k_{22}`, so gradients stay finite and equal their limits
    at coincident points (:math:`\partial/\partial k_{12} = (\pi-\theta)/2\pi`),
    at a cost of at most :math:`\sqrt{\epsilon}/2\pi` relative error for
    duplicated inputs (the exact diagonal of ``K(X, X)`` is filled in separately).
    Shapes broadcast. Returns ``(cov, dot)``.
    """
    prod = k11 * k22
    # s^2 = k11 k22 - k12^2 carries a rounding error of ~eps * k11 k22; below that
    # level it is noise, so floor it there (a zero gradient instead of a huge noisy one).
    floor = (prod * torch.finfo(k12.dtype).eps).clamp_min(torch.finfo(k12.dtype).tiny)
    s = torch.maximum(prod - k12 * k12, floor).sqrt()
    dot = (math.pi - torch.atan2(s, k12)) / (2 * math.pi)  # (pi - theta) / 2pi
    cov = s / (2 * math.pi) + dot * k12
    return cov, dot


def relu_diag(k: Tensor) -> tuple[Tensor, Tensor]:
    """Diagonal of :func:`relu_expectations` (u = v): ``(k / 2, 1 / 2)``."""
    return 0.5 * k, torch.full_like(k, 0.5)


def erf_expectations(k12: Tensor, k11: Tensor, k22: Tensor, *, eps: float | None = None
                     ) -> tuple[Tensor, Tensor]:
    r"""Erf Gaussian expectations (Williams 1997) for :math:`(u,v)\sim\mathcal N(0,K)`.

    .. math::
        E[\mathrm{erf}(u)\mathrm{erf}(v)] = \frac{2}{\pi}\arcsin
            \frac{2k_{12}}{\sqrt{(1+2k_{11})(1+2k_{22})}},\qquad
        E[\mathrm{erf}'(u)\mathrm{erf}'(v)] = \frac{4}{\pi}
            \left[(1+2k_{11})(1+2k_{22}) - 4k_{12}^2\right]^{-1/2}.

    The arcsin argument is clamped to :math:`\pm(1 - \epsilon)`, ``eps`` (default
    :func:`clamp_eps` of the dtype). Returns ``(cov, dot)``.
    """
    eps = clamp_eps(k12.dtype) if eps is None else eps
    a = (1 + 2 * k11) * (1 + 2 * k22)
    s = (2 * k12 / a.sqrt()).clamp(-1 + eps, 1 - eps)
    cov = (2 / math.pi) * torch.asin(s)
    # a - 4 k12^2 = a (1 - s^2) >= a * eps > 0
    dot = (4 / math.pi) / (a * (1 - s * s)).sqrt()
    return cov, dot


def erf_diag(k: Tensor) -> tuple[Tensor, Tensor]:
    """Diagonal of :func:`erf_expectations`."""
    cov = (2 / math.pi) * torch.asin(2 * k / (1 + 2 * k))
    dot = (4 / math.pi) / (1 + 4 * k).sqrt()
    return cov, dot
