r"""The sparse deep kernel machine as a GPyTorch model.

:class:`DeepKernelMachineGP` is a ``gpytorch.models.GP`` with the ``ApproximateGP`` surface
that ``gpytorch.mlls.VariationalELBO`` reads:

* ``forward(X)`` returns the latent marginals ``q(f_t)`` as a ``MultivariateNormal``
  with diagonal covariance (the sparse DKM never needs the joint);
* ``variational_strategy.kl_divergence()`` is :math:`\mathrm{KL}(q(u)\|p(u))` on the top
  layer's kernel at the inducing points (of the last forward pass);
* the Gram layers' regulariser :math:`\sum_l \nu_l \mathrm{KL}_l` is an added loss term
  (divided by ``num_data``, as GPyTorch scales every term per data point).

So ``VariationalELBO(GaussianLikelihood(), model, num_data=N)(model(X), y) * N`` is the
sparse DKM objective of :meth:`pyro_dkm.dkm.DeepKernelMachine.objective` (tested to 1e-8)
for any GPyTorch likelihood, and the module composes like any GPyTorch model (a feature
extractor before it, a likelihood after it).
"""

from __future__ import annotations

import math

import gpytorch
import torch
from linear_operator.operators import DiagLinearOperator
from torch import Tensor

from ._pyro import sync_param_store
from .dkm.model import DeepKernelMachine
from .dkm.output import conditional_weights
from .likelihoods import Gaussian

__all__ = ["DeepKernelMachineGP"]


class _GramKLTerm(gpytorch.mlls.AddedLossTerm):
    def __init__(self, value: Tensor, num_data: int):
        self.value, self.num_data = value, num_data

    def loss(self) -> Tensor:
        return self.value / self.num_data


class _Strategy:
    """What ``VariationalELBO`` asks of ``model.variational_strategy``."""

    def __init__(self, owner: "DeepKernelMachineGP"):
        self._owner = owner

    def kl_divergence(self) -> Tensor:
        K_tril = self._owner._last_K_tril
        if K_tril is None:
            raise RuntimeError("call the model on a batch before its kl_divergence()")
        return self._owner.dkm.output.kl_to_prior(K_tril)


class DeepKernelMachineGP(gpytorch.models.GP):
    """A single-output sparse DKM as a GPyTorch model.

    Args:
        inducing_points: ``(M, d)`` initial inducing inputs.
        num_data: training-set size ``N`` (scales the Gram KL term like GPyTorch's own KL).
        **dkm_kwargs: ``depth``, ``nu``, ``kernel``, ``kl``, ``input_ard``, ... of
            :class:`~pyro_dkm.dkm.DeepKernelMachine` (its own likelihood is not used: the
            GPyTorch likelihood observes the data).

    The DKM is the submodule ``dkm``; all its parameters are ``model.parameters()``.
    """

    def __init__(self, inducing_points: Tensor, *, num_data: int, **dkm_kwargs):
        super().__init__()
        if not isinstance(num_data, int) or num_data < 1:
            raise ValueError(f"num_data must be a positive int, got {num_data!r}")
        for key in ("likelihood", "out_channels"):
            if key in dkm_kwargs:
                raise ValueError(f"{key} is set by the GPyTorch likelihood, not by "
                                 f"DeepKernelMachineGP")
        self.dkm = DeepKernelMachine(inducing_points, likelihood=Gaussian(1.0), **dkm_kwargs)
        self.dkm.likelihood.requires_grad_(False)  # unused: GPyTorch's likelihood observes y
        self.num_data = num_data
        self.variational_strategy = _Strategy(self)
        self._last_K_tril = None
        self.register_added_loss_term("dkm_gram_kl")

    @property
    def inducing_points(self) -> Tensor:
        return self.dkm.input_layer.inducing_points

    def forward(self, X: Tensor) -> gpytorch.distributions.MultivariateNormal:
        sync_param_store(self.dkm)
        X = self.dkm._check_X(X)
        K, K_tril, kls = self.dkm.forward_blocks(X)
        self._last_K_tril = K_tril
        mean, var = self.dkm.output.marginals(*conditional_weights(K, K_tril))
        gram_kl = sum((layer.kl_weight * kl for layer, kl in zip(self.dkm.gram_layers, kls)),
                      X.new_zeros(()))
        self.update_added_loss_term("dkm_gram_kl", _GramKLTerm(gram_kl, self.num_data))
        var = var[:, 0].clamp_min(torch.finfo(var.dtype).tiny)
        return gpytorch.distributions.MultivariateNormal(mean[:, 0], DiagLinearOperator(var))

    def __call__(self, X: Tensor, **kwargs):
        return self.forward(X)

    @torch.no_grad()
    def init_q(self, X: Tensor, y: Tensor, noise: float) -> None:
        """Set ``q(u)`` to its optimum for a Gaussian likelihood of variance ``noise``."""
        self.dkm.likelihood.variance_unconstrained.fill_(math.log(noise))
        self.dkm.init_q(X, y)
