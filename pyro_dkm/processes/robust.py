r"""Robust regression: per-observation noise scales (a Student-t likelihood) under a GP or
Student-t process prior, by variational Bayes (Tipping & Lawrence, "Variational
inference for Student-t models", Neurocomputing 2005).

Model (``process="gp"``):

.. math:: y_i = f(x_i) + e_i,\quad e_i \mid \lambda_i \sim \mathcal N(0, \sigma^2\lambda_i),
          \quad \lambda_i \sim \mathrm{InvGamma}(\tfrac\nu2, \tfrac\nu2),
          \quad f \sim \mathcal{GP}(0, \alpha K),

so the noise is marginally Student-t with ``nu`` degrees of freedom. With
``process="student_t"`` one global scale ``s ~ InvGamma(a, b)`` multiplies the whole
covariance, ``f | s ~ GP(0, sK)`` and ``e_i | s, lam_i ~ N(0, s sigma^2 lam_i)`` (the noise
is scaled with ``s`` as in :class:`~pyro_dkm.processes.StudentTProcessRegression`).

Inference is mean-field, ``q(f) q(s) prod_i q(lam_i)``, with ``f`` collapsed: for fixed
``q(lam_i) = InvGamma((nu+1)/2, (nu+1)(1+u_i)/2)`` (so ``E[1/lam_i] = w_i = 1/(1+u_i)``)
and ``c = 1/E[1/s]`` (``c = alpha`` for the GP) the optimal ``q(f)`` is the Gaussian
posterior with heteroscedastic noise ``sigma^2 / w_i``, and the bound is

.. math:: \mathcal L = \log\mathcal N(y \mid 0, C) + \sum_i T(u_i, \nu)
          \;[- n(\log a_q - \psi(a_q)) - \mathrm{KL}(q(s)\,\|\,p(s))],

with :math:`C = \alpha K + \sigma^2 W^{-1}` (GP) or :math:`c(K + \sigma^2 W^{-1})` (t),
and :math:`T(u, \nu) = -\tfrac12(\mathbb E\log\lambda + \log w) - \mathrm{KL}(q(\lambda) \|
p(\lambda))`, which with :math:`\rho = 1 + u(\nu + 1)` is
:math:`\log\tfrac{\Gamma((\nu+1)/2)}{\Gamma(\nu/2)\sqrt{\nu/2}} - \tfrac12\log(1 + \tfrac1\nu)
- \tfrac\nu2\log(1 + \tfrac\rho\nu) + \tfrac{(\nu+1)\rho}{2(\nu+\rho)}` (``0`` at ``u = 0``
as ``nu -> inf``). One sweep: eigendecompose :math:`B = W^{1/2}KW^{1/2}`; then the bound is
O(n) in ``(alpha, sigma^2, nu)`` (M-step by L-BFGS), and the E-step reads the posterior
mean ``m`` and variances ``V_ii`` of ``f`` off the same eigenvectors (O(n^2)):
``u_i = (r_i / sigma_eff^2 - 1)/(nu + 1)``, ``r_i = (y_i - m_i)^2 + V_ii``;
for the t process ``q(s) = InvGamma(a + n, (b + q/2)(a + n)/(a + n/2))``,
``q = y^T (K + sigma^2 W^{-1})^{-1} y`` (the joint optimum of ``q(f) q(s)``). Every step
maximises the bound, so it increases monotonically. See ``docs/processes.md``.

The predictive at a test point is a 1-D scale mixture over the new ``lam_*``,
``p(y_*) = int N(y_* | mu_*, v_* + sigma^2 lam) InvGamma(lam | nu/2, nu/2) dlam``
(Student-t components with ``df = 2 a_q`` for the t process), by Gauss-Legendre
quadrature in ``log lam`` (:func:`~pyro_dkm.processes.scale_posterior_quadrature`):
:class:`StudentTNoisePredictive`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Callable

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroParam
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import constraints

from .._pyro import sync_param_store
from .._training import power_of_ten_scale
from ..linalg import check_tensor, cholesky, tril_solve
from ._t_noise import StudentTNoisePredictive, _check_positive, log_integral
from .classification import kl_inverse_gamma
from .regression import NNGPCovariance, _ExactRegression, _pos
from .spectral import SpectralProblem, maximise_positive
from .student_t import kernel_matrix, log_gamma_ratio

__all__ = [
    "student_t_noise_terms",
    "robust_bound",
    "robust_vb",
    "RobustFit",
    "StudentTNoisePredictive",
    "log_integral",
    "RobustRegression",
]

PROCESSES = ("gp", "student_t")
_BOUNDS = {"amplitude": (1e-8, 1e8), "noise": (1e-6, 1e6), "df": (0.5, 1e6)}


# --------------------------------------------------------------------------
# Pure maths
# --------------------------------------------------------------------------
def student_t_noise_terms(u: Tensor, df) -> Tensor:
    r"""Per-observation terms :math:`T(u_i, \nu)` of the bound (module docstring) for
    ``q(lam_i) = InvGamma((nu+1)/2, (nu+1)(1+u_i)/2)``: :math:`-\tfrac12(\mathbb E\log
    \lambda_i + \log\mathbb E[1/\lambda_i]) - \mathrm{KL}(q(\lambda_i)\,\|\,
    \mathrm{InvGamma}(\tfrac\nu2, \tfrac\nu2))`. Stable as ``nu -> inf`` (the Gamma ratio
    by :func:`log_gamma_ratio`, logs by ``log1p``). ``u``: ``(..., n)``; returns ``(..., n)``."""
    df = torch.as_tensor(df, dtype=u.dtype, device=u.device)
    rho = 1.0 + u * (df + 1.0)
    return (log_gamma_ratio(0.5 * df, 0.5) - 0.5 * torch.log1p(1.0 / df)
            - 0.5 * df * torch.log1p(rho / df) + 0.5 * rho / (1.0 + u))


def _scale_terms(a_q, b_q, a, b, n: int) -> Tensor:
    """The global-scale part of the bound: -n (log a_q - psi(a_q)) - KL(q(s) || p(s))."""
    return -n * (torch.log(a_q) - torch.digamma(a_q)) - kl_inverse_gamma(a_q, b_q, a, b)


def _t(x, like: Tensor) -> Tensor:
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


def robust_bound(K: Tensor, y: Tensor, u: Tensor, *, noise, df, amplitude=1.0,
                 scale_posterior: tuple | None = None, scale_prior: tuple | None = None
                 ) -> Tensor:
    r"""The variational lower bound on :math:`\log p(y)` (module docstring) at any
    ``q(lam_i)`` (given by ``u`` ``(n,)``, ``E[1/lam_i] = 1/(1 + u_i)``), with ``q(f)``
    optimal, by one Cholesky. Differentiable in all arguments.

    Args:
        K: ``(n, n)`` kernel matrix; y: ``(n,)`` targets; noise: ``sigma^2``; df: ``nu``.
        amplitude: ``alpha`` (GP prior).
        scale_posterior, scale_prior: ``(a_q, b_q)`` and ``(a, b)`` for the Student-t
            process (then ``amplitude`` must be 1).
    """
    n = y.shape[-1]
    noise, df = _t(noise, y), _t(df, y)
    if scale_posterior is not None:
        a_q, b_q = (_t(v, y) for v in scale_posterior)
        a, b = (_t(v, y) for v in scale_prior)
        c = b_q / a_q
        C = c * (K + torch.diag(noise * (1.0 + u)))
    else:
        C = _t(amplitude, y) * K + torch.diag(noise * (1.0 + u))
    L = cholesky(C, name="C")
    alpha = tril_solve(L, y.unsqueeze(-1)).squeeze(-1)
    out = (-0.5 * alpha.pow(2).sum() - L.diagonal().log().sum() - 0.5 * n * math.log(2 * math.pi)
           + student_t_noise_terms(u, df).sum())
    if scale_posterior is not None:
        out = out + _scale_terms(a_q, b_q, a, b, n)
    return out


# --------------------------------------------------------------------------
# The fixed point
# --------------------------------------------------------------------------
@dataclass
class RobustFit:
    """Result of :func:`robust_vb`: fitted ``params`` (floats), the variational state
    ``u`` (``E[1/lam_i] = 1/(1+u_i)``), ``scale_posterior`` ``(a_q, b_q)`` (t process),
    the bound ``elbo`` and its ``history``, and the eigendecomposition of
    ``B = W^{1/2} K W^{1/2}`` used for prediction."""

    params: dict
    u: Tensor
    elbo: float
    history: list = field(default_factory=list)
    converged: bool = False
    process: str = "gp"
    scale_posterior: tuple | None = None
    spectral: SpectralProblem | None = None
    sqrt_w: Tensor | None = None

    @property
    def noise_weights(self) -> Tensor:
        """``E[1/lam_i] = 1/(1 + u_i)``: small for observations treated as outliers."""
        return 1.0 / (1.0 + self.u)

    def latent(self, K_star: Tensor, k_star_diag: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance ``(m,)`` of the latent ``f_*`` (for the t process: given
        ``s = 1``, i.e. the variance to be multiplied by ``s``). ``K_star``: ``(n, m)``."""
        A = self.sqrt_w.unsqueeze(-1) * K_star
        amp = self.params["amplitude"] if self.process == "gp" else 1.0
        return self.spectral.conditional(A, k_star_diag, amp, self.params["noise"])

    def predict(self, K_star: Tensor, k_star_diag: Tensor, *, order: int = 16,
                panels: int = 8, scale: float = 1.0) -> StudentTNoisePredictive:
        """Predictive of ``y_*`` at ``m`` test points (batch shape ``(m,)``); ``scale``:
        the fit was on ``y / scale`` (the predictive is returned in ``y``'s units)."""
        mean, var = self.latent(K_star, k_star_diag)
        s2 = scale * scale
        mean, var = mean * scale, var * s2
        noise, df = self.params["noise"] * s2, self.params["df"]
        if self.process == "gp":
            return StudentTNoisePredictive(mean, var, noise, df, order=order, panels=panels)
        a_q, b_q = self.scale_posterior
        return StudentTNoisePredictive(mean, var, noise, df, latent_df=2 * a_q,
                                       latent_scale=b_q / a_q, order=order, panels=panels)


