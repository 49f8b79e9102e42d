"""State-space (SDE) forms of Matern Gaussian processes and their discretisation.

A Matern GP with smoothness :math:`\\nu = p + 1/2` (p = 0, 1, 2) is the first
component of a d = p + 1 dimensional linear time-invariant SDE
:math:`dx = F x\\,dt + L\\,dW`, :math:`f = H x`, with white-noise spectral
density :math:`Q_c` and stationary covariance :math:`P_\\infty`
(Hartikainen & Sarkka 2010). Between two inputs dt apart the exact discrete
transition is :math:`x_{t+dt} = A x_t + q`, :math:`A = e^{F dt}`,
:math:`q \\sim N(0, Q)`, :math:`Q = \\int_0^{dt} e^{Fs} L Q_c L^T e^{F^T s} ds
= P_\\infty - A P_\\infty A^T`.

Numerical notes (see docs/tucker.md):

* Matrices here act on column vectors (``x_t = A @ x_{t-1}``), unlike
  ``pyro.ops.ssm_gp.MaternKernel`` whose transition matrices act on row vectors.
* ``A`` comes from ``torch.linalg.matrix_exp`` so ``dt = 0`` gives exactly the
  identity (``pyro.ops.ssm_gp`` divides by dt for nu = 5/2 and returns NaN).
* The subtraction ``P_inf - A P_inf A^T`` cancels catastrophically for small
  ``lambda * dt`` (its smallest eigenvalue is O((lambda dt)^(2d-1))) and loses
  positive-definiteness. For ``lambda * dt <= 2`` we compute the integral with
  Gauss-Legendre quadrature instead, a positively weighted sum of rank-one
  terms that is PSD by construction and accurate to machine precision; the
  subtraction is used only where it is well conditioned. ``dt = 0`` gives
  ``Q = 0`` exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..linalg import check_positive

__all__ = ["MaternSSM", "matern_ssm", "matern_kernel", "discretise", "SUPPORTED_NU"]

SUPPORTED_NU = (0.5, 1.5, 2.5)

_GL_NODES = 16
_QUAD_MAX_LAMBDA_DT = 2.0


def _check_nu(nu) -> float:
    try:
        nu = float(nu)
    except (TypeError, ValueError):
        raise TypeError(f"nu must be one of {SUPPORTED_NU}, got {nu!r}") from None
    if nu not in SUPPORTED_NU:
        raise ValueError(f"nu must be one of {SUPPORTED_NU} (Matern 1/2, 3/2, 5/2), got {nu}")
    return nu


def _as_positive(x, name: str, dtype, device) -> Tensor:
    if isinstance(x, bool):
        raise TypeError(f"{name} must be a positive float, got bool")
    return check_positive(torch.as_tensor(x, dtype=dtype, device=device), name)


@dataclass
class MaternSSM:
    """State-space matrices of a (batch of) Matern GP(s).

    Shapes: ``F`` (..., d, d), ``L`` (..., d, 1), ``Qc`` (...,), ``H`` (1, d),
    ``P_inf`` (..., d, d), ``lam`` (...,) the rate sqrt(2 nu) / lengthscale.
    """

    nu: float
    F: Tensor
    L: Tensor
    Qc: Tensor
    H: Tensor
    P_inf: Tensor
    lam: Tensor

    @property
    def state_dim(self) -> int:
        return self.F.shape[-1]


def matern_ssm(nu, lengthscale, variance=1.0, *, dtype=torch.float64, device=None) -> MaternSSM:
    """State-space form (F, L, Qc, H, P_inf) of a Matern-nu kernel.

    ``lengthscale`` and ``variance`` may be floats or tensors of a common batch
    shape (e.g. one per latent factor); the matrices get that batch shape.
    """
    nu = _check_nu(nu)
    ell = _as_positive(lengthscale, "lengthscale", dtype, device)
    var = _as_positive(variance, "variance", dtype, device)
    ell, var = torch.broadcast_tensors(ell, var)
    lam = math.sqrt(2.0 * nu) / ell
    d = int(nu + 0.5)
    batch = ell.shape
    F = torch.zeros(*batch, d, d, dtype=dtype, device=ell.device)
    P = torch.zeros_like(F)
    if d == 1:
        F[..., 0, 0] = -lam
        Qc = 2.0 * lam * var
        P[..., 0, 0] = var
    elif d == 2:
        F[..., 0, 1] = 1.0
        F[..., 1, 0] = -(lam**2)
        F[..., 1, 1] = -2.0 * lam
        Qc = 4.0 * lam**3 * var
        P[..., 0, 0] = var
        P[..., 1, 1] = lam**2 * var
    else:
        F[..., 0, 1] = 1.0
        F[..., 1, 2] = 1.0
        F[..., 2, 0] = -(lam**3)
        F[..., 2, 1] = -3.0 * lam**2
        F[..., 2, 2] = -3.0 * lam
        Qc = 16.0 / 3.0 * var * lam**5
        kappa = var * lam**2 / 3.0
        P[..., 0, 0] = var
        P[..., 1, 1] = kappa
        P[..., 0, 2] = -kappa
        P[..., 2, 0] = -kappa
        P[..., 2, 2] = var * lam**4
    L = torch.zeros(*batch, d, 1, dtype=dtype, device=ell.device)
    L[..., -1, 0] = 1.0
    H = torch.zeros(1, d, dtype=dtype, device=ell.device)
    H[0, 0] = 1.0
    return MaternSSM(nu, F, L, Qc, H, P, lam)


def matern_kernel(nu, lengthscale, variance, r: Tensor) -> Tensor:
    """Closed-form Matern-nu covariance at distance ``r`` (for tests and dense baselines)."""
    nu = _check_nu(nu)
    r = r.abs()
    z = math.sqrt(2.0 * nu) * r / lengthscale
    if nu == 0.5:
        poly = torch.ones_like(z)
    elif nu == 1.5:
        poly = 1.0 + z
    else:
        poly = 1.0 + z + z**2 / 3.0
    return variance * poly * torch.exp(-z)


def discretise(ssm: MaternSSM, dt: Tensor) -> tuple[Tensor, Tensor]:
    """Exact discrete transition ``A = expm(F dt)`` and process noise ``Q``.

    :param ssm: state-space form with batch shape ``B`` (possibly empty).
    :param dt: (..., T) non-negative gaps; must broadcast as ``B + (T,)``.
    :returns: ``A``, ``Q`` of shape ``broadcast(B, dt.shape[:-1]) + (T, d, d)``.
    """
    if not torch.is_tensor(dt):
        raise TypeError("dt must be a tensor")
    if not torch.isfinite(dt).all() or (dt < 0).any():
        raise ValueError("dt must be finite and >= 0 (sort the coordinates first)")
    dt = dt.to(ssm.F.dtype)
    F = ssm.F.unsqueeze(-3)  # (..., 1, d, d)
    A = torch.linalg.matrix_exp(F * dt[..., None, None])  # (..., T, d, d)
    P = ssm.P_inf.unsqueeze(-3)
    Q_sub = P - A @ P @ A.transpose(-1, -2)
    # Gauss-Legendre quadrature of int_0^dt g(s) g(s)^T Qc ds with g(s) = expm(F s) L
    x, w = _gauss_legendre(_GL_NODES, dt.dtype, dt.device)
    s = 0.5 * dt[..., None] * (x + 1.0)  # (..., T, n)
    E = torch.linalg.matrix_exp(ssm.F[..., None, None, :, :] * s[..., None, None])
    g = E[..., :, -1]  # (..., T, n, d): expm(F s) L with L = e_d
    wq = (0.5 * dt[..., None] * w) * ssm.Qc[..., None, None]  # (..., T, n)
    Q_quad = torch.einsum("...nd,...n,...ne->...de", g, wq, g)
    use_quad = (ssm.lam[..., None] * dt <= _QUAD_MAX_LAMBDA_DT)[..., None, None]
    Q = torch.where(use_quad, Q_quad, Q_sub)
    Q = 0.5 * (Q + Q.transpose(-1, -2))
    return A, Q


_GL_CACHE: dict = {}


def _gauss_legendre(n: int, dtype, device) -> tuple[Tensor, Tensor]:
    key = (n, dtype, device)
    if key not in _GL_CACHE:
        import numpy as np

        x, w = np.polynomial.legendre.leggauss(n)
        _GL_CACHE[key] = (
            torch.as_tensor(x, dtype=dtype, device=device),
            torch.as_tensor(w, dtype=dtype, device=device),
        )
    return _GL_CACHE[key]
