r"""Exact regression with Gaussian, Student-t and general scale-mixture process priors.

All three share one model for the targets: :math:`y \mid s \sim \mathcal N(0,
s(K + \sigma^2 I))` (noise folded into the scaled kernel, so the Student-t case is
conjugate; Lee et al., ICLR 2022), and differ in the scale:

* :class:`GaussianProcessRegression`: ``s`` fixed (the kernel's ``variance``);
* :class:`StudentTProcessRegression`: :math:`s \sim \mathrm{InvGamma}(a, b)`, closed form:
  :math:`y \sim \mathrm{MVT}(2a, 0, \tfrac ba K_y)`; posterior
  :math:`a' = a + n/2`, :math:`b' = b + \tfrac12 y^T K_y^{-1} y`; predictive
  :math:`\mathrm{MVT}(2a', K_*^T K_y^{-1} y, \tfrac{b'}{a'}(K_{**} - K_*^T K_y^{-1} K_*))`;
* :class:`ScaleMixtureRegression`: any scale prior, posterior over ``s`` by quadrature
  (or importance sampling), Gaussian-mixture predictive.

Hyper-parameters are ``PyroParam``s (replace any by a ``PyroSample`` prior); :func:`fit`
maximises :meth:`log_marginal` with Adam or L-BFGS.
"""

from __future__ import annotations

import math
import time
from typing import Callable

import pyro
import torch
from pyro.distributions import MultivariateNormal, MultivariateStudentT
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import Normal, StudentT, constraints

from .._pyro import sync_param_store
from .._training import power_of_ten_scale
from ..kernels.nngp import ACTIVATIONS, fully_connected
from ..linalg import check_positive, check_tensor, cholesky, tril_solve
from .scale_mixture import (
    GaussianScaleLikelihood,
    ScalePosterior,
    check_scale_prior,
    mixture_predictive,
    scale_posterior_importance,
    scale_posterior_quadrature,
)
from .student_t import kernel_matrix, student_t_log_marginal_from_quad

__all__ = [
    "NNGPCovariance",
    "GaussianProcessRegression",
    "StudentTProcessRegression",
    "ScaleMixtureRegression",
    "fit",
]


def _pos(value, name) -> Tensor:
    """A positive, finite scalar hyper-parameter as a float64 tensor."""
    if isinstance(value, Tensor) and value.numel() != 1:
        raise ValueError(f"{name} must be a scalar, got shape {tuple(value.shape)}")
    return torch.tensor(float(check_positive(value, name)), dtype=torch.float64)


class NNGPCovariance(PyroModule):
    r"""NNGP kernel of a fully-connected network with ``depth`` hidden layers,
    ``serial(Dense(w, b), act, ..., Dense(w, b))`` (weight/bias variances shared by the
    layers), times an output ``variance``:
    :math:`k(x, x') = \text{variance}\cdot K^{NNGP}_{w,b}(x, x')`.

    Args:
        depth: hidden layers (``>= 0``); activation: ``"relu"`` or ``"erf"``.
        weight_var, bias_var, variance: initial values (``PyroParam``, positive).
        learn_variance: register ``variance`` as a parameter (else fixed): the Student-t
            model's ``rate`` already sets the scale, so it fixes it at 1.
    Call as ``kernel(x1, x2=None, diag=False)`` with ``x`` of shape ``(n, d)``.
    """

    def __init__(self, depth: int = 2, activation: str = "relu", *, weight_var: float = 2.0,
                 bias_var: float = 0.1, variance: float = 1.0, learn_variance: bool = True):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be 'relu' or 'erf', got {activation!r}")
        self.depth, self.activation = depth, activation
        self.weight_var = PyroParam(_pos(weight_var, "weight_var"), constraints.positive)
        self.bias_var = PyroParam(_pos(bias_var, "bias_var"), constraints.positive)
        if learn_variance:
            self.variance = PyroParam(_pos(variance, "variance"), constraints.positive)
        else:
            self.register_buffer("variance", _pos(variance, "variance"))

    def kernel_fn(self):
        return fully_connected(self.depth, self.activation, self.weight_var, self.bias_var)

    def forward(self, x1: Tensor, x2: Tensor | None = None, diag: bool = False) -> Tensor:
        k = self.kernel_fn()(x1, x2, diag=diag)
        return self.variance.to(k.dtype) * k


