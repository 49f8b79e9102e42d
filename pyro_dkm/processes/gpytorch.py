r"""Student-t process regression for GPyTorch users.

Any ``ExactGP`` with a ``GaussianLikelihood`` and any kernel (including
:class:`pyro_dkm.gpytorch.NNGPKernel`) becomes a Student-t process by swapping its
marginal log likelihood: with the inverse-gamma scale prior :math:`s \sim
\mathrm{InvGamma}(a, b)` on :math:`K_y = K + \sigma^2 I` (the noise folded into the
kernel, docs/processes.md),

.. math::
    \log p(y) = \log\Gamma(a + \tfrac n2) - \log\Gamma(a) - \tfrac n2 \log(2\pi b)
        - \tfrac12 \log|K_y| - (a + \tfrac n2)\log\Big(1 + \frac{r^T K_y^{-1} r}{2b}\Big),

:math:`r = y - \mu(X)`: the ``MultivariateStudentT`` density with ``df = 2a`` and scale
matrix :math:`(b/a) K_y`. Usage::

    mll = StudentTMarginalLogLikelihood(likelihood, model, a=2.0, b=2.0)
    opt = torch.optim.Adam(mll.parameters(), lr=0.05)   # model, likelihood, a and b
    for _ in range(200):
        opt.zero_grad()
        loss = -mll(model(train_x), train_y)
        loss.backward()
        opt.step()
    pred = mll.predictive(test_x)         # torch.distributions.StudentT, df = 2a + n

Like GPyTorch's ``ExactMarginalLogLikelihood`` the value is divided by ``n``, priors
registered on the model are added, and the solves go through ``linear_operator``
(Cholesky for small ``n``, CG/Lanczos for large or KeOps kernels). ``b/a`` and a
``ScaleKernel`` output scale are not separately identifiable (only their product is);
``df = 2a`` is.
"""

from __future__ import annotations

import math

import gpytorch
import torch
from gpytorch.constraints import Positive
from gpytorch.distributions import MultivariateNormal
from gpytorch.likelihoods import _GaussianLikelihoodBase
from pyro.distributions import MultivariateStudentT
from torch import Tensor
from torch.distributions import StudentT

from ..linalg import cholesky
from .student_t import student_t_log_marginal_from_quad

__all__ = ["StudentTMarginalLogLikelihood", "student_t_log_marginal_from_quad",
           "student_t_predictive"]



