r"""Likelihoods as objects: the observation model of any latent-function module.

The ``pyro.contrib.gp.likelihoods`` pattern: a likelihood is a ``PyroModule`` called
with the latent marginals inside the user's data plate,

.. code-block:: python

    f = self.dkm(X)                                  # Normal, (N,) or (N, C)
    with pyro.plate("data", N, subsample=idx):
        self.likelihood(f.loc, f.variance, y)        # registers the observation site

With ``y`` given it adds :math:`\mathbb E_{\mathcal N(f;\,m,\,v)} \log p(y \mid f)` per
point as the factor site ``"<prefix>.y"`` (the exact ELBO term: closed form where
one exists, Gauss-Hermite quadrature for scalar latents, Monte Carlo for the softmax);
with ``y=None`` it samples ``y`` from ``p(y | f)``, ``f`` drawn from its marginal.
:meth:`Likelihood.predictive` gives the predictive ``torch.distributions``
object :math:`\int p(y\mid f)\,\mathcal N(f; m, v)\,df`.

* :class:`Gaussian` (learnable ``variance``), :class:`StudentT` (``df``, ``scale``),
  :class:`Bernoulli` (logit link), :class:`Poisson` (log link, closed form),
  :class:`Categorical` (softmax over the last dimension, Monte Carlo),
  :class:`FunctionLikelihood` (any ``callable(f) -> Distribution``).
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints

from .linalg import check_positive

__all__ = [
    "Likelihood", "Gaussian", "StudentT", "Bernoulli", "Poisson", "Categorical",
    "TemperedCategorical",
    "FunctionLikelihood", "as_likelihood", "gauss_hermite", "softmax_log_prob",
]


def gauss_hermite(order: int, like: Tensor) -> tuple[Tensor, Tensor]:
    r"""Nodes ``x_k`` and weights ``w_k`` with :math:`\mathbb E_{\mathcal N(0,1)} g(z)
    \approx \sum_k w_k g(x_k)` (probabilists' Gauss-Hermite, exact for polynomials of
    degree ``< 2 order``), in ``like``'s dtype and device."""
    x, w = np.polynomial.hermite_e.hermegauss(order)
    w = w / math.sqrt(2 * math.pi)
    return (torch.as_tensor(x, dtype=like.dtype, device=like.device),
            torch.as_tensor(w, dtype=like.dtype, device=like.device))


def softmax_log_prob(f: Tensor, y: Tensor) -> Tensor:
    """``log softmax(f)[y]``: ``f`` ``(..., T, C)`` latent draws (leading sample dimensions
    broadcast), ``y`` ``(T,)`` class indices; returns ``(..., T)``. The softmax likelihood
    of :class:`Categorical` and the Student-t process classifiers' joint-draw ELBO."""
    logp = torch.log_softmax(f, -1)
    idx = y.reshape((1,) * (f.dim() - 2) + y.shape + (1,)).expand(f.shape[:-1] + (1,))
    return logp.gather(-1, idx).squeeze(-1)


def _positive(value, name: str) -> Tensor:
    return torch.tensor(float(check_positive(value, name)), dtype=torch.float64)


class Likelihood(PyroModule):
    """Base class. Subclasses give :meth:`conditional` (``p(y | f)`` as a distribution
    for a tensor of latent values) and may override :meth:`expected_log_prob` with a
    closed form. ``latent_event_dim`` is 1 when one observation needs a vector of
    latents (softmax), else 0."""

    latent_event_dim = 0
    #: Gauss-Hermite nodes for the scalar-latent expectation and predictive
    quadrature_order = 20

    def conditional(self, f: Tensor) -> torch.distributions.Distribution:
        raise NotImplementedError

    def check_y(self, y: Tensor, f_loc: Tensor | None = None) -> Tensor:
        """Validate and cast the targets (subclasses check their support); with the
        latent means ``f_loc``, also that ``y`` has one entry per observation."""
        if not isinstance(y, Tensor):
            raise TypeError(f"y must be a torch.Tensor, got {type(y).__name__}")
        if f_loc is not None:
            want = f_loc.shape[:f_loc.dim() - self.latent_event_dim]
            if y.shape != want:
                raise ValueError(f"y must have shape {tuple(want)} (one entry per latent "
                                 f"value), got {tuple(y.shape)}")
        if y.is_floating_point() and not bool(torch.isfinite(y).all()):
            raise ValueError("y must be finite (it holds NaN or inf)")
        return y

    def expected_log_prob(self, f_loc: Tensor, f_var: Tensor, y: Tensor) -> Tensor:
        r""":math:`\mathbb E_{\mathcal N(f; m, v)} \log p(y \mid f)` per observation, by
        Gauss-Hermite quadrature over the scalar latent."""
        x, w = gauss_hermite(self.quadrature_order, f_loc)
        f = f_loc + f_var.clamp_min(0).sqrt() * x.reshape((-1,) + (1,) * f_loc.dim())
        return (w.reshape((-1,) + (1,) * f_loc.dim()) * self.conditional(f).log_prob(y)).sum(0)

    def predictive(self, f_loc: Tensor, f_var: Tensor) -> torch.distributions.Distribution:
        r""":math:`\int p(y \mid f) \mathcal N(f; m, v) df` as a mixture over the
        quadrature nodes (``MixtureSameFamily``, batch shape that of ``f_loc``)."""
        x, w = gauss_hermite(self.quadrature_order, f_loc)
        f = f_loc.unsqueeze(-1) + f_var.clamp_min(0).sqrt().unsqueeze(-1) * x  # (..., Q)
        mix = dist.Categorical(probs=w.expand(f.shape))
        return dist.MixtureSameFamily(mix, self.conditional(f))

    def forward(self, f_loc: Tensor, f_var: Tensor, y: Tensor | None = None):
        """Register the observation site ``"<prefix>.y"``; call it inside the data plate.
        Returns ``y`` (observed or sampled)."""
        name = self._pyro_get_fullname("y")
        if y is None:
            f = f_loc + f_var.clamp_min(0).sqrt() * torch.randn_like(f_loc)
            d = self.conditional(f)
            extra = len(d.batch_shape) - 1  # dimensions beyond the data dimension
            return pyro.sample(name, d.to_event(extra) if extra > 0 else d)
        y = self.check_y(y, f_loc)
        ell = self.expected_log_prob(f_loc, f_var, y)
        pyro.factor(name, ell.reshape(ell.shape[:1] + (-1,)).sum(-1) if ell.dim() > 1 else ell)
        return y