class _ExactRegression(PyroModule):
    """Training data, kernel and noise shared by the exact regression models. Unset
    ``noise`` (and the default kernel's ``variance``) are relative to y's scale ``s``
    (:func:`~pyro_dkm._training.power_of_ten_scale`): ``0.1 s^2`` (and ``s^2``), so fits
    rescale with the targets."""

    def __init__(self, X: Tensor, y: Tensor, kernel: Callable | None = None, *,
                 noise: float | None = None):
        super().__init__()
        s2 = power_of_ten_scale(y) ** 2
        noise = 0.1 * s2 if noise is None else noise
        self.kernel = kernel if kernel is not None else self._default_kernel(s2)
        if not callable(self.kernel):
            raise TypeError(f"kernel must be callable (x1, x2) -> Tensor, got "
                            f"{type(self.kernel).__name__}")
        self.noise = PyroParam(_pos(noise, "noise"), constraints.positive)
        self.set_data(X, y)

    def _default_kernel(self, s2: float = 1.0):
        return NNGPCovariance(variance=s2)

    def set_data(self, X: Tensor, y: Tensor) -> None:
        """Set the training inputs ``X`` ``(n, d)`` and targets ``y`` ``(n,)``."""
        check_tensor(X, "X", ndim=2)
        check_tensor(y, "y", ndim=1)
        if X.shape[0] != y.shape[0]:
            raise ValueError(f"X and y must have the same number of points, got {X.shape[0]} "
                             f"and {y.shape[0]}")
        if X.shape[0] == 0:
            raise ValueError("need at least one training point")
        if X.dtype != y.dtype:
            raise TypeError(f"X and y must have the same dtype, got {X.dtype} and {y.dtype}")
        self.X, self.y = X, y

    def _check_test(self, X_new):
        check_tensor(X_new, "X_new", ndim=2)
        if X_new.shape[1] != self.X.shape[1]:
            raise ValueError(f"X_new must have {self.X.shape[1]} features like X, got "
                             f"{X_new.shape[1]}")
        if X_new.shape[0] == 0:
            raise ValueError("X_new must have at least one row to predict at, got shape "
                             f"{tuple(X_new.shape)}")

    def _Ky(self) -> Tensor:
        sync_param_store(self)
        K = kernel_matrix(self.kernel, self.X).to(self.X.dtype)
        n = K.shape[-1]
        return K + self.noise.to(K.dtype) * torch.eye(n, dtype=K.dtype, device=K.device)

    def _cond(self, X_new: Tensor, L: Tensor, full_cov: bool, include_noise: bool):
        """Zero-mean Gaussian conditional given ``Ky = L L^T``: mean, (co)variance."""
        Ks = kernel_matrix(self.kernel, self.X, X_new).to(L.dtype)  # (n, m)
        A = tril_solve(L, Ks)  # (n, m)
        alpha = tril_solve(L, self.y.unsqueeze(-1))  # (n, 1)
        mean = (A.mT @ alpha).squeeze(-1)
        noise = self.noise.to(L.dtype)
        if full_cov:
            cov = kernel_matrix(self.kernel, X_new).to(L.dtype) - A.mT @ A
            if include_noise:
                cov = cov + noise * torch.eye(cov.shape[-1], dtype=L.dtype, device=L.device)
            return mean, cov
        var = kernel_matrix(self.kernel, X_new, diag=True).to(L.dtype) - A.pow(2).sum(0)
        var = var.clamp_min(0.0) + (noise if include_noise else 0.0)
        return mean, var

    def log_marginal(self) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def _targets(self, y: Tensor | None) -> Tensor | None:
        if y is None:
            return None
        check_tensor(y, "y", ndim=1)
        if y.shape[0] != self.X.shape[0]:
            raise ValueError(f"y must have {self.X.shape[0]} entries, one per training input, "
                             f"got shape {tuple(y.shape)}")
        return y.to(self.X.dtype)

    @pyro_method
    def model(self, y: Tensor | None = "train"):
        """Pyro model of the training targets: the site ``"<prefix>.y"`` observed at the
        training ``y`` (default), at a given ``y``, or sampled (``y=None``). Hyper-parameters
        replaced by ``PyroSample`` priors become latent sites, so ``NUTS(model.model)`` or
        SVI with an autoguide infer them."""
        y = self.y if isinstance(y, str) and y == "train" else self._targets(y)
        return pyro.sample(self._pyro_get_fullname("y"), self._marginal(), obs=y)

    def _marginal(self):  # pragma: no cover - interface
        raise NotImplementedError

    def guide(self, *args, **kwargs):
        """Empty: hyper-parameters held as ``PyroParam`` are point estimates (type-II
        maximum likelihood); give ``PyroSample`` sites a guide of their own."""


