r"""The predictive of Student-t noise models (:mod:`pyro_dkm.processes.robust`): a latent
Gaussian or Student-t plus Student-t noise, a 1-D scale mixture over the new observation's
noise scale, with exact tails by adaptive quadrature (:func:`log_integral`)."""

from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import InverseGamma, Normal, StudentT, constraints

from ..linalg import check_tensor
from .regression import _pos
from .scale_mixture import _active_range, _gauss_legendre

__all__ = ["StudentTNoisePredictive", "log_integral"]

_EMPTY = torch.Size()


def _check_positive(name, v) -> float:
    return float(_pos(v, name))


def log_integral(g: Callable[[Tensor], Tensor], lo: float, hi: float, batch_shape, *,
                 dtype=torch.float64, device=None, order: int = 16, panels: int = 8,
                 tail: float = 45.0, stages: int = 4) -> Tensor:
    r""":math:`\log\int_{lo}^{hi} e^{g(t)} dt` for a unimodal ``g`` batched over
    ``batch_shape`` (``g`` maps ``(..., G)`` to ``(..., G)``): a 1401-point grid, then
    ``stages`` 257-point grids, each on the region where ``g > max g - tail`` of the
    previous one (so peaks of any width down to ~1e-9 (hi - lo) are resolved), then
    composite Gauss-Legendre (``panels * order`` nodes) on the final region."""
    with torch.no_grad():
        t = torch.linspace(lo, hi, 1401, dtype=dtype, device=device).expand(
            tuple(batch_shape) + (1401,))
        for _ in range(stages + 1):
            lo_t, hi_t, _ = _active_range(t, torch.nan_to_num(g(t), nan=-math.inf), tail)
            u = torch.linspace(0.0, 1.0, 257, dtype=dtype, device=device)
            t = lo_t.unsqueeze(-1) + (hi_t - lo_t).unsqueeze(-1) * u
    x, w = _gauss_legendre(order, panels, dtype, device)
    width = (hi_t - lo_t).unsqueeze(-1)
    t = lo_t.unsqueeze(-1) + width * x
    return torch.logsumexp(g(t) + (w * width).log(), -1)