class Gaussian(Likelihood):
    r""":math:`y \sim \mathcal N(f, \sigma^2)`; ``variance`` :math:`\sigma^2` is a
    ``PyroParam`` (swap it for a ``PyroSample`` prior). The expectation is closed form:
    :math:`\log \mathcal N(y; m, \sigma^2) - v / (2\sigma^2)`."""

    def __init__(self, variance: float = 0.1):
        super().__init__()
        self.variance = PyroParam(_positive(variance, "variance"), constraints.positive)

    def conditional(self, f):
        return dist.Normal(f, self.variance.to(f).sqrt())

    def check_y(self, y, f_loc=None):
        y = super().check_y(y, f_loc)
        if not y.is_floating_point():
            raise TypeError(f"y must be floating point for a Gaussian likelihood, got {y.dtype}")
        return y

    def expected_log_prob(self, f_loc, f_var, y):
        s2 = self.variance.to(f_loc)
        return (-0.5 * math.log(2 * math.pi) - 0.5 * s2.log()
                - 0.5 * ((y - f_loc).pow(2) + f_var) / s2)

    def predictive(self, f_loc, f_var):
        return dist.Normal(f_loc, (f_var.clamp_min(0) + self.variance.to(f_loc)).sqrt())


class StudentT(Likelihood):
    r""":math:`y \sim t_\nu(f, s)`: heavy-tailed noise; ``df`` and ``scale`` are
    ``PyroParam`` (``learn_df=False`` holds ``df``)."""

    def __init__(self, df: float = 4.0, scale: float = 0.3, learn_df: bool = True):
        super().__init__()
        if learn_df:
            self.df = PyroParam(_positive(df, "df"), constraints.positive)
        else:
            self.register_buffer("df", _positive(df, "df"))
        self.scale = PyroParam(_positive(scale, "scale"), constraints.positive)

    def conditional(self, f):
        return dist.StudentT(self.df.to(f), f, self.scale.to(f))


class Bernoulli(Likelihood):
    r""":math:`y \sim \mathrm{Bernoulli}(\sigma(f))`, ``y`` in ``{0, 1}``; the
    predictive is ``Bernoulli(probs = E[sigma(f)])`` (quadrature)."""

    def conditional(self, f):
        return dist.Bernoulli(logits=f)

    def check_y(self, y, f_loc=None):
        y = super().check_y(y, f_loc)
        if not bool(((y == 0) | (y == 1)).all()):
            raise ValueError("y must hold 0/1 labels for a Bernoulli likelihood")
        return y.to(torch.get_default_dtype() if not y.is_floating_point() else y.dtype)

    def expected_log_prob(self, f_loc, f_var, y):
        return super().expected_log_prob(f_loc, f_var, y.to(f_loc))

    def predictive(self, f_loc, f_var):
        x, w = gauss_hermite(self.quadrature_order, f_loc)
        f = f_loc.unsqueeze(-1) + f_var.clamp_min(0).sqrt().unsqueeze(-1) * x
        return dist.Bernoulli(probs=(torch.sigmoid(f) * w).sum(-1).clamp(0, 1))


class Poisson(Likelihood):
    r""":math:`y \sim \mathrm{Poisson}(e^{f})` (times an optional ``exposure``). The
    expectation is closed form: :math:`y m - e^{m + v/2} - \log y!`."""

    def __init__(self, exposure: Tensor | float = 1.0):
        super().__init__()
        self.register_buffer("log_exposure", torch.as_tensor(exposure, dtype=torch.float64).log())

    def conditional(self, f):
        return dist.Poisson((f + self.log_exposure.to(f)).exp())

    def check_y(self, y, f_loc=None):
        y = super().check_y(y, f_loc)
        if bool((y < 0).any()) or not bool((y == y.round()).all()):
            raise ValueError("y must hold non-negative integer counts for a Poisson likelihood")
        return y

    def expected_log_prob(self, f_loc, f_var, y):
        y = y.to(f_loc)
        m = f_loc + self.log_exposure.to(f_loc)
        return y * m - (m + 0.5 * f_var).exp() - torch.lgamma(y + 1)


