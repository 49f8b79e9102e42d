r"""Scale mixtures of Gaussian processes with any positive scale prior.

:math:`s \sim p(s)`, :math:`f \mid s \sim \mathcal N(m, sK)` (Lee, Yun, Yang & Lee,
"Scale Mixtures of Neural Network Gaussian Processes", ICLR 2022). The posterior over
the scalar ``s`` given Gaussian observations is one-dimensional, and after one
factorisation of the kernel matrix every evaluation of :math:`\log p(y \mid s)` costs
O(1) (noise scaled with ``s``) or O(n) (noise not scaled). We therefore integrate over
:math:`t = \log s` by deterministic quadrature (:func:`scale_posterior_quadrature`,
composite Gauss-Legendre on an adaptively found range) instead of the paper's
importance sampling from the prior (:func:`scale_posterior_importance`, kept for
comparison).

Contents: :func:`check_scale_prior`, :class:`GaussianScaleLikelihood` (the O(1)/O(n) per-scale
likelihood and predictive), :class:`ScalePosterior`, and :class:`ScaleMixture` (the
prior over function values as a Pyro distribution).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from pyro.distributions import TorchDistribution
from torch import Tensor
from torch.distributions import Categorical, MixtureSameFamily, Normal, constraints

from ..linalg import check_tensor, cholesky, tril_solve
from .burr import BurrXII
from .student_t import _tril_from

_EMPTY = torch.Size()

__all__ = [
    "BurrXII",
    "check_scale_prior",
    "GaussianScaleLikelihood",
    "ScalePosterior",
    "scale_posterior_quadrature",
    "scale_posterior_importance",
    "ScaleMixture",
]


# --------------------------------------------------------------------------
# Scale priors
# --------------------------------------------------------------------------
def check_scale_prior(prior, name: str = "scale_prior"):
    """Check that ``prior`` is a univariate distribution with support in ``(0, inf)``.

    Raises ``TypeError`` for non-distributions and ``ValueError`` for an event shape
    other than ``()`` or a support that allows non-positive values (e.g. ``Normal``).
    Supports ``[0, inf)`` are accepted (``s = 0`` has probability 0).
    """
    if not isinstance(prior, torch.distributions.Distribution):
        raise TypeError(f"{name} must be a (Pyro/torch) distribution over the positive scale, "
                        f"got {type(prior).__name__}")
    if prior.event_shape != torch.Size():
        raise ValueError(f"{name} must be univariate (event_shape ()), got event_shape "
                         f"{tuple(prior.event_shape)}")
    support = prior.support
    lower = getattr(support, "lower_bound", None)
    ok = lower is not None and isinstance(
        support, (constraints.greater_than, constraints.greater_than_eq, constraints.interval,
                  constraints.half_open_interval))
    if ok:
        lower = torch.as_tensor(lower)
        ok = bool((lower >= 0).all())
    if not ok:
        raise ValueError(f"{name} must have positive support (a prior over the scale s > 0), "
                         f"got {type(prior).__name__} with support {support}")
    return prior


def _prior_log_prob(prior, s: Tensor) -> Tensor:
    """``log p(s)`` for ``s`` of shape ``(..., Q)`` (Q nodes last), aligning the prior's
    batch shape with ``(...)``; ``-inf`` outside the support."""
    pad = len(prior.batch_shape) - (s.dim() - 1)
    if pad > 0:
        s = s.reshape((1,) * pad + s.shape)
    s_q = s.movedim(-1, 0)  # (Q, ...)
    inside = prior.support.check(s_q)
    old = prior._validate_args
    prior._validate_args = False
    try:
        lp = prior.log_prob(s_q)
    finally:
        prior._validate_args = old
    lp = torch.where(inside & ~torch.isnan(lp), lp, torch.full_like(lp, -math.inf))
    return lp.movedim(0, -1)


# --------------------------------------------------------------------------
# Posterior over the scale
# --------------------------------------------------------------------------
@dataclass
class ScalePosterior:
    """A discrete representation of :math:`p(s \\mid y)`: nodes/samples ``scales``
    ``(..., Q)`` with normalised log weights ``log_weights`` ``(..., Q)``, and the
    estimate of :math:`\\log p(y)`, ``log_marginal`` ``(...)``."""

    scales: Tensor
    log_weights: Tensor
    log_marginal: Tensor
    method: str

    @property
    def weights(self) -> Tensor:
        return self.log_weights.exp()

    def mean(self) -> Tensor:
        """Posterior mean of ``s``."""
        return (self.weights * self.scales).sum(-1)

    def effective_sample_size(self) -> Tensor:
        """``1 / sum w_j^2`` (meaningful for importance sampling)."""
        return 1.0 / self.weights.pow(2).sum(-1)


def _gauss_legendre(order: int, panels: int, dtype, device) -> tuple[Tensor, Tensor]:
    """Composite Gauss-Legendre nodes/weights on [0, 1]."""
    x, w = np.polynomial.legendre.leggauss(order)
    x, w = (x + 1) / 2, w / 2  # on [0, 1]
    edges = np.arange(panels) / panels
    nodes = (edges[:, None] + x[None, :] / panels).ravel()
    weights = np.tile(w / panels, panels)
    return (torch.as_tensor(nodes, dtype=dtype, device=device),
            torch.as_tensor(weights, dtype=dtype, device=device))


def _active_range(t: Tensor, g: Tensor, tail: float) -> tuple[Tensor, Tensor, Tensor]:
    """``[lo, hi]`` of the grid ``t`` ``(..., G)`` where ``g > max g - tail``, widened by
    one grid cell each side; also whether that touched the grid's ends."""
    G = g.shape[-1]
    gmax = g.amax(-1, keepdim=True)
    if not bool(torch.isfinite(gmax).all()):
        raise ValueError("log p(y | s) + log p(s) is -inf or NaN at every scale on the search "
                         "grid; check the data, the kernel and the scale prior")
    mask = g > gmax - tail
    idx = torch.arange(G, device=g.device).expand(g.shape)
    first = torch.where(mask, idx, G).amin(-1)
    last = torch.where(mask, idx, -1).amax(-1)
    edge = (first == 0) | (last == G - 1)
    lo_i = (first - 1).clamp(0, G - 1)
    hi_i = (last + 1).clamp(0, G - 1)
    tb = t.expand(g.shape)
    lo = tb.gather(-1, lo_i.unsqueeze(-1)).squeeze(-1)
    hi = tb.gather(-1, hi_i.unsqueeze(-1)).squeeze(-1)
    return lo, hi, edge


