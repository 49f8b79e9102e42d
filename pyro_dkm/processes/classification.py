r"""Sparse variational Student-t process classification (SVTP), and the SVGP it generalises.

Scale mixture of NNGPs (Lee, Yun, Yang & Lee, ICLR 2022): the last-layer variance
:math:`s` of an infinitely wide network is random, :math:`f_c \mid s \sim
\mathcal{GP}(0, s\,K)` for each class :math:`c = 1..C` (one :math:`s` shared by the
classes), :math:`s \sim \mathrm{InvGamma}(a, b)`, :math:`y_n \sim
\mathrm{Categorical}(\mathrm{softmax}(f(x_n)))`. With ``M`` inducing inputs :math:`Z` and
*whitened* inducing outputs :math:`u_c = \sqrt{s}\,L v_c` (:math:`K_{ZZ} = L L^T`,
:math:`v_c \sim \mathcal N(0, I)`), the variational family
:math:`q(s)\,\prod_c \mathcal N(v_c; m_c, S_c)` gives

.. math::
    \mathcal L = \sum_n \mathbb E_{q(s)}\mathbb E_{q(f_n\mid s)}
        \log \mathrm{softmax}(f_n)_{y_n}
        - \sum_c \mathrm{KL}(\mathcal N(m_c, S_c)\,\|\,\mathcal N(0, I))
        - \mathrm{KL}(q(s)\,\|\,p(s)),

    q(f_{nc}\mid s) = \mathcal N\big(\sqrt{s}\,a_n^T m_c,\;
        s\,(k_{nn} - a_n^T a_n + a_n^T S_c a_n)\big),\quad a_n = L^{-1} k_Z(x_n).

Whitening makes :math:`s` enter only through the likelihood term, so the two KLs are
closed forms. The likelihood term is Monte Carlo: joint samples of :math:`s`
(reparameterised) and :math:`f`. Without a scale prior :math:`s` is a learned point
estimate (``learn_scale=True``) or 1: the same code is then the ordinary SVGP classifier
(:class:`SVGPClassifier`), which makes the comparison fair (same kernel family
:math:`s K`, inducing points, optimiser, samples; only the treatment of :math:`s`
differs).

``q(s)`` is inverse-gamma by default: the prior's own family (so ``q = p`` is reachable
and the KL is exact), the conditionally conjugate posterior of a Gaussian scale (for a
fixed :math:`u` the exact :math:`p(s\mid u)` is inverse-gamma), and its right tail is the
heavy tail we want to keep. ``scale_posterior="lognormal"`` is offered too (lighter
right tail, lower-variance reparameterisation; its KL to an inverse-gamma prior is also
closed form, :func:`kl_lognormal_inverse_gamma`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import constraints

from .._pyro import sync_param_store
from .._training import OptimiserSteps, shuffled_minibatches
from ..kernels.nngp import NNGPKernelFn
from ..likelihoods import Categorical, softmax_log_prob
from ..linalg import (
    check_tensor,
    cholesky,
    nystrom_residual,
    sparse_gp_marginals,
    tril_solve,
)
from .regression import NNGPCovariance

__all__ = ["NNGPCovariance", "SparseVariationalClassifier", "SVGPClassifier",
           "SVTPClassifier", "fit_classifier", "ClassifierFitResult", "classification_metrics",
           "kl_inverse_gamma", "kl_lognormal_inverse_gamma", "kl_whitened_gaussian"]

SCALE_POSTERIORS = ("inverse_gamma", "lognormal")


# --------------------------------------------------------------------------- closed forms
def kl_inverse_gamma(a_q: Tensor, b_q: Tensor, a_p: Tensor, b_p: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathrm{InvGamma}(a_q, b_q)\,\|\,\mathrm{InvGamma}(a_p, b_p))`
    (equal to the KL of the Gamma laws of :math:`1/s`, rates :math:`b`):

    .. math:: (a_q - a_p)\psi(a_q) - \log\Gamma(a_q) + \log\Gamma(a_p)
              + a_p(\log b_q - \log b_p) + a_q (b_p - b_q)/b_q.
    """
    return ((a_q - a_p) * torch.digamma(a_q) - torch.lgamma(a_q) + torch.lgamma(a_p)
            + a_p * (b_q.log() - b_p.log()) + a_q * (b_p - b_q) / b_q)