class StudentTNoisePredictive(TorchDistribution):
    r"""Latent Gaussian (or Student-t) plus Student-t noise, a scale mixture over the
    new observation's noise scale ``lam``:

    .. math:: p(y) = \int \mathcal D\big(y \mid \mu,\ c(v + \sigma^2\lambda)\big)\,
              \mathrm{InvGamma}(\lambda \mid \tfrac\nu2, \tfrac\nu2)\, d\lambda,

    ``D`` a Normal (``latent_df=None``) or a Student-t with ``latent_df`` dof.
    ``log_prob`` integrates over ``t = log lam`` by adaptive Gauss-Legendre quadrature per
    value (:func:`log_integral`; the integrand's peak moves to ``lam ~ (y - mu)^2 /
    sigma^2`` for outlying ``y``, so the tails are exact too); ``sample`` draws ``lam``
    then ``y``; ``mean`` ``mu`` (``nan`` unless ``nu > 1``; the centre ``mu`` is
    always ``loc``, the point prediction to use) and ``variance``
    ``c (v + sigma^2 nu/(nu-2))`` (times ``latent_df/(latent_df-2)``; ``inf`` unless
    ``nu > 2``) are exact.

    Args:
        loc, latent_var: mean ``mu`` and variance ``v`` of the latent, broadcasting to the
            batch shape.
        noise: ``sigma^2 > 0``; df: ``nu > 0`` (floats).
        latent_df, latent_scale: Student-t latent (``df``), the scale ``c`` (default 1).
        order, panels: Gauss-Legendre size.
    """

    arg_constraints = {}
    support = constraints.real
    has_rsample = False

    def __init__(self, loc: Tensor, latent_var: Tensor, noise: float, df: float, *,
                 latent_df: float | None = None, latent_scale: float = 1.0, order: int = 16,
                 panels: int = 8, validate_args=None):
        check_tensor(loc, "loc")
        check_tensor(latent_var, "latent_var")
        self.noise, self.df = _check_positive("noise", noise), _check_positive("df", df)
        self.latent_scale = _check_positive("latent_scale", latent_scale)
        self.latent_df = None if latent_df is None else _check_positive("latent_df", latent_df)
        if bool((latent_var < 0).any()):
            raise ValueError("latent_var must be non-negative")
        self.loc, self.latent_var = torch.broadcast_tensors(loc, latent_var)
        self.order, self.panels = order, panels
        super().__init__(self.loc.shape, torch.Size(), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StudentTNoisePredictive, _instance)
        batch_shape = torch.Size(batch_shape)
        new.loc, new.latent_var = self.loc.expand(batch_shape), self.latent_var.expand(batch_shape)
        for k in ("noise", "df", "latent_scale", "latent_df", "order", "panels"):
            setattr(new, k, getattr(self, k))
        super(StudentTNoisePredictive, new).__init__(batch_shape, torch.Size(),
                                                     validate_args=False)
        new._validate_args = self._validate_args
        return new

    def _component(self, lam: Tensor, loc: Tensor, var: Tensor):
        sd = (self.latent_scale * (var + self.noise * lam)).clamp_min(
            torch.finfo(lam.dtype).tiny).sqrt()
        if self.latent_df is None:
            return Normal(loc, sd, validate_args=False)
        return StudentT(self.latent_df, loc, sd, validate_args=False)

    def _noise_prior(self):
        half = torch.tensor(0.5 * self.df, dtype=self.loc.dtype, device=self.loc.device)
        return InverseGamma(half, half, validate_args=False)

    def _log_prior_t(self, t: Tensor) -> Tensor:
        r"""Log density of ``t = log lam``, ``lam ~ InvGamma(alpha, alpha)``, ``alpha = nu/2``:
        :math:`[\alpha\log\alpha - \alpha - \log\Gamma(\alpha)] - \alpha(e^{-t} - 1 + t)`,
        the constant by Stirling's series for large ``alpha`` (the direct form loses
        ``eps * alpha log alpha``)."""
        a = 0.5 * self.df
        if a >= 100:
            const = 0.5 * math.log(a / (2 * math.pi)) - 1 / (12 * a) + 1 / (360 * a**3)
        else:
            const = a * math.log(a) - a - math.lgamma(a)
        return const - a * (torch.expm1(-t) + t)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        value = torch.as_tensor(value, dtype=self.loc.dtype, device=self.loc.device)
        shape = torch.broadcast_shapes(value.shape, self.batch_shape)
        y, loc, var = (x.expand(shape).unsqueeze(-1) for x in (value, self.loc,
                                                               self.latent_var))
        def g(t):  # log integrand in t = log lam, (..., G)
            return self._component(t.exp(), loc, var).log_prob(y) + self._log_prior_t(t)

        hi = max(35.0, 10.0 + 120.0 / self.df)  # the prior's tail ~ lam^-(nu/2 + 1)
        return log_integral(g, -35.0, hi, shape, dtype=self.loc.dtype, device=self.loc.device,
                            order=self.order, panels=self.panels)

    def sample(self, sample_shape=_EMPTY):
        shape = self._extended_shape(sample_shape)
        with torch.no_grad():
            lam = self._noise_prior().sample(shape)
            return self._component(lam, self.loc.expand(shape),
                                   self.latent_var.expand(shape)).sample()

    @property
    def mean(self) -> Tensor:
        ok = self.df > 1 and (self.latent_df is None or self.latent_df > 1)
        return self.loc if ok else torch.full_like(self.loc, math.nan)

    @property
    def variance(self) -> Tensor:
        if self.df <= 2 or (self.latent_df is not None and self.latent_df <= 2):
            return torch.full_like(self.loc, math.inf)
        v = self.latent_scale * (self.latent_var + self.noise * self.df / (self.df - 2))
        if self.latent_df is not None:
            v = v * self.latent_df / (self.latent_df - 2)
        return v