def scale_posterior_quadrature(
    log_likelihood: Callable[[Tensor], Tensor],
    prior,
    *,
    order: int = 16,
    panels: int = 8,
    log_scale_range: tuple[float, float] = (-35.0, 35.0),
    grid_size: int = 701,
    tail: float = 45.0,
) -> ScalePosterior:
    r"""Posterior over the scale by deterministic quadrature in :math:`t = \log s`.

    The integrand :math:`g(t) = \log p(y \mid e^t) + \log p(e^t) + t` is evaluated on a
    coarse grid over ``log_scale_range``, then on a fine grid over the region where
    :math:`g > \max g - \text{tail}` (``e^{-45}`` of the peak: beyond rounding), and
    integrated there by composite Gauss-Legendre (``panels`` x ``order`` nodes).
    The node placement is found without gradients; ``log_marginal`` and the node
    weights are differentiable in whatever ``log_likelihood`` depends on.

    Args:
        log_likelihood: callable mapping scales ``(..., Q)`` (or ``(Q,)``, to be
            broadcast) to :math:`\log p(y \mid s)`, shape ``(..., Q)``.
        prior: the scale prior (checked by :func:`check_scale_prior`), batch shape
            broadcasting with ``(...)``.
    Returns:
        :class:`ScalePosterior` with ``panels * order`` nodes.
    """
    check_scale_prior(prior)
    if order < 1 or panels < 1:
        raise ValueError(f"order and panels must be >= 1, got {order}, {panels}")

    def g_of(t):
        s = t.exp()
        return log_likelihood(s) + _prior_log_prob(prior, s) + t

    with torch.no_grad():
        probe = log_likelihood(torch.ones(1, dtype=torch.float64))
        dtype, device = probe.dtype, probe.device
        t0 = torch.linspace(*log_scale_range, grid_size, dtype=dtype, device=device)
        g0 = torch.nan_to_num(g_of(t0), nan=-math.inf)
        lo, hi, edge = _active_range(t0, g0, tail)
        if bool(edge.any()):
            warnings.warn(f"the scale posterior has non-negligible mass at the end of the "
                          f"search range log s in {log_scale_range}; widen log_scale_range",
                          RuntimeWarning, stacklevel=2)
        u = torch.linspace(0, 1, 257, dtype=dtype, device=device)
        t1 = lo.unsqueeze(-1) + (hi - lo).unsqueeze(-1) * u
        g1 = torch.nan_to_num(g_of(t1), nan=-math.inf)
        lo, hi, _ = _active_range(t1, g1, tail)
    x, w = _gauss_legendre(order, panels, dtype, device)
    width = (hi - lo).unsqueeze(-1)
    t = lo.unsqueeze(-1) + width * x  # (..., Q)
    logw = (w * width).log()
    lg = g_of(t) + logw
    log_marginal = torch.logsumexp(lg, -1)
    return ScalePosterior(t.exp(), lg - log_marginal.unsqueeze(-1), log_marginal, "quadrature")