def robust_vb(K: Tensor, y: Tensor, *, noise: float = 0.1, df: float = 4.0,
              amplitude: float = 1.0, process: str = "gp", concentration: float = 2.0,
              rate: float = 2.0, learn=None, max_iter: int = 100,
              tol: float = 1e-8, bounds: dict | None = None, u0: Tensor | None = None,
              spectral0: SpectralProblem | None = None, accelerate: bool = True
              ) -> RobustFit:
    r"""Variational EM for Student-t noise (module docstring): alternate the M-step
    (maximise the bound over the parameters in ``learn`` at fixed ``q``; O(n) per
    L-BFGS step) and the closed-form E-step (``q(s)``, then ``q(lam)``), one
    eigendecomposition of ``W^{1/2} K W^{1/2}`` per sweep (O(n^3)), until the bound
    changes by less than ``tol * n``.

    Args:
        K: ``(n, n)`` kernel matrix (float64 advised); y: ``(n,)`` standardised targets.
        noise, df, amplitude: initial ``sigma^2``, ``nu``, ``alpha``.
        process: ``"gp"`` or ``"student_t"`` (global ``s ~ InvGamma(concentration, rate)``,
            fixed: type-II ML of ``(a, b)`` under this bound drives ``q(s)`` to a point
            mass, i.e. back to the GP).
        learn: subset of ``("amplitude", "noise", "df")`` (``amplitude`` only for the GP);
            default: all of them. ``df`` is not moved on the first sweep from the default
            ``u0`` (``E[1/lam] = 1``, where the bound always prefers ``nu -> inf``). For the
            t process ``q(s)`` is profiled out of the M-step.
        bounds: ``{name: (lo, hi)}`` for the M-step (defaults ``amplitude`` 1e-8..1e8,
            ``noise`` 1e-6..1e6, ``df`` 0.5..1e6).
        u0: initial state (default 0: ``E[1/lam] = 1``, the Gaussian fit);
        spectral0: ``SpectralProblem(K, y)`` to reuse for the first sweep when ``u0`` is 0.
        accelerate: adaptive over-relaxation of the ``q(lam)`` step (each extrapolated
            step is kept only if the bound increases; else the plain EM step is taken).
    """
    check_tensor(K, "K", ndim=2)
    check_tensor(y, "y", ndim=1)
    n = y.shape[0]
    if K.shape != (n, n):
        raise ValueError(f"K must be (n, n) with n = len(y) = {n}, got {tuple(K.shape)}")
    if process not in PROCESSES:
        raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
    params = {"noise": _check_positive("noise", noise), "df": _check_positive("df", df)}
    if process == "gp":
        params["amplitude"] = _check_positive("amplitude", amplitude)
        a = b = None
    else:
        a, b = (_t(_check_positive(k, v), y) for k, v in (("concentration", concentration),
                                                          ("rate", rate)))
    allowed = ("amplitude", "noise", "df") if process == "gp" else ("noise", "df")
    learn = allowed if learn is None else tuple(learn)
    bad = [k for k in learn if k not in allowed]
    if bad:
        raise ValueError(f"learn: {bad} not learnable for process={process!r} (allowed "
                         f"{allowed})")
    if max_iter < 0:
        raise ValueError(f"max_iter must be >= 0, got {max_iter}")
    bnds = dict(_BOUNDS, **(bounds or {}))
    u = torch.zeros_like(y) if u0 is None else u0.detach().clone()
    if u.shape != y.shape or bool((u <= -1).any()):
        raise ValueError("u0 must have the shape of y and entries > -1")
    qs = None
    history: list[float] = []
    converged = False

    def pieces(sp, p, u, qs):
        """(amplitude, noise) of the collapsed Gaussian and the q(s) terms."""
        if process == "gp":
            return p["amplitude"], p["noise"], 0.0
        a_q, b_q = qs
        c = b_q / a_q
        return c, c * p["noise"], _scale_terms(a_q, b_q, a, b, n)

    def bound(sp, p, u, qs):
        amp, nz, extra = pieces(sp, p, u, qs)
        return (sp.gp_log_marginal(amp, nz) - 0.5 * torch.log1p(u).sum()
                + student_t_noise_terms(u, p["df"]).sum() + extra)

    def scale_update(sp, p):
        q, _ = sp.stats(1.0, p["noise"])
        return a + n, (b + 0.5 * q) * (a + n) / (a + 0.5 * n)

    def eig(u):
        sw = (1.0 / (1.0 + u)).sqrt()
        return sw, SpectralProblem(sw.unsqueeze(-1) * K * sw, sw * y)

    omega, fallback = 1.0, None  # over-relaxation factor; the plain EM step it replaced
    for it in range(max_iter + 1):
        if it == 0 and spectral0 is not None and u0 is None:
            sw, sp = torch.ones_like(y), spectral0
        else:
            sw, sp = eig(u)
        if process == "student_t" and qs is None:
            qs = scale_update(sp, params)
        value = float(bound(sp, params, u, qs))
        if fallback is not None and value < history[-1]:  # extrapolation overshot
            u, qs = fallback
            omega = 1.0
            sw, sp = eig(u)
            value = float(bound(sp, params, u, qs))
        history.append(value)
        if it > 0 and abs(history[-1] - history[-2]) <= tol * n:
            converged = True
            break
        if it == max_iter:
            break
        # M-step at fixed q. Not nu on the first sweep from the default u = 0: with
        # E[1/lam_i] = 1 for all i the bound is largest at nu -> inf whatever the data,
        # and from there EM only crawls back (1e-5 nats per sweep: a false convergence)
        step = tuple(k for k in learn if not (k == "df" and it == 0 and u0 is None))
        if step:
            fixed = {k: v for k, v in params.items() if k not in step}

            def objective(_sp=sp, _fixed=fixed, _u=u, _qs=qs, **kw):
                p = {**_fixed, **kw}
                # t process: q(s) profiled out (its optimum given the noise), so the
                # M-step moves along the ridge c * sigma^2 = const in one step instead of
                # zig-zagging between sigma^2 and q(s) over many sweeps
                return bound(_sp, p, _u, _qs if process == "gp" else scale_update(_sp, p))

            new, val = maximise_positive(objective, {k: params[k] for k in step},
                                         bounds={k: bnds[k] for k in step})
            if val >= value:
                params.update(new)
        if process == "student_t":  # E-step: q(f) q(s) jointly, then q(lam)
            qs = scale_update(sp, params)
        amp, nz, _ = pieces(sp, params, u, qs)
        v = amp * sp.evals + nz
        resid = (sp.U @ (nz * sp.z / v)) / sw  # y - m
        var = (sp.U.pow(2) @ (amp * sp.evals * nz / v)) / sw.pow(2)  # V_ii
        u_em = ((resid.pow(2) + var) / nz - 1.0) / (params["df"] + 1.0)
        if accelerate and it > 0:
            # adaptive over-relaxation (Salakhutdinov & Roweis 2003): step omega times the
            # EM step; accepted only if the bound does not decrease, else the EM step
            omega = min(max(1.5, 1.5 * omega), 50.0)
            fallback = (u_em, qs)
            lo = -1.0 / (params["df"] + 1.0)  # u >= lo for any residual
            u = (u + omega * (u_em - u)).clamp_min(lo)
        else:
            u = u_em
    if process == "student_t":
        params.update(concentration=float(a), rate=float(b))
        qs = (float(qs[0]), float(qs[1]))
    return RobustFit(params=params, u=u, elbo=history[-1], history=history,
                     converged=converged, process=process, scale_posterior=qs, spectral=sp,
                     sqrt_w=sw)


