r"""One eigendecomposition, many models: fast type-II maximum likelihood for a fixed kernel.

For a fixed kernel matrix :math:`K = U\Lambda U^T` and :math:`z = U^T y`, every model of
:mod:`pyro_dkm.processes.regression` has an O(n) log marginal likelihood in its scale and
noise parameters: with :math:`v_i = \alpha\lambda_i + \sigma^2`,

* GP, :math:`y \sim \mathcal N(0, \alpha K + \sigma^2 I)`:
  :math:`-\tfrac12\sum_i [\log 2\pi v_i + z_i^2 / v_i]`;
* Student-t, :math:`y \sim \mathrm{MVT}(2a, 0, \tfrac ba (K + \sigma^2 I))`: closed form in
  :math:`q = \sum_i z_i^2 / v_i` and :math:`\log\det = \sum_i \log v_i` (``alpha = 1``);
* any scale prior, :math:`y \mid s \sim \mathcal N(0, s(\alpha K + \sigma^2 I))`:
  :math:`\log p(y \mid s) = -\tfrac n2 \log 2\pi s - \tfrac12 \log\det - \tfrac{q}{2s}`,
  O(1) per quadrature node once ``q`` and ``logdet`` are known.

So fitting (scale, noise, prior) parameters costs O(n) per step after one O(n^3)
factorisation, and a small grid over the kernel's own hyper-parameters (one
eigendecomposition each) replaces gradient steps through the kernel.
:func:`maximise_positive` runs L-BFGS over positive parameters in log space.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor

from ..linalg import check_tensor
from .student_t import student_t_log_marginal_from_quad

__all__ = ["SpectralProblem", "maximise_positive"]


class SpectralProblem:
    """Eigendecomposition of a fixed ``K`` ``(n, n)`` with targets ``y`` ``(n,)``."""

    def __init__(self, K: Tensor, y: Tensor):
        check_tensor(K, "K", ndim=2)
        check_tensor(y, "y", ndim=1)
        if K.shape != (y.shape[0], y.shape[0]):
            raise ValueError(f"K must be (n, n) with n = len(y) = {y.shape[0]}, got "
                             f"{tuple(K.shape)}")
        evals, self.U = torch.linalg.eigh(0.5 * (K + K.mT))
        top = float(evals.abs().max()) if len(evals) else 0.0
        if float(evals.min()) < -1e-6 * max(top, 1e-300):
            raise ValueError(f"K is not positive semi-definite: smallest eigenvalue "
                             f"{float(evals.min()):.3g} (largest {top:.3g})")
        self.evals = evals.clamp_min(0.0)
        self.z = self.U.mT @ y
        self.n = y.shape[0]

    def stats(self, amplitude, noise) -> tuple[Tensor, Tensor]:
        r""":math:`q = y^T C^{-1} y`, :math:`\log\det C`; :math:`C = \alpha K + \sigma^2 I`."""
        v = amplitude * self.evals + noise
        return (self.z.pow(2) / v).sum(), v.log().sum()

    def gp_log_marginal(self, amplitude, noise) -> Tensor:
        q, logdet = self.stats(amplitude, noise)
        return -0.5 * (q + logdet + self.n * math.log(2 * math.pi))

    def student_t_log_marginal(self, concentration, rate, noise) -> Tensor:
        q, logdet = self.stats(1.0, noise)
        a, b, n = concentration, rate, self.n
        return student_t_log_marginal_from_quad(q, logdet, n, a, b)

    def scale_log_likelihood(self, amplitude, noise) -> Callable[[Tensor], Tensor]:
        r""":math:`s \mapsto \log \mathcal N(y \mid 0, s(\alpha K + \sigma^2 I))`, O(1) per s."""
        q, logdet = self.stats(amplitude, noise)
        n = self.n

        def log_lik(s: Tensor) -> Tensor:
            return -0.5 * n * torch.log(2 * math.pi * s) - 0.5 * logdet - 0.5 * q / s

        return log_lik

    def conditional(self, K_star: Tensor, k_star_diag: Tensor, amplitude, noise
                    ) -> tuple[Tensor, Tensor]:
        r"""Gaussian conditional of :math:`\alpha f` at test points for
        :math:`C = \alpha K + \sigma^2 I`: mean :math:`\alpha K_*^T C^{-1} y` and latent
        variance :math:`\alpha k_{**} - \alpha^2 \operatorname{diag}(K_*^T C^{-1} K_*)`
        (add the noise yourself), both ``(m,)``. ``K_star`` is ``(n, m)``."""
        A = self.U.mT @ K_star  # (n, m)
        v = amplitude * self.evals + noise  # (n,)
        mean = amplitude * (A.mT @ (self.z / v))
        var = amplitude * k_star_diag - amplitude**2 * (A.pow(2).mT @ (1.0 / v))
        return mean, var.clamp_min(0.0)


def maximise_positive(objective: Callable[..., Tensor], init: dict, *, max_iter: int = 200,
                      bounds: dict | None = None) -> tuple[dict, float]:
    """Maximise ``objective(**params)`` over positive scalar parameters with L-BFGS on their
    logs. ``init``: ``{name: positive float}``; ``bounds``: optional ``{name: (lo, hi)}``
    (clamped in log space). Returns ``({name: float}, best objective)``."""
    bounds = bounds or {}
    for k, v in init.items():
        if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
            raise ValueError(f"init[{k!r}] must be a positive float, got {v!r}")
    names = list(init)
    x = torch.tensor([math.log(init[k]) for k in names], dtype=torch.float64,
                     requires_grad=True)
    lo = torch.tensor([math.log(bounds.get(k, (1e-12, 1e12))[0]) for k in names],
                      dtype=torch.float64)
    hi = torch.tensor([math.log(bounds.get(k, (1e-12, 1e12))[1]) for k in names],
                      dtype=torch.float64)

    def params(xv):
        xv = torch.maximum(torch.minimum(xv, hi), lo)
        return {k: xv[i].exp() for i, k in enumerate(names)}

    opt = torch.optim.LBFGS([x], lr=1.0, max_iter=max_iter, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-9, tolerance_change=1e-12)

    def closure():
        opt.zero_grad()
        loss = -objective(**params(x))
        if not torch.isfinite(loss):
            raise FloatingPointError(f"objective is not finite at {params(x.detach())}")
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        best = params(x.detach())
        value = float(objective(**best))
    return {k: float(v) for k, v in best.items()}, value