def scale_posterior_importance(
    log_likelihood: Callable[[Tensor], Tensor],
    prior,
    num_samples: int = 1000,
    *,
    generator_seed: int | None = None,
) -> ScalePosterior:
    r"""The paper's estimator: :math:`s_j \sim p(s)`, weights :math:`\propto p(y \mid s_j)`,
    :math:`\log p(y) \approx \log \frac1M \sum_j p(y \mid s_j)`. Unbiased for
    :math:`p(y)` (not for its log); error decays like :math:`M^{-1/2}` and grows with
    the mismatch between prior and posterior (see :meth:`ScalePosterior.
    effective_sample_size`)."""
    check_scale_prior(prior)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if generator_seed is not None:
        torch.manual_seed(generator_seed)
    with torch.no_grad():
        s = prior.sample((num_samples,))  # (M, *prior.batch)
    s = s.movedim(0, -1)
    ll = log_likelihood(s)
    lse = torch.logsumexp(ll, -1)
    scales = s.expand(ll.shape)
    return ScalePosterior(scales, ll - lse.unsqueeze(-1), lse - math.log(num_samples),
                          "importance")


# --------------------------------------------------------------------------
# Gaussian likelihood given the scale
# --------------------------------------------------------------------------
class GaussianScaleLikelihood:
    r""":math:`\log p(y \mid s)` for :math:`y \mid s \sim \mathcal N(m,\, sK + c(s)\sigma^2 I)`
    from ONE factorisation, with :math:`c(s) = s` (``noise_scaled=True``: the noise is
    part of the scaled kernel, as in the conjugate Student-t process) or :math:`c = 1`.

    * ``noise_scaled=True``: Cholesky of :math:`K_y = K + \sigma^2 I`; then
      :math:`\log p(y\mid s) = -\tfrac n2 \log 2\pi s - \tfrac12\log\det K_y - \tfrac{q}{2s}`,
      O(1) per scale.
    * ``noise_scaled=False``: eigendecomposition :math:`K = U\Lambda U^T`,
      :math:`z = U^T(y - m)`; :math:`\log p(y\mid s) = -\tfrac12\sum_i
      [\log 2\pi v_i + z_i^2 / v_i]`, :math:`v_i = s\lambda_i + \sigma^2`, O(n) per scale.

    Args:
        K: ``(..., n, n)`` kernel matrix (no noise).
        y: ``(..., n)`` targets.
        noise: :math:`\sigma^2 \ge 0` (float or 0-d tensor); with ``noise = 0`` the
            kernel matrix itself must be positive definite.
        loc: optional ``(..., n)`` prior mean of ``y``.
        noise_scaled: whether the noise variance is multiplied by ``s``.
    """

    def __init__(self, K: Tensor, y: Tensor, noise=0.0, *, loc: Tensor | None = None,
                 noise_scaled: bool = True):
        check_tensor(K, "K", min_ndim=2)
        check_tensor(y, "y", min_ndim=1)
        if K.shape[-1] != K.shape[-2] or K.shape[-1] != y.shape[-1]:
            raise ValueError(f"K must be (..., n, n) with n = len(y) = {y.shape[-1]}, got "
                             f"{tuple(K.shape)}")
        noise = torch.as_tensor(noise, dtype=K.dtype, device=K.device)
        if torch.isnan(noise).any() or bool((noise < 0).any()):
            raise ValueError(f"noise must be a non-negative variance, got {noise}")
        self.noise, self.noise_scaled, self.n = noise, bool(noise_scaled), y.shape[-1]
        r = y if loc is None else y - loc
        eye = torch.eye(self.n, dtype=K.dtype, device=K.device)
        if self.noise_scaled:
            self.L = cholesky(K + noise * eye, name="K + noise I", check=False)
            alpha_w = tril_solve(self.L, r.unsqueeze(-1)).squeeze(-1)
            self.q = alpha_w.pow(2).sum(-1)  # (...)
            self.logdet = 2.0 * self.L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
            self.alpha = tril_solve(self.L, alpha_w.unsqueeze(-1), transpose=True).squeeze(-1)
        else:
            evals, self.U = torch.linalg.eigh(K)
            scale = evals.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(K.dtype).tiny)
            if bool((evals < -1e-6 * scale).any()):
                raise ValueError(f"K is not positive semi-definite: smallest eigenvalue "
                                 f"{float(evals.min()):.3g} (largest {float(scale.max()):.3g})")
            self.evals = evals.clamp_min(0.0)  # (..., n)
            self.z = (self.U.mT @ r.unsqueeze(-1)).squeeze(-1)  # (..., n)
            if bool((noise == 0).any()) and bool((self.evals == 0).any()):
                raise ValueError("K is singular and noise is 0: p(y | s) is degenerate")

    def __call__(self, s: Tensor) -> Tensor:
        """:math:`\\log p(y \\mid s)` for scales ``s`` ``(..., Q)`` -> ``(..., Q)``."""
        n = self.n
        if self.noise_scaled:
            q, logdet = self.q.unsqueeze(-1), self.logdet.unsqueeze(-1)
            return -0.5 * n * torch.log(2 * math.pi * s) - 0.5 * logdet - 0.5 * q / s
        v = s.unsqueeze(-1) * self.evals.unsqueeze(-2) + self.noise  # (..., Q, n)
        z2 = self.z.pow(2).unsqueeze(-2)
        return -0.5 * (torch.log(2 * math.pi * v) + z2 / v).sum(-1)

    def predictive_components(self, K_star: Tensor, k_star_diag: Tensor, s: Tensor, *,
                              include_noise: bool = True, loc_star: Tensor | None = None
                              ) -> tuple[Tensor, Tensor]:
        """Per-scale Gaussian predictive at test points: means and variances ``(..., m, Q)``.

        Args:
            K_star: ``(..., n, m)`` train-test kernel; ``k_star_diag``: ``(..., m)`` test
                prior variances; ``s``: ``(..., Q)`` scales.
        """
        if self.noise_scaled:
            mean = (K_star.mT @ self.alpha.unsqueeze(-1)).squeeze(-1)  # (..., m)
            v0 = k_star_diag - tril_solve(self.L, K_star).pow(2).sum(-2)
            v0 = v0.clamp_min(0.0) + (self.noise if include_noise else 0.0)
            mean = mean.unsqueeze(-1).expand(mean.shape + s.shape[-1:])
            var = v0.unsqueeze(-1) * s.unsqueeze(-2)
        else:
            A = self.U.mT @ K_star  # (..., n, m)
            v = s.unsqueeze(-1) * self.evals.unsqueeze(-2) + self.noise  # (..., Q, n)
            mean = torch.einsum("...nm,...qn->...mq", A, s.unsqueeze(-1) * self.z.unsqueeze(-2)
                                / v)
            red = torch.einsum("...nm,...qn->...mq", A.pow(2), s.unsqueeze(-1).pow(2) / v)
            var = (s.unsqueeze(-2) * k_star_diag.unsqueeze(-1) - red).clamp_min(0.0)
            if include_noise:
                var = var + self.noise
        if loc_star is not None:
            mean = mean + loc_star.unsqueeze(-1)
        return mean, var