class Categorical(Likelihood):
    r"""Softmax over the last dimension of ``f`` ``(..., C)``; ``y`` class indices.
    The expectation is Monte Carlo over ``num_samples`` reparameterised draws of
    ``f`` (unbiased, differentiable); the predictive averages the softmax."""

    latent_event_dim = 1

    def __init__(self, num_samples: int = 8, predictive_samples: int = 64):
        super().__init__()
        if int(num_samples) < 1 or int(predictive_samples) < 1:
            raise ValueError("num_samples and predictive_samples must be positive ints")
        self.num_samples = int(num_samples)
        self.predictive_samples = int(predictive_samples)

    def conditional(self, f):
        return dist.Categorical(logits=f)

    def check_y(self, y, f_loc=None):
        y = super().check_y(y, f_loc)
        if y.is_floating_point() or y.dtype == torch.bool:
            raise TypeError(f"y must hold integer class indices, got dtype {y.dtype}")
        return y.long()

    def _draws(self, f_loc, f_var, n):
        eps = torch.randn((n,) + f_loc.shape, dtype=f_loc.dtype, device=f_loc.device)
        return f_loc + f_var.clamp_min(0).sqrt() * eps

    def expected_log_prob(self, f_loc, f_var, y):
        C = f_loc.shape[-1]
        if bool(((y < 0) | (y >= C)).any()):
            raise ValueError(f"y holds class indices outside [0, {C - 1}]")
        return softmax_log_prob(self._draws(f_loc, f_var, self.num_samples), y).mean(0)

    def predictive(self, f_loc, f_var):
        p = torch.softmax(self._draws(f_loc, f_var, self.predictive_samples), -1).mean(0)
        return dist.Categorical(probs=p)


class TemperedCategorical(Categorical):
    r"""Softmax of tempered logits, :math:`p(y \mid f) = \mathrm{softmax}(f / T)_y`, with
    the temperature ``T`` a positive ``PyroParam`` (learned by default; ``learn=False``
    keeps it a fixed buffer). The top-layer kernel of a DKM has no amplitude (its scale is
    set by the Grams' regularisers), so without ``T`` its latent values, and hence the
    confidence of its predictions, are tied to the kernel's scale; ``T < 1`` sharpens."""

    def __init__(self, temperature: float = 1.0, num_samples: int = 8,
                 predictive_samples: int = 64, learn: bool = True):
        super().__init__(num_samples=num_samples, predictive_samples=predictive_samples)
        t = _positive(temperature, "temperature")
        if learn:
            self.temperature = PyroParam(t, constraints.positive)
        else:
            self.register_buffer("temperature", t)

    def conditional(self, f):
        return dist.Categorical(logits=f / self.temperature.to(f.dtype))

    def _draws(self, f_loc, f_var, n):
        return super()._draws(f_loc, f_var, n) / self.temperature.to(f_loc.dtype)


class FunctionLikelihood(Likelihood):
    """Any ``fn(f) -> Distribution`` of the observations given latent values ``f``
    (batch shape that of ``f``), e.g. ``lambda f: dist.Gamma(2.0, 2.0 / f.exp())``.
    Its parameters, if any, are the caller's (make ``fn`` a ``PyroModule``)."""

    def __init__(self, fn: Callable[[Tensor], torch.distributions.Distribution],
                 latent_event_dim: int = 0):
        super().__init__()
        if not callable(fn):
            raise TypeError(f"fn must be callable (f -> Distribution), got {type(fn).__name__}")
        self.fn = fn
        self.latent_event_dim = int(latent_event_dim)

    def conditional(self, f):
        return self.fn(f)


_NAMED = {"gaussian": Gaussian, "student_t": StudentT, "bernoulli": Bernoulli,
          "poisson": Poisson, "categorical": Categorical,
          "tempered_categorical": TemperedCategorical}


def as_likelihood(value, **kwargs) -> Likelihood:
    """A :class:`Likelihood` from an instance, a name (``"gaussian"``, ``"student_t"``,
    ``"bernoulli"``, ``"poisson"``, ``"categorical"``; ``kwargs`` go to its
    constructor) or a callable ``f -> Distribution``."""
    if isinstance(value, Likelihood):
        return value
    if isinstance(value, str):
        if value not in _NAMED:
            raise ValueError(f"likelihood must be a Likelihood, a callable or one of "
                             f"{sorted(_NAMED)}, got {value!r}")
        return _NAMED[value](**kwargs)
    if callable(value):
        return FunctionLikelihood(value)
    raise TypeError(f"likelihood must be a Likelihood, a callable or a name, got "
                    f"{type(value).__name__}")