class GaussianProcessRegression(_ExactRegression):
    r"""Exact GP regression, :math:`y \sim \mathcal N(0, K + \sigma^2 I)`; the kernel's
    ``variance`` is the (fixed) scale. Default kernel: :class:`NNGPCovariance`."""

    def log_marginal(self) -> Tensor:
        L = cholesky(self._Ky(), name="K + noise I")
        alpha = tril_solve(L, self.y.unsqueeze(-1)).squeeze(-1)
        n = self.y.shape[0]
        return (-0.5 * alpha.pow(2).sum() - L.diagonal().log().sum()
                - 0.5 * n * math.log(2 * math.pi))

    def _marginal(self):
        L = cholesky(self._Ky(), name="K + noise I")
        return MultivariateNormal(L.new_zeros(L.shape[-1]), scale_tril=L)

    def predict(self, X_new: Tensor, *, include_noise: bool = True) -> Normal:
        """Marginal predictive ``Normal`` at ``X_new`` ``(m, d)`` (batch shape ``(m,)``)."""
        self._check_test(X_new)
        L = cholesky(self._Ky(), name="K + noise I")
        mean, var = self._cond(X_new, L, False, include_noise)
        return Normal(mean, var.clamp_min(torch.finfo(var.dtype).tiny).sqrt())


class StudentTProcessRegression(_ExactRegression):
    r"""Conjugate Student-t process regression (inverse-gamma scale prior),

    .. math:: s \sim \mathrm{InvGamma}(a, b),\quad y \mid s \sim \mathcal N(0, s K_y),
              \quad K_y = K + \sigma^2 I \;\Rightarrow\;
              y \sim \mathrm{MVT}(2a, 0, \tfrac ba K_y).

    Learnable (``PyroParam``): ``concentration`` ``a`` (unless ``learn_concentration=False``),
    ``rate`` ``b``, ``noise`` :math:`\sigma^2` and the kernel's parameters. The default
    kernel is :class:`NNGPCovariance` with its ``variance`` fixed at 1 (``b`` sets the
    scale).

    Maximising :meth:`log_marginal` over ``a`` usually sends it to its Gaussian limit
    (``a -> inf``): one draw of ``y`` says little about the tail of the scale prior. With
    ``a`` fixed (a prior choice; the paper's code starts at ``a = 2``) the maximising
    rate is ``b = a q / n`` (``q = y^T K_y^{-1} y``), and the predictive has exactly the
    centre and scale of the type-II ML GP with a fitted amplitude, with ``2a + n``
    degrees of freedom instead of Gaussian tails (docs/processes.md).

    Args:
        X: ``(n, d)`` inputs; y: ``(n,)`` targets (standardise them: zero prior mean).
        kernel: callable kernel (``NNGPCovariance``, ``serial(...)``, a GPyTorch kernel).
        concentration, rate, noise: initial values (unset ``rate``: 2 times the square of
            y's scale, the power of ten nearest its standard deviation, so the fit rescales
            with y; ``noise`` is relative to the unit-variance kernel, default 0.1).
        learn_concentration: register ``a`` as a parameter (else a fixed buffer).
    """

    def __init__(self, X: Tensor, y: Tensor, kernel: Callable | None = None, *,
                 concentration: float = 2.0, rate: float | None = None,
                 noise: float | None = None,
                 learn_concentration: bool = True):
        # the noise is folded into the scaled kernel s (K + noise I), K at unit variance: its
        # start is relative to K (0.1), the scale of y goes into the rate
        super().__init__(X, y, kernel, noise=0.1 if noise is None else noise)
        rate = 2.0 * power_of_ten_scale(y) ** 2 if rate is None else rate
        a = _pos(concentration, "concentration")
        if learn_concentration:
            self.concentration = PyroParam(a, constraints.positive)
        else:
            self.register_buffer("concentration", a)
        self.rate = PyroParam(_pos(rate, "rate"), constraints.positive)

    def _default_kernel(self, s2: float = 1.0):
        return NNGPCovariance(learn_variance=False)

    def _stats(self):
        L = cholesky(self._Ky(), name="K + noise I")
        alpha = tril_solve(L, self.y.unsqueeze(-1)).squeeze(-1)
        return L, alpha.pow(2).sum()

    def log_marginal(self) -> Tensor:
        r""":math:`\log \mathrm{MVT}(y \mid 2a, 0, \tfrac ba K_y)` (closed form)."""
        L, q = self._stats()
        n = self.y.shape[0]
        a, b = self.concentration.to(q.dtype), self.rate.to(q.dtype)
        return student_t_log_marginal_from_quad(q, 2 * L.diagonal().log().sum(), n, a, b)

    def _marginal(self):
        L = cholesky(self._Ky(), name="K + noise I")
        a, b = self.concentration.to(L.dtype), self.rate.to(L.dtype)
        return MultivariateStudentT(2 * a, L.new_zeros(L.shape[-1]), (b / a).sqrt() * L)

    def posterior(self) -> tuple[Tensor, Tensor]:
        """``(a', b') = (a + n/2, b + y^T Ky^-1 y / 2)``: the inverse-gamma posterior of s."""
        _, q = self._stats()
        return self.concentration + 0.5 * self.y.shape[0], self.rate + 0.5 * q

    def predict(self, X_new: Tensor, *, full_cov: bool = False, include_noise: bool = True):
        r"""Posterior predictive at ``X_new`` ``(m, d)``: ``StudentT(2a', mean, scale)``
        (batch shape ``(m,)``), or with ``full_cov`` the joint
        ``MultivariateStudentT(2a', mean, chol(b'/a' * cov))``; ``include_noise`` adds
        :math:`\sigma^2 I` to ``cov``."""
        self._check_test(X_new)
        L, q = self._stats()
        n = self.y.shape[0]
        a2 = self.concentration.to(q.dtype) + 0.5 * n
        b2 = self.rate.to(q.dtype) + 0.5 * q
        mean, cov = self._cond(X_new, L, full_cov, include_noise)
        ratio = b2 / a2
        if full_cov:
            return MultivariateStudentT(2 * a2, mean, cholesky(ratio * cov, name="predictive "
                                                               "scale matrix"))
        return StudentT(2 * a2, mean, (ratio * cov).clamp_min(torch.finfo(q.dtype).tiny).sqrt())