def mixture_predictive(posterior: ScalePosterior, mean: Tensor, var: Tensor
                       ) -> MixtureSameFamily:
    """The predictive :math:`\\sum_j w_j \\mathcal N(\\mu_j, v_j)` per test point as a
    ``MixtureSameFamily`` (``mean``, ``variance``, ``log_prob``, ``sample``); batch shape
    ``(..., m)``."""
    logits = posterior.log_weights.unsqueeze(-2).expand(mean.shape)
    return MixtureSameFamily(Categorical(logits=logits),
                             Normal(mean, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt()),
                             validate_args=False)


__all__.append("mixture_predictive")


# --------------------------------------------------------------------------
# The prior over function values
# --------------------------------------------------------------------------
class ScaleMixture(TorchDistribution):
    r"""Scale mixture of a Gaussian process at given inputs,

    .. math:: p(f) = \int \mathcal N(f \mid m, sK)\, p(s)\, ds,

    for any scale prior :math:`p(s)` with positive support (``InverseGamma`` gives
    :class:`~pyro_dkm.processes.StudentTProcess`; ``Gamma``, ``HalfCauchy``,
    ``LogNormal``, :class:`BurrXII`, ... have no closed form). ``log_prob`` integrates
    over :math:`\log s` by quadrature (:func:`scale_posterior_quadrature`; one
    Cholesky of ``K``, O(1) per node); ``rsample`` draws ``s`` then ``f``.

    Args:
        scale_prior: univariate distribution over ``s > 0``.
        covariance_matrix: ``(..., n, n)`` ``K``; or ``kernel`` + ``inputs``, or
            ``scale_tril``.
        loc: ``(..., n)`` mean, a float, or a callable of the inputs (default 0).
        order, panels: quadrature size (see :func:`scale_posterior_quadrature`).
    """

    arg_constraints = {}
    support = constraints.real_vector

    def __init__(self, scale_prior, covariance_matrix: Tensor | None = None, *, loc=None,
                 kernel=None, inputs=None, scale_tril=None, order: int = 16, panels: int = 8,
                 validate_args=None):
        self.scale_prior = check_scale_prior(scale_prior)
        L = _tril_from(covariance_matrix, scale_tril, kernel, inputs)
        n = L.shape[-1]
        if callable(loc):
            if inputs is None:
                raise ValueError("a callable loc needs kernel and inputs")
            loc = loc(inputs)
        if loc is None:
            loc = L.new_zeros(())
        elif not isinstance(loc, Tensor):
            if isinstance(loc, bool) or not isinstance(loc, (int, float)):
                raise TypeError(f"loc must be a float, a tensor or a callable, got "
                                f"{type(loc).__name__}")
            loc = L.new_tensor(float(loc))
        else:
            check_tensor(loc, "loc")
            if loc.dim() > 0 and loc.shape[-1] != n:
                raise ValueError(f"loc must have last dimension n = {n}, got shape "
                                 f"{tuple(loc.shape)}")
        loc = loc.to(L.dtype)
        loc_batch = loc.shape[:-1] if loc.dim() > 0 else torch.Size()
        batch = torch.broadcast_shapes(scale_prior.batch_shape, L.shape[:-2], loc_batch)
        self.scale_tril = L
        self.loc = loc.expand(batch + (n,))
        self.order, self.panels = order, panels
        self.has_rsample = bool(scale_prior.has_rsample)
        super().__init__(batch, torch.Size((n,)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ScaleMixture, _instance)
        batch_shape = torch.Size(batch_shape)
        new.scale_prior = self.scale_prior
        new.scale_tril, new.order, new.panels = self.scale_tril, self.order, self.panels
        new.loc = self.loc.expand(batch_shape + self.event_shape)
        new.has_rsample = self.has_rsample
        super(ScaleMixture, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=_EMPTY):
        shape = self._extended_shape(sample_shape)
        prior = self.scale_prior.expand(self.batch_shape)
        s = prior.rsample(sample_shape) if self.has_rsample else prior.sample(sample_shape)
        eps = torch.randn(shape, dtype=self.loc.dtype, device=self.loc.device)
        f = (self.scale_tril @ eps.unsqueeze(-1)).squeeze(-1)
        return self.loc + s.to(self.loc.dtype).sqrt().unsqueeze(-1) * f

    def sample(self, sample_shape=_EMPTY):
        with torch.no_grad():
            return self.rsample(sample_shape)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        n = self.event_shape[0]
        r = value - self.loc
        shape = torch.broadcast_shapes(r.shape, self.scale_tril.shape[:-1])
        L = self.scale_tril.expand(shape + (n,))
        q = tril_solve(L, r.expand(shape).unsqueeze(-1)).squeeze(-1).pow(2).sum(-1)
        half_logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)

        def log_lik(s):
            return (-0.5 * n * torch.log(2 * math.pi * s) - half_logdet.unsqueeze(-1)
                    - 0.5 * q.unsqueeze(-1) / s)

        return scale_posterior_quadrature(log_lik, self.scale_prior, order=self.order,
                                          panels=self.panels).log_marginal

    @property
    def mean(self):
        return self.loc

    @property
    def variance(self):
        es = self.scale_prior.mean
        var = self.scale_tril.pow(2).sum(-1)  # diag K, (..., n)
        return (es.unsqueeze(-1) if es.dim() else es) * var.expand(self.loc.shape)