def kl_lognormal_inverse_gamma(mu: Tensor, sigma: Tensor, a: Tensor, b: Tensor) -> Tensor:
    r""":math:`\mathrm{KL}(\mathrm{LogNormal}(\mu, \sigma)\,\|\,\mathrm{InvGamma}(a, b))
    = -\tfrac12\log(2\pi e\sigma^2) + a\mu - a\log b + \log\Gamma(a)
    + b\,e^{-\mu + \sigma^2/2}`."""
    return (-0.5 * torch.log(2 * math.pi * math.e * sigma**2) + a * mu - a * b.log()
            + torch.lgamma(a) + b * torch.exp(-mu + 0.5 * sigma**2))


def kl_whitened_gaussian(m: Tensor, L: Tensor) -> Tensor:
    r""":math:`\sum_c \mathrm{KL}(\mathcal N(m_c, L_c L_c^T)\,\|\,\mathcal N(0, I))
    = \tfrac12\sum_c(\|L_c\|_F^2 + \|m_c\|^2 - M - 2\sum_i\log L_{c,ii})`.

    Args:
        m: ``(C, M)``.
        L: ``(M, M)`` (shared by the classes) or ``(C, M, M)`` lower-triangular.
    """
    C, M = m.shape
    tr = L.pow(2).sum((-1, -2))
    logdet = 2 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    if L.dim() == 2:
        tr, logdet = C * tr, C * logdet
    else:
        tr, logdet = tr.sum(), logdet.sum()
    return 0.5 * (tr + m.pow(2).sum() - C * M - logdet)


def classification_metrics(probs: Tensor, y: Tensor) -> tuple[float, float]:
    """Accuracy and mean negative log-likelihood of labels ``y (N,)`` under class
    probabilities ``probs (N, C)``."""
    acc = float((probs.argmax(-1) == y).double().mean())
    nll = float(-probs.gather(-1, y[:, None]).clamp_min(1e-300).log().mean())
    return acc, nll


def _positive_support(support) -> bool:
    kinds = (constraints.greater_than, constraints.greater_than_eq, constraints.interval,
             constraints.half_open_interval)
    return isinstance(support, kinds) and float(support.lower_bound) >= 0


# --------------------------------------------------------------------------- kernel
def _kernel(kernel, x1: Tensor, x2: Tensor | None = None, diag: bool = False) -> Tensor:
    """Dense kernel matrix (or diagonal) from our modules, an ``NNGPKernelFn`` or a GPyTorch
    kernel."""
    if isinstance(kernel, (NNGPKernelFn, NNGPCovariance)):
        return kernel(x1, x2, diag=diag)
    import gpytorch

    if isinstance(kernel, gpytorch.kernels.Kernel):
        out = kernel(x1, x1 if x2 is None else x2, diag=diag)
        return out.to_dense() if hasattr(out, "to_dense") else out
    return kernel(x1, x2, diag=diag)