class ScaleMixtureRegression(_ExactRegression):
    r"""Regression with any positive scale prior,
    :math:`s \sim p(s)`, :math:`y \mid s \sim \mathcal N(0, s(K + \sigma^2 I))`
    (``noise_scaled=True``) or :math:`\mathcal N(0, sK + \sigma^2 I)`.

    The posterior over ``s`` is computed by quadrature in :math:`\log s` after one
    Cholesky (scaled noise, O(1) per node) or one eigendecomposition of ``K``
    (unscaled noise, O(n) per node), or by the paper's importance sampling from the prior
    (``method="importance"``). The predictive is the posterior-weighted Gaussian
    mixture.

    Args:
        X, y: training data ``(n, d)``, ``(n,)``.
        scale_prior: univariate distribution with positive support (``Gamma``,
            ``HalfCauchy``, ``LogNormal``, :class:`BurrXII`, ``InverseGamma``, ...).
        kernel: default :class:`NNGPCovariance` (learnable ``variance``).
        noise_scaled: scale the noise with ``s`` (default) or not. Fitting the
            hyper-parameters is only supported with scaled noise (no gradient through
            an eigendecomposition).
        method: ``"quadrature"`` (default) or ``"importance"``; ``num_samples`` for the
            latter; ``order``/``panels`` for the former.
    """

    def __init__(self, X: Tensor, y: Tensor, scale_prior, kernel: Callable | None = None, *,
                 noise: float | None = None, noise_scaled: bool = True,
                 method: str = "quadrature",
                 num_samples: int = 1000, order: int = 16, panels: int = 8):
        super().__init__(X, y, kernel, noise=noise)
        self.scale_prior = check_scale_prior(scale_prior)
        if method not in ("quadrature", "importance"):
            raise ValueError(f"method must be 'quadrature' or 'importance', got {method!r}")
        self.method, self.num_samples = method, int(num_samples)
        self.order, self.panels = order, panels
        self.noise_scaled = bool(noise_scaled)

    def _marginal(self):
        raise NotImplementedError("ScaleMixtureRegression.model samples the scale; see model()")

    @pyro_method
    def model(self, y: Tensor | None = "train"):
        """Pyro model: ``"<prefix>.scale" ~ scale_prior``, then ``"<prefix>.y" ~
        N(0, s (K + noise I))`` (or ``N(0, s K + noise I)`` without ``noise_scaled``)."""
        sync_param_store(self)
        y = self.y if isinstance(y, str) and y == "train" else self._targets(y)
        K = kernel_matrix(self.kernel, self.X).to(self.X.dtype)
        s = pyro.sample(self._pyro_get_fullname("scale"), self.scale_prior).to(K.dtype)
        s = s[..., None, None]  # batched scales (a plate over draws) broadcast
        eye = torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        noise = self.noise.to(K.dtype)
        cov = s * (K + noise * eye) if self.noise_scaled else s * K + noise * eye
        L = cholesky(cov, name="s (K + noise I)")
        return pyro.sample(self._pyro_get_fullname("y"),
                           MultivariateNormal(L.new_zeros(L.shape[-1]), scale_tril=L), obs=y)

    def likelihood(self) -> GaussianScaleLikelihood:
        sync_param_store(self)
        K = kernel_matrix(self.kernel, self.X).to(self.X.dtype)
        return GaussianScaleLikelihood(K, self.y, self.noise.to(K.dtype),
                                       noise_scaled=self.noise_scaled)

    def scale_posterior(self, likelihood: GaussianScaleLikelihood | None = None, *,
                        method: str | None = None, num_samples: int | None = None
                        ) -> ScalePosterior:
        lik = likelihood if likelihood is not None else self.likelihood()
        method = method or self.method
        if method == "quadrature":
            return scale_posterior_quadrature(lik, self.scale_prior, order=self.order,
                                              panels=self.panels)
        if method == "importance":
            return scale_posterior_importance(lik, self.scale_prior,
                                              num_samples or self.num_samples)
        raise ValueError(f"method must be 'quadrature' or 'importance', got {method!r}")

    def log_marginal(self, **kw) -> Tensor:
        r""":math:`\log p(y) = \log\int p(y \mid s) p(s) ds` (for model comparison)."""
        return self.scale_posterior(**kw).log_marginal

    def predict(self, X_new: Tensor, *, include_noise: bool = True, **kw):
        r"""Predictive :math:`\sum_j w_j \mathcal N(\mu_j, v_j)` at ``X_new`` ``(m, d)``
        as a ``MixtureSameFamily`` of batch shape ``(m,)`` (``mean``, ``variance``,
        ``log_prob``, ``sample``)."""
        self._check_test(X_new)
        lik = self.likelihood()
        post = self.scale_posterior(lik, **kw)
        Ks = kernel_matrix(self.kernel, self.X, X_new).to(self.X.dtype)
        kss = kernel_matrix(self.kernel, X_new, diag=True).to(self.X.dtype)
        mean, var = lik.predictive_components(Ks, kss, post.scales, include_noise=include_noise)
        return mixture_predictive(post, mean, var)