def _check_init(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be positive and finite, got {value}")
    return float(value)


class StudentTMarginalLogLikelihood(gpytorch.mlls.ExactMarginalLogLikelihood):
    r"""Exact Student-t process marginal log likelihood (divided by ``n``) for an
    ``ExactGP`` with a Gaussian likelihood.

    Args:
        likelihood: a ``gpytorch.likelihoods.GaussianLikelihood`` (or another
            ``_GaussianLikelihoodBase``); its noise is part of :math:`K_y`.
        model: the ``ExactGP``.
        a, b: initial inverse-gamma prior parameters (``> 0``); ``df = 2a``.
        learn_a, learn_b: train them (registered as raw parameters of this module with a
            ``Positive`` constraint, so ``mll.parameters()`` includes them); otherwise
            they are fixed buffers.
    """

    def __init__(self, likelihood, model, a: float = 2.0, b: float = 2.0, *,
                 learn_a: bool = True, learn_b: bool = True):
        if not isinstance(likelihood, _GaussianLikelihoodBase):
            raise TypeError(f"likelihood must be a GPyTorch Gaussian likelihood, got "
                            f"{type(likelihood).__name__}")
        if not isinstance(model, gpytorch.models.ExactGP):
            raise TypeError(f"model must be a gpytorch.models.ExactGP, got "
                            f"{type(model).__name__}")
        a, b = _check_init(a, "a"), _check_init(b, "b")
        super().__init__(likelihood, model)
        dtype = next(model.parameters(), torch.zeros((), dtype=torch.float64)).dtype
        for name, value, learn in (("a", a, learn_a), ("b", b, learn_b)):
            constraint = Positive()
            raw = constraint.inverse_transform(torch.tensor(value, dtype=dtype))
            if learn:
                self.register_parameter(f"raw_{name}", torch.nn.Parameter(raw))
                self.register_constraint(f"raw_{name}", constraint)
            else:  # GPyTorch constraints attach to parameters only: keep it as an attribute
                self.register_buffer(f"raw_{name}", raw)
                setattr(self, f"raw_{name}_constraint", constraint)

    @property
    def a(self) -> Tensor:
        return self.raw_a_constraint.transform(self.raw_a)

    @property
    def b(self) -> Tensor:
        return self.raw_b_constraint.transform(self.raw_b)

    @property
    def df(self) -> Tensor:
        """Prior degrees of freedom ``2a``."""
        return 2 * self.a

    def forward(self, function_dist, target: Tensor, *params, **kwargs) -> Tensor:
        if not isinstance(function_dist, MultivariateNormal):
            raise TypeError("StudentTMarginalLogLikelihood needs the model's output "
                            "MultivariateNormal, e.g. mll(model(train_x), train_y)")
        if not isinstance(target, Tensor) or not target.is_floating_point():
            raise TypeError(f"target must be a floating-point tensor, got "
                            f"{getattr(target, 'dtype', type(target).__name__)}")
        output = self.likelihood(function_dist, *params, **kwargs)
        if target.shape[-1:] != output.event_shape:
            raise ValueError(f"target must end with {tuple(output.event_shape)} (one value per "
                             f"training input), got shape {tuple(target.shape)}")
        if gpytorch.settings.observation_nan_policy.value() == "mask":
            from linear_operator.operators import MaskedLinearOperator

            observed = gpytorch.settings.observation_nan_policy._get_observed(
                target, output.event_shape)
            output = MultivariateNormal(
                mean=output.mean[..., observed],
                covariance_matrix=MaskedLinearOperator(
                    output.lazy_covariance_matrix, observed.reshape(-1), observed.reshape(-1)))
            target = target[..., observed]
        elif not torch.isfinite(target).all():
            raise ValueError("target contains NaN or infinite values (set "
                             "gpytorch.settings.observation_nan_policy('mask') to skip NaNs)")
        res = self.log_marginal(output, target)
        res = self._add_other_terms(res, params)
        return res.div_(function_dist.event_shape.numel())

    def log_marginal(self, output: MultivariateNormal, target: Tensor) -> Tensor:
        """``log MVT(target | df=2a, output.mean, (b/a) output.covariance)`` (not divided
        by ``n``); ``output`` is the marginal of ``y`` (noise included)."""
        r = (target - output.mean).unsqueeze(-1)
        inv_quad, logdet = output.lazy_covariance_matrix.inv_quad_logdet(
            inv_quad_rhs=r, logdet=True)
        return student_t_log_marginal_from_quad(inv_quad, logdet, r.shape[-2], self.a, self.b)

    def posterior_ab(self) -> tuple[Tensor, Tensor]:
        r"""Posterior inverse-gamma parameters of the scale,
        :math:`a' = a + n/2`, :math:`b' = b + \tfrac12 r^T K_y^{-1} r` (training data)."""
        model = self.model
        inputs = model.train_inputs
        target = model.train_targets
        prior = model.forward(*inputs)
        output = self.likelihood(prior, *inputs)
        r = (target - output.mean).unsqueeze(-1)
        inv_quad = output.lazy_covariance_matrix.inv_quad(r)
        return self.a + 0.5 * r.shape[-2], self.b + 0.5 * inv_quad

    def predictive(self, X: Tensor, *, include_noise: bool = True, joint: bool = False):
        """Student-t posterior predictive at ``X``: ``df = 2a + n``, the Gaussian posterior
        mean, scale :math:`\\sqrt{(b'/a')}` times the Gaussian posterior standard deviation
        (docs/processes.md). Returns ``torch.distributions.StudentT`` (marginals) or, with
        ``joint``, a Pyro ``MultivariateStudentT`` over the rows of ``X``.
        ``include_noise=False`` gives the latent ``f``."""
        return student_t_predictive(self, X, include_noise=include_noise, joint=joint)


def student_t_predictive(mll: StudentTMarginalLogLikelihood, X: Tensor, *,
                         include_noise: bool = True, joint: bool = False):
    """See :meth:`StudentTMarginalLogLikelihood.predictive`. The model and likelihood are
    put in eval mode for the Gaussian posterior and restored to their previous modes."""
    if not isinstance(mll, StudentTMarginalLogLikelihood):
        raise TypeError(f"mll must be a StudentTMarginalLogLikelihood, got "
                        f"{type(mll).__name__}")
    if not isinstance(X, Tensor) or not X.is_floating_point():
        raise TypeError(f"X must be a floating-point tensor, got "
                        f"{getattr(X, 'dtype', type(X).__name__)}")
    if not torch.isfinite(X).all():
        raise ValueError("X contains NaN or infinite values")
    model, likelihood = mll.model, mll.likelihood
    a_post, b_post = mll.posterior_ab()
    modes = model.training, likelihood.training
    model.eval()
    likelihood.eval()
    try:
        post = model(X)
        if include_noise:
            post = likelihood(post, X)
        ratio = b_post / a_post  # (batch)
        df = 2 * a_post
        if joint:
            L = cholesky(post.covariance_matrix, name="posterior covariance")
            return MultivariateStudentT(df, post.mean,
                                        ratio.sqrt()[..., None, None] * L)
        scale = (ratio[..., None] * post.variance).clamp_min(0).sqrt()
        return StudentT(df[..., None].expand_as(scale), post.mean, scale)
    finally:
        model.train(modes[0])
        likelihood.train(modes[1])