# --------------------------------------------------------------------------
# PyroModule front end
# --------------------------------------------------------------------------
class RobustRegression(_ExactRegression):
    r"""Exact-prior regression with Student-t noise (per-observation inverse-gamma noise
    scales), fitted by variational EM (:func:`robust_vb`).

    Learnable (``PyroParam``, updated in place by :meth:`fit`): ``noise`` (``sigma^2``),
    ``df`` (``nu``) and, for ``process="gp"``, ``amplitude`` (``alpha``). For
    ``process="student_t"`` the inverse-gamma ``(concentration, rate)`` of the global scale
    are fixed buffers. The kernel's own parameters are not fitted by :meth:`fit`: choose them
    by :meth:`elbo` on a grid (as ``benchmarks/scale_mixtures.py`` does). Default kernel:
    :class:`NNGPCovariance` with ``variance`` fixed at 1.

    Args:
        X: ``(n, d)``; y: ``(n,)`` (standardise: zero prior mean); kernel: callable.
        process: ``"gp"`` or ``"student_t"``; df, noise, amplitude, concentration, rate:
            initial / fixed values (unset ``noise``, ``amplitude``, ``rate``: 0.1, 1 and 2
            times the square of y's scale, the power of ten nearest its standard deviation,
            so the whole fit rescales with y; the EM runs in those units).
    """

    def __init__(self, X: Tensor, y: Tensor, kernel: Callable | None = None, *,
                 process: str = "gp", df: float = 4.0, noise: float | None = None,
                 amplitude: float | None = None, concentration: float = 2.0,
                 rate: float | None = None):
        # unset values are relative to y's scale s2 (0.1, 1 and 2 in the units where y's
        # spread is O(1)), so a fit of 1e4 * y is the fit of y rescaled
        s2 = power_of_ten_scale(y) ** 2
        noise = 0.1 * s2 if noise is None else noise
        amplitude = 1.0 * s2 if amplitude is None else amplitude
        rate = 2.0 * s2 if rate is None else rate
        super().__init__(X, y, kernel, noise=noise)
        if process not in PROCESSES:
            raise ValueError(f"process must be one of {PROCESSES}, got {process!r}")
        self.process = process
        self.df = PyroParam(_pos(df, "df"), constraints.positive)
        if process == "gp":
            self.amplitude = PyroParam(_pos(amplitude, "amplitude"), constraints.positive)
        else:
            self.register_buffer("concentration", _pos(concentration, "concentration"))
            self.register_buffer("rate", _pos(rate, "rate"))
        self.state: RobustFit | None = None
        self._y_scale = 1.0

    def _default_kernel(self, s2: float = 1.0):
        return NNGPCovariance(learn_variance=False)

    @pyro_method
    def model(self, y: Tensor | None = "train"):
        r"""Pyro model: ``"<prefix>.s" ~ InvGamma(a, b)`` (Student-t process only), the
        latent values ``"<prefix>.f" ~ N(0, c K)`` (``c`` the amplitude, or ``s``), and
        ``"<prefix>.y" ~ StudentT(df, f, sqrt(noise))`` (``sqrt(s noise)`` for the t
        process) independently per point. :meth:`fit` is the fast variational-EM path;
        this model is for NUTS / SVI with other priors."""
        sync_param_store(self)
        y = self.y if isinstance(y, str) and y == "train" else self._targets(y)
        K = kernel_matrix(self.kernel, self.X).to(self.X.dtype)
        if self.process == "gp":
            c = self.amplitude.to(K.dtype)
            noise_scale = self.noise.to(K.dtype).sqrt()
        else:
            c = pyro.sample(self._pyro_get_fullname("s"),
                            dist.InverseGamma(self.concentration.to(K.dtype),
                                              self.rate.to(K.dtype)))
            noise_scale = (c * self.noise.to(K.dtype)).sqrt()
        L = cholesky(c * K, name="the prior covariance")
        f = pyro.sample(self._pyro_get_fullname("f"),
                        dist.MultivariateNormal(K.new_zeros(K.shape[-1]), scale_tril=L))
        with pyro.plate(self._pyro_get_fullname("data"), K.shape[-1]):
            return pyro.sample(self._pyro_get_fullname("y"),
                               dist.StudentT(self.df.to(K.dtype), f, noise_scale), obs=y)

    def set_data(self, X: Tensor, y: Tensor) -> None:
        super().set_data(X, y)
        self.state = None  # q(lam) belongs to the old data

    def get_extra_state(self):
        """The fitted variational state travels with ``state_dict()`` (load it with
        ``torch.load(..., weights_only=False)``: it is not only tensors)."""
        return {"state": self.state, "y_scale": self._y_scale}

    def set_extra_state(self, extra) -> None:
        self.state, self._y_scale = extra["state"], extra["y_scale"]

    def _K(self) -> Tensor:
        sync_param_store(self)
        with torch.no_grad():
            return kernel_matrix(self.kernel, self.X).to(torch.float64)

    def _kw(self) -> dict:
        kw = dict(noise=float(self.noise.detach()), df=float(self.df.detach()),
                  process=self.process)
        if self.process == "gp":
            kw["amplitude"] = float(self.amplitude.detach())
        else:
            kw.update(concentration=float(self.concentration), rate=float(self.rate))
        return kw

    def fit(self, *, learn=None, max_iter: int = 100, tol: float = 1e-8,
            bounds: dict | None = None) -> RobustFit:
        """Run variational EM; learn ``("amplitude", "noise", "df")`` by default
        (``("noise", "df")`` for the t process; ``learn=()`` keeps them fixed and only
        finds ``q``), warm-started from the previous fit's ``q(lam)`` if there is one.
        Stores and returns the :class:`RobustFit`."""
        if learn is None:
            learn = ("amplitude", "noise", "df") if self.process == "gp" else ("noise", "df")
        y = self.y.detach().to(torch.float64)
        # Fit in units where y's spread is O(1), so that the bounds and starting values of
        # the EM mean the same for y and for 1e4 y: the scale is the power of ten nearest
        # to y's standard deviation (exactly 1 for standardised targets: no change there).
        scale = power_of_ten_scale(y)
        s2 = scale * scale
        kw = self._kw()
        kw["noise"] /= s2
        if self.process == "gp":
            kw["amplitude"] /= s2
        else:  # s ~ InvGamma(a, b) in y's units is InvGamma(a, b / scale^2) in fit units
            kw["rate"] /= s2
        u0 = self.state.u if self.state is not None else None  # warm start a refit
        st = robust_vb(self._K(), y / scale, learn=learn, max_iter=max_iter, tol=tol,
                       bounds=bounds, u0=u0, **kw)
        self._y_scale = scale
        self.state = st
        shift = -y.numel() * math.log(scale)  # log p(y) = log p(y / scale) - n log(scale)
        params = dict(st.params)
        for k in ("noise", "amplitude", "rate"):
            if k in params:
                params[k] = params[k] * s2
        for k in ("noise", "df", "amplitude"):
            if k in learn:
                setattr(self, k, PyroParam(torch.tensor(params[k], dtype=torch.float64),
                                           constraints.positive))
        return dataclasses.replace(st, params=params, elbo=st.elbo + shift,
                                   history=[h + shift for h in st.history])

    def _state(self) -> RobustFit:
        """The fitted state, in fit units (y / ``_y_scale``)."""
        if self.state is None:
            self.fit(learn=())
        return self.state

    def elbo(self) -> float:
        """The variational lower bound on ``log p(y)`` at the fitted state."""
        st = self._state()
        return st.elbo - self.y.numel() * math.log(self._y_scale)

    def predict(self, X_new: Tensor, *, order: int = 16, panels: int = 8
                ) -> StudentTNoisePredictive:
        """Predictive of ``y_*`` at ``X_new`` ``(m, d)`` (batch shape ``(m,)``)."""
        self._check_test(X_new)
        st = self._state()
        with torch.no_grad():
            Ks = kernel_matrix(self.kernel, self.X, X_new).to(torch.float64)
            kss = kernel_matrix(self.kernel, X_new, diag=True).to(torch.float64)
        return st.predict(Ks, kss, order=order, panels=panels, scale=self._y_scale)