def fit(model: _ExactRegression, *, steps: int = 100, lr: float = 0.05,
        optimizer: str = "adam", max_seconds: float | None = None) -> list[float]:
    """Maximise ``model.log_marginal()`` (type-II maximum likelihood) over the model's
    parameters. ``optimizer="adam"`` takes ``steps`` Adam steps; ``"lbfgs"`` runs
    ``torch.optim.LBFGS`` (strong-Wolfe line search) for ``steps`` iterations. Returns
    the history of ``-log_marginal / n``. Stops early after ``max_seconds``."""
    if optimizer not in ("adam", "lbfgs"):
        raise ValueError(f"optimizer must be 'adam' or 'lbfgs', got {optimizer!r}")
    if getattr(model, "noise_scaled", True) is False:
        raise ValueError("fitting needs noise_scaled=True (no gradients through eigh)")
    params = [p for p in model.parameters() if p.requires_grad]
    n = model.y.shape[0]
    history: list[float] = []
    t0 = time.perf_counter()

    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be a positive int, got {steps!r}")

    def closure():
        opt.zero_grad()
        loss = -model.log_marginal() / n
        value = float(loss.detach())
        if not math.isfinite(value):
            last = f"{history[-1]:.6g}" if history else "none yet"
            raise FloatingPointError(
                f"the negative log marginal likelihood became {value} at evaluation "
                f"{len(history) + 1} (last finite value: {last} per point); lower lr or "
                f"check the data")
        loss.backward()
        history.append(value)
        return loss

    try:
        if optimizer == "adam":
            opt = torch.optim.Adam(params, lr=lr)
            for _ in range(steps):
                opt.step(closure)
                if max_seconds is not None and time.perf_counter() - t0 > max_seconds:
                    break
        else:
            opt = torch.optim.LBFGS(params, lr=1.0, max_iter=steps,
                                    line_search_fn="strong_wolfe", tolerance_grad=1e-7,
                                    tolerance_change=1e-10)
            opt.step(closure)
    except KeyboardInterrupt:  # return the history so far; parameters stay as they are
        pass
    return history