# --------------------------------------------------------------------------- model
class SparseVariationalClassifier(PyroModule):
    r"""Sparse variational GP / Student-t process classifier over ``C`` classes (see the
    module docstring for the ELBO).

    Args:
        inducing_points: ``(M, d)`` initial inducing inputs :math:`Z` (its dtype is used).
        num_classes: ``C >= 2``.
        kernel: a :class:`~pyro_dkm.processes.regression.NNGPCovariance` (default:
            ``NNGPCovariance(learn_variance=False)``, depth 2 ReLU: the amplitude is
            :math:`s`), an
            :class:`~pyro_dkm.kernels.nngp.NNGPKernelFn`, a ``gpytorch.kernels.Kernel`` or any
            ``callable(x1, x2=None, diag=False)``. Parameters of module kernels are trained.
        scale_prior: ``None`` (SVGP: :math:`s` a point estimate or 1, see ``learn_scale``),
            ``(a, b)`` for :math:`\mathrm{InvGamma}(a, b)` (a Student-t process with
            ``df = 2a`` and scale ``b/a``), or any distribution with positive support
            (its KL to ``q(s)`` is then a Monte-Carlo estimate).
        scale_posterior: ``"inverse_gamma"`` or ``"lognormal"``.
        learn_scale: without a scale prior, learn :math:`s` as a point estimate (the
            ``output_scale`` ``PyroParam``, initialised at 1: a ``ScaleKernel``, the
            last-layer variance fitted by type-II maximum likelihood); otherwise
            :math:`s = 1`.
        learn_inducing: train :math:`Z`.
        shared_covariance: one :math:`S` for all classes (default) or one per class.
        num_likelihood_samples: Monte-Carlo samples of ``(s, f)`` per ELBO evaluation.

    Parameters: ``inducing_points`` ``(M, d)``, ``v_loc`` ``(C, M)``, ``v_scale_tril``
    ``(M, M)`` or ``(C, M, M)``; for a scale prior ``q_concentration``/``q_rate``
    (inverse-gamma, initialised at :math:`(a + CM/2, b + CM/2)`, the conjugate update for
    :math:`v` at its prior) or ``q_loc``/``q_scale`` (log-normal, moment-matched to that).
    """

    def __init__(self, inducing_points: Tensor, num_classes: int, *, kernel=None,
                 scale_prior=None, scale_posterior: str = "inverse_gamma",
                 learn_scale: bool = False, learn_inducing: bool = True,
                 shared_covariance: bool = True, num_likelihood_samples: int = 8):
        super().__init__()
        Z = check_tensor(inducing_points, "inducing_points", ndim=2)
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
            raise ValueError(f"num_classes must be an int >= 2, got {num_classes!r}")
        if not isinstance(num_likelihood_samples, int) or num_likelihood_samples < 1:
            raise ValueError(f"num_likelihood_samples must be a positive int, got "
                             f"{num_likelihood_samples!r}")
        if scale_posterior not in SCALE_POSTERIORS:
            raise ValueError(f"scale_posterior must be one of {SCALE_POSTERIORS}, got "
                             f"{scale_posterior!r}")
        M, C = Z.shape[0], num_classes
        self.num_inducing, self.num_classes, self.input_dim = M, C, Z.shape[1]
        self.num_likelihood_samples = num_likelihood_samples
        self.likelihood = Categorical(num_samples=num_likelihood_samples)
        self.scale_posterior = scale_posterior
        self.kernel = NNGPCovariance(learn_variance=False) if kernel is None else kernel
        if isinstance(self.kernel, torch.nn.Module):
            self.kernel.to(Z.dtype)
        if learn_inducing:
            self.inducing_points = PyroParam(Z.detach().clone())
        else:
            self.register_buffer("inducing_points", Z.detach().clone())
        kw = dict(dtype=Z.dtype, device=Z.device)
        self.v_loc = PyroParam(torch.zeros(C, M, **kw))
        eye = torch.eye(M, **kw)
        self.v_scale_tril = PyroParam(eye if shared_covariance else eye.expand(C, M, M).clone(),
                                      constraints.lower_cholesky)
        self._prior_ab = None
        self._prior = None
        self.learn_scale = bool(learn_scale)
        if scale_prior is None:
            if self.learn_scale:
                self.output_scale = PyroParam(torch.tensor(1.0, **kw), constraints.positive)
            return
        if self.learn_scale:
            raise ValueError("learn_scale=True needs scale_prior=None (with a prior the scale "
                             "is a latent variable)")
        if isinstance(scale_prior, torch.distributions.Distribution):
            if not _positive_support(scale_prior.support):
                raise ValueError(f"scale_prior must have positive support, got "
                                 f"{scale_prior.support}")
            if scale_prior.batch_shape or scale_prior.event_shape:
                raise ValueError("scale_prior must be a scalar distribution (empty batch and "
                                 "event shapes)")
            self._prior = scale_prior
            try:
                mean = float(scale_prior.mean)
            except NotImplementedError:
                mean = math.nan
            # q(s) starts as if the prior were InvGamma(2, prior mean) (or (2, 1))
            a0, b0 = 2.0, (mean if math.isfinite(mean) and mean > 0 else 1.0)
        else:
            try:
                a0, b0 = (float(t) for t in scale_prior)
            except (TypeError, ValueError):
                raise TypeError(f"scale_prior must be None, a pair (a, b) or a distribution, "
                                f"got {scale_prior!r}") from None
            if not (a0 > 0 and b0 > 0 and math.isfinite(a0) and math.isfinite(b0)):
                raise ValueError(f"scale_prior (a, b) must be positive and finite, got "
                                 f"({a0}, {b0})")
            self.register_buffer("prior_concentration", torch.tensor(a0, **kw))
            self.register_buffer("prior_rate", torch.tensor(b0, **kw))
            self._prior_ab = (a0, b0)
        aq, bq = a0 + C * M / 2, b0 + C * M / 2
        if scale_posterior == "inverse_gamma":
            self.q_concentration = PyroParam(torch.tensor(aq, **kw), constraints.positive)
            self.q_rate = PyroParam(torch.tensor(bq, **kw), constraints.positive)
        else:  # log-normal with the inverse-gamma's mean and variance of log s (approx.)
            self.q_loc = PyroParam(torch.tensor(math.log(bq) - math.log(aq), **kw))
            self.q_scale = PyroParam(torch.tensor(aq ** -0.5, **kw), constraints.positive)

    # ------------------------------------------------------------------ pieces
    @property
    def has_scale(self) -> bool:
        return self._prior_ab is not None or self._prior is not None

    def scale_prior(self) -> dist.Distribution:
        """:math:`p(s)`."""
        if self._prior is not None:
            return self._prior
        return dist.InverseGamma(self.prior_concentration, self.prior_rate)

    def scale_posterior_dist(self) -> dist.Distribution:
        """:math:`q(s)`."""
        if self.scale_posterior == "inverse_gamma":
            return dist.InverseGamma(self.q_concentration, self.q_rate)
        return dist.LogNormal(self.q_loc, self.q_scale)

    def scale_kl(self, samples: Tensor | None = None) -> Tensor:
        r""":math:`\mathrm{KL}(q(s)\|p(s))`: closed form for an inverse-gamma prior, else the
        Monte-Carlo mean of :math:`\log q(s) - \log p(s)` over ``samples`` (from ``q``)."""
        if self._prior_ab is not None:
            a, b = self.prior_concentration, self.prior_rate
            if self.scale_posterior == "inverse_gamma":
                return kl_inverse_gamma(self.q_concentration, self.q_rate, a, b)
            return kl_lognormal_inverse_gamma(self.q_loc, self.q_scale, a, b)
        q = self.scale_posterior_dist()
        if samples is None:
            samples = q.rsample((64,))
        return (q.log_prob(samples) - self._prior.log_prob(samples)).mean()

    def check_X(self, X) -> Tensor:
        check_tensor(X, "X", ndim=2)
        if X.shape[1] != self.input_dim:
            raise ValueError(f"X must have {self.input_dim} columns (the inducing points' "
                             f"dimension), got shape {tuple(X.shape)}")
        if X.dtype != self.v_loc.dtype:
            raise TypeError(f"X must have dtype {self.v_loc.dtype} (the model's), got {X.dtype}")
        return X

    def check_y(self, y, n: int) -> Tensor:
        if not isinstance(y, Tensor) or y.dtype not in (torch.int64, torch.int32, torch.uint8):
            raise TypeError(f"y must be an integer tensor of class labels, got "
                            f"{getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (n,):
            raise ValueError(f"y must have shape ({n},) (one label per row of X), got "
                             f"{tuple(y.shape)}")
        if n and (int(y.min()) < 0 or int(y.max()) >= self.num_classes):
            raise ValueError(f"y must hold labels in [0, {self.num_classes - 1}], got range "
                             f"[{int(y.min())}, {int(y.max())}]")
        return y.long()

    def _whitened_projection(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """``A = L^-1 K_ZX`` ``(M, T)`` and the Nystrom residual ``k_xx - |a_x|^2`` ``(T,)``."""
        Z = self.inducing_points
        L = cholesky(_kernel(self.kernel, Z), name="K_ZZ (kernel at the inducing points)")
        A = tril_solve(L, _kernel(self.kernel, Z, X))
        return A, nystrom_residual(_kernel(self.kernel, X, diag=True), A)

    def latent_marginals(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance ``(T, C)`` of :math:`q(f \\mid s = 1)` at the rows of ``X``
        (multiply the mean by :math:`\\sqrt s` and the variance by :math:`s`)."""
        A, resid = self._whitened_projection(X)
        return sparse_gp_marginals(self.v_loc, self.v_scale_tril, A, resid)

    def _sample_scale(self, n: int, dtype, device) -> Tensor:
        if not self.has_scale:
            if self.learn_scale:
                return self.output_scale.expand(n)
            return torch.ones(n, dtype=dtype, device=device)
        return self.scale_posterior_dist().rsample((n,))

    # ------------------------------------------------------------------ objective
    def elbo(self, X: Tensor, y: Tensor, *, num_data: int | None = None,
             num_samples: int | None = None, generator: torch.Generator | None = None
             ) -> Tensor:
        """ELBO estimate (a scalar) from the minibatch ``X (B, d)``, ``y (B,)`` of a data set
        of ``num_data`` points: the likelihood term by Monte Carlo over ``num_samples`` joint
        draws of ``(s, f)``, both KLs in closed form (MC for a non-inverse-gamma prior).
        ``generator`` drives the draws of ``f`` (the draws of ``s`` use torch's global RNG)."""
        sync_param_store(self)
        X = self.check_X(X)
        y = self.check_y(y, X.shape[0])
        B = X.shape[0]
        N = B if num_data is None else int(num_data)
        if N < B:
            raise ValueError(f"num_data ({N}) must be >= the batch size ({B})")
        S = num_samples or self.num_likelihood_samples
        mean, var = self.latent_marginals(X)
        eps = torch.randn((S,) + mean.shape, dtype=mean.dtype, device=mean.device,
                          generator=generator)
        s = self._sample_scale(S, mean.dtype, mean.device)
        f = s.sqrt()[:, None, None] * (mean + var.sqrt() * eps)  # (S, B, C)
        ell = softmax_log_prob(f, y).mean(0).sum() * (N / B)
        kl = kl_whitened_gaussian(self.v_loc, self.v_scale_tril)
        if self.has_scale:
            kl = kl + self.scale_kl(s if self._prior is not None else None)
        return ell - kl

    # ------------------------------------------------------------------ Pyro
    @pyro_method
    def model(self, X: Tensor, y: Tensor | None = None, *, num_data: int | None = None):
        """Pyro model: ``scale ~ p(s)`` (if any), whitened ``v ~ N(0, I)``, and the
        Monte-Carlo expected log-likelihood given ``(s, v)`` as a factor inside
        ``pyro.plate("data", num_data, subsample=...)`` (the site ``"likelihood.y"`` of a
        :class:`~pyro_dkm.likelihoods.Categorical`); without ``y``, samples labels."""
        sync_param_store(self)
        X = self.check_X(X)
        B = X.shape[0]
        if y is not None:
            y = self.check_y(y, B)
        plate = pyro.plate("data", B if num_data is None else int(num_data),
                           subsample=torch.arange(B, device=X.device))
        if self.has_scale:
            s = pyro.sample("scale", self.scale_prior())
        else:
            s = self.output_scale if self.learn_scale else 1.0
        C, M = self.num_classes, self.num_inducing
        v = pyro.sample("v", dist.Normal(X.new_zeros(C, M), 1.0).to_event(2))
        A, resid = self._whitened_projection(X)
        mean = (v @ A).mT  # (B, C)
        # given (s, v): f ~ N(sqrt(s) v A, s resid), observed under the softmax likelihood
        with plate:
            return self.likelihood(mean * s ** 0.5, (resid[:, None] * s).expand_as(mean), y)

    @pyro_method
    def guide(self, X: Tensor, y: Tensor | None = None, **kwargs):
        """Pyro guide: ``scale ~ q(s)``, ``v ~ N(v_loc, v_scale_tril v_scale_tril^T)``."""
        sync_param_store(self)
        out = {}
        if self.has_scale:
            out["scale"] = pyro.sample("scale", self.scale_posterior_dist())
        L = self.v_scale_tril
        if L.dim() == 2:
            L = L.expand(self.num_classes, *L.shape)
        out["v"] = pyro.sample("v", dist.MultivariateNormal(self.v_loc, scale_tril=L).to_event(1))
        return out

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    def predict_proba(self, X: Tensor, *, num_samples: int = 64, batch_size: int = 1024,
                      generator: torch.Generator | None = None) -> Tensor:
        """Class probabilities ``(T, C)``: the softmax averaged over ``num_samples`` joint
        draws of ``(s, f)`` from ``q`` (the same ``s`` draws for every batch of
        ``batch_size`` rows)."""
        sync_param_store(self)
        X = self.check_X(X)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        s = self._sample_scale(num_samples, X.dtype, X.device).sqrt()[:, None, None]
        out = []
        for start in range(0, X.shape[0], batch_size):
            mean, var = self.latent_marginals(X[start:start + batch_size])
            eps = torch.randn((num_samples,) + mean.shape, dtype=mean.dtype,
                              device=mean.device, generator=generator)
            out.append(torch.softmax(s * (mean + var.sqrt() * eps), -1).mean(0))
        return torch.cat(out) if out else X.new_zeros(0, self.num_classes)

    @torch.no_grad()
    def predict(self, X: Tensor, **kwargs) -> torch.distributions.Categorical:
        """The predictive ``Categorical`` at the rows of ``X`` (``probs`` from
        :meth:`predict_proba`, same options)."""
        return torch.distributions.Categorical(probs=self.predict_proba(X, **kwargs))


class SVGPClassifier(SparseVariationalClassifier):
    """:class:`SparseVariationalClassifier` without a scale prior: the scale :math:`s` is a
    learned point estimate (``learn_scale=True``, default; the fair baseline for
    :class:`SVTPClassifier`, which integrates :math:`s` instead) or fixed at 1."""

    def __init__(self, inducing_points: Tensor, num_classes: int, *, learn_scale: bool = True,
                 **kwargs):
        if "scale_prior" in kwargs:
            raise TypeError("SVGPClassifier has no scale_prior; use SVTPClassifier")
        super().__init__(inducing_points, num_classes, learn_scale=learn_scale, **kwargs)


class SVTPClassifier(SparseVariationalClassifier):
    """:class:`SparseVariationalClassifier` with an inverse-gamma scale prior
    ``InvGamma(a, b)`` (default ``a = b = 2``: df 4, scale 1)."""

    def __init__(self, inducing_points: Tensor, num_classes: int, *, a: float = 2.0,
                 b: float = 2.0, **kwargs):
        if "scale_prior" in kwargs:
            raise TypeError("give a and b (or use SparseVariationalClassifier(scale_prior=...))")
        super().__init__(inducing_points, num_classes, scale_prior=(a, b), **kwargs)


# --------------------------------------------------------------------------- training
@dataclass
class ClassifierFitResult:
    """``losses``: negative ELBO per data point, one per step."""

    losses: list = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


def fit_classifier(model: SparseVariationalClassifier, X: Tensor, y: Tensor, *,
                   num_steps: int = 1000, batch_size: int | None = 256, lr: float = 0.01,
                   num_samples: int | None = None, elbo=None, seed: int | None = None,
                   progress: bool = True, callback=None,
                   distributed: bool | None = None) -> ClassifierFitResult:
    """Train by stochastic variational inference: Adam on minibatch ELBOs.

    Args:
        model: a :class:`SparseVariationalClassifier`.
        X, y: ``(N, d)`` inputs, ``(N,)`` integer labels.
        num_steps: optimiser steps; batch_size: minibatch size (``None``: full batch);
            minibatches are disjoint shuffled slices.
        lr: Adam learning rate.
        num_samples: Monte-Carlo draws of ``(s, f)`` per step (default: the model's).
        elbo: ``None`` for :meth:`SparseVariationalClassifier.elbo` (closed-form KLs), or a
            Pyro ELBO (e.g. ``pyro.infer.TraceMeanField_ELBO()``) run on ``model.model`` /
            ``model.guide``.
        seed: seeds Pyro/torch and a private generator for minibatches and ``f`` draws (so
            two models trained with one seed see the same minibatches and noise).
        progress: tqdm bar on stderr; callback: ``callback(step, loss)``, True stops.
        distributed: ``None``: data-parallel inside a ``torch.distributed`` process group of
            more than one rank (:mod:`pyro_dkm.distributed`); ``False``: never. Each rank
            draws its own ``f`` noise, so a K-rank fit matches one process in distribution,
            not draw for draw.
    """
    from ..distributed import DataParallel

    X = model.check_X(X)
    y = model.check_y(y, X.shape[0])
    if not isinstance(num_steps, int) or num_steps < 0:
        raise ValueError(f"num_steps must be a non-negative int, got {num_steps!r}")
    N = X.shape[0]
    B = N if batch_size is None else int(batch_size)
    if B < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size!r}")
    B = min(B, N)
    if seed is not None:
        pyro.set_rng_seed(seed)
    gen = torch.Generator(device=X.device).manual_seed(0 if seed is None else seed)
    dp = DataParallel(model.parameters(), distributed)
    if dp.enabled and B < dp.size:
        raise ValueError(f"batch_size ({B}) must be at least the number of ranks ({dp.size})")
    # minibatches from their own generator: the same global batches on every rank
    batch_gen = torch.Generator(device=X.device).manual_seed(0 if seed is None else seed)
    noise_gen = gen if not dp.enabled else torch.Generator(device=X.device).manual_seed(
        (0 if seed is None else seed) + 1 + dp.rank)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    batches = shuffled_minibatches(N, B, generator=batch_gen if dp.enabled else gen,
                                   device=X.device)
    t0 = time.perf_counter()
    with OptimiserSteps(opt, total=num_steps, num_data=N, desc=type(model).__name__,
                        progress=progress and dp.is_main, callback=callback, postfix_every=20,
                        parallel=dp if dp.enabled else None) as steps:
        for _ in range(num_steps):
            idx, w = dp.local(next(batches))
            if elbo is None:
                loss = -model.elbo(X[idx], y[idx], num_data=N, num_samples=num_samples,
                                   generator=noise_gen) * w
            else:
                loss = elbo.differentiable_loss(model.model, model.guide, X[idx], y[idx],
                                                num_data=N) * w
            if steps(loss):
                break
    return ClassifierFitResult(losses=steps.losses, seconds=time.perf_counter() - t0,
                               steps=steps.step)
