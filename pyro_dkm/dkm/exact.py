r"""Exact (full) deep kernel machine for small data (P up to a few thousand points).

Learned full Grams :math:`G_1..G_L` (``P x P``, Cholesky factor with log-diagonal,
initialised at the NNGP) maximise

.. math:: \mathcal L = \sum_c \log \mathcal N\big(y_c \mid 0, K(G_L) + \sigma^2 I\big)
          - \sum_l \nu_l\,\mathrm{KL}\big(\mathcal N(0,G_l)\,\|\,\mathcal N(0,K(G_{l-1}))\big),

:math:`G_0 = XX^T/d`. Test points get their Grams by the sparse propagation rule with the
training set as the inducing set, then the GP predictive on :math:`K(G_L)`.
"""

from __future__ import annotations

from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import constraints

from .._pyro import sync_param_store
from .._training import target_statistics
from ..kernels.gram import GramKernel
from ..linalg import check_tensor, cholesky, cholesky_solve, gaussian_log_marginal, tril_solve
from .layers import GramLayer, InputGram, KernelLayer, propagate_gram
from .model import _per_layer

__all__ = ["ExactDeepKernelMachine"]


class ExactDeepKernelMachine(PyroModule):
    """Full DKM with a Gaussian likelihood.

    Args:
        X: ``(P, d)`` training inputs; y: ``(P,)`` or ``(P, C)`` targets.
        depth, nu, kernel, noise, kl, lengthscale, gram_parameterisation, dtype: as for
            :class:`~pyro_dkm.dkm.DeepKernelMachine`.
        input_ard: learn one input lengthscale per feature, ``G_0 = (X/l)(X/l)^T / d``
            (``input_layer.input_lengthscale``, a ``PyroParam`` initialised at 1): with
            ``depth=0`` and ``kernel="sqexp"`` the model is a GP with an ARD squared
            exponential kernel of unit amplitude on the standardised targets.
        output_variance: learn an amplitude ``s2`` and a constant ``b`` of the output GP's
            kernel, ``y ~ N(0, s2 K(G_L) + b 11^T + noise I)`` (``output_variance`` and
            ``output_bias``, ``PyroParam`` s initialised at 1 and 0.1): the amplitude and
            the marginalised constant mean of an ordinary GP; ``False`` (default):
            ``s2 = 1``, ``b = 0``.
        standardise: model ``z = (y - y_loc) / y_scale`` with the per-channel mean and
            standard deviation (``ddof=0``) of ``y`` (buffers ``y_loc``, ``y_scale``), so the
            fit is equivariant to ``y``'s units and offset; ``noise`` is in ``z``'s units,
            the objective and ``predict`` in ``y``'s. ``False``: ``z = y``.

    ``model()`` adds ``pyro.factor(f"kl_{l}", -nu_l KL_l)`` and observes ``y`` under the
    Gaussian marginal likelihood; ``guide()`` is empty (the Grams are point estimates),
    so ``-Trace_ELBO`` equals :meth:`objective`.
    """

    def __init__(self, X: Tensor, y: Tensor, *, depth: int = 2,
                 nu: float | Sequence[float] = 1.0, kernel: str | GramKernel | Sequence = "relu",
                 noise: float = 0.1, kl: str = "exact", lengthscale: float = 1.0,
                 gram_parameterisation: str = "cholesky", dtype: torch.dtype = torch.float64,
                 standardise: bool = True, input_ard: bool = False,
                 output_variance: bool = False):
        super().__init__()
        check_tensor(X, "X", ndim=2)
        check_tensor(y, "y", min_ndim=1)
        P = X.shape[0]
        if y.shape[0] != P or y.dim() > 2:
            raise ValueError(f"y must have shape ({P},) or ({P}, C), one row per row of X, got "
                             f"shape {tuple(y.shape)}")
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if not noise > 0:
            raise ValueError(f"noise must be positive, got {noise}")
        self.depth = depth
        self.out_channels = 1 if y.dim() == 1 else y.shape[1]
        self.likelihood_name = "gaussian"
        self.register_buffer("X_train", X.detach().to(dtype).clone())
        self.register_buffer("y_train", (y[:, None] if y.dim() == 1 else y).detach().to(dtype))
        # the targets are modelled as z = (y - y_loc) / y_scale (per channel; ddof=0)
        loc, scale = target_statistics(self.y_train)
        if not standardise:
            loc, scale = torch.zeros_like(loc), torch.ones_like(scale)
        self.register_buffer("y_loc", loc)
        self.register_buffer("y_scale", scale)
        nus = [float(v) for v in _per_layer(nu, depth, "nu")]
        kernels = _per_layer(kernel, depth + 1, "kernel")
        self.input_layer = InputGram(X.to(torch.float64), learn_inducing=False, ard=input_ard)
        self.kernel_layers = PyroModule[torch.nn.ModuleList](
            [KernelLayer(k, lengthscale=lengthscale) for k in kernels])
        self.gram_layers = PyroModule[torch.nn.ModuleList](
            [GramLayer(P, nu=v, kl=kl, parameterisation=gram_parameterisation) for v in nus])
        self.noise = PyroParam(torch.tensor(float(noise), dtype=torch.float64),
                               constraints.positive)
        self.learn_output_variance = bool(output_variance)
        if self.learn_output_variance:
            self.output_variance = PyroParam(torch.tensor(1.0, dtype=torch.float64),
                                             constraints.positive)
            self.output_bias = PyroParam(torch.tensor(0.1, dtype=torch.float64),
                                         constraints.positive)
        self.to(dtype)
        self.reset_to_nngp()

    @property
    def dtype(self) -> torch.dtype:
        return self.X_train.dtype

    def _z_train(self) -> Tensor:
        """The standardised training targets ``(y - y_loc) / y_scale`` ``(P, C)``."""
        return (self.y_train - self.y_loc) / self.y_scale

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts saved before target scaling existed hold no y_loc / y_scale
        for key, value in (("y_loc", 0.0), ("y_scale", 1.0)):
            state_dict.setdefault(prefix + key, torch.full_like(getattr(self, key), value))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reset_to_nngp(self) -> None:
        G = self._input_gram()
        for kern, gl in zip(self.kernel_layers, self.gram_layers):
            K = kern.kernel()(G)
            gl.reset_to_prior(K)
            G_tril = gl.factor(cholesky(K, name="K"))
            G = G_tril @ G_tril.mT

    def _input_gram(self) -> Tensor:
        return self.input_layer.inducing_gram()  # the training inputs are its inducing points

    @pyro_method
    def grams(self) -> tuple[list[Tensor], Tensor, list[Tensor]]:
        """Learned Grams ``[G_1..G_L]``, the output GP's kernel ``s2 K(G_L) + b`` and the
        per-layer KLs."""
        sync_param_store(self)
        G = self._input_gram()
        Gs, kls = [], []
        for kern, gl in zip(self.kernel_layers, self.gram_layers):
            K = kern.kernel()(G)
            K_tril = cholesky(K, name="K (kernel of the previous layer's Gram)")
            G_tril = gl.factor(K_tril)
            kls.append(gl.kl(K, G_tril, K_tril))
            G = G_tril @ G_tril.mT
            Gs.append(G)
        return Gs, self._output_kernel(self.kernel_layers[-1].kernel()(G)), kls

    def _output_kernel(self, K: Tensor) -> Tensor:
        """``s2 K + b`` (``K`` itself unless ``output_variance=True``)."""
        if not self.learn_output_variance:
            return K
        return self.output_variance * K + self.output_bias

    def _marginal_tril(self, K_top: Tensor) -> Tensor:
        eye = torch.eye(K_top.shape[-1], dtype=K_top.dtype, device=K_top.device)
        return cholesky(K_top + self.noise * eye, name="K + noise I")

    @pyro_method
    def objective(self) -> Tensor:
        """The exact DKM objective (closed form)."""
        _, K_top, kls = self.grams()
        L = self._marginal_tril(K_top)
        ll = gaussian_log_marginal(L, self._z_train().mT).sum()
        ll = ll - self.y_train.shape[0] * self.y_scale.log().sum()  # Jacobian of z(y)
        return ll - sum(gl.kl_weight * kl for gl, kl in zip(self.gram_layers, kls))

    @pyro_method
    def model(self, *args, **kwargs):
        _, K_top, kls = self.grams()
        for l, (kl, gl) in enumerate(zip(kls, self.gram_layers)):
            pyro.factor(f"kl_{l}", -gl.kl_weight * kl)
        L = self._marginal_tril(K_top)
        # y_c ~ N(y_loc_c, y_scale_c^2 (K + noise I)): the exact density of the raw targets
        loc = self.y_loc[:, None].expand(self.out_channels, L.shape[-1])
        tril = self.y_scale[:, None, None] * L
        return pyro.sample("obs", dist.MultivariateNormal(loc, scale_tril=tril).to_event(1),
                           obs=self.y_train.mT)

    def guide(self, *args, **kwargs):
        pass

    @torch.no_grad()
    @pyro_method
    def predict(self, X: Tensor, *, include_noise: bool = True, batch_size: int = 4096):
        """GP predictive (``torch.distributions.Normal``, ``(T,)`` or ``(T, C)``)."""
        check_tensor(X, "X", ndim=2)
        if X.shape[1] != self.X_train.shape[1]:
            raise ValueError(f"X must have {self.X_train.shape[1]} columns, got shape "
                             f"{tuple(X.shape)}")
        if X.shape[0] == 0:
            raise ValueError("X must have at least one row to predict at, got shape "
                             f"{tuple(X.shape)}")
        X = X.to(self.dtype)
        Gs, K_top, _ = self.grams()
        L = self._marginal_tril(K_top)
        alpha = cholesky_solve(L, self._z_train())  # (P, C)
        means, variances = [], []
        for s in range(0, X.shape[0], batch_size):
            G = self.input_layer(X[s:s + batch_size])
            for kern, gl in zip(self.kernel_layers, self.gram_layers):
                K = kern(G)
                K_tril = cholesky(K.ii, name="K (kernel of the previous layer's Gram)")
                G = propagate_gram(K, gl.factor(K_tril), K_tril)
            K = self.kernel_layers[-1](G)
            K_ti, K_tt = self._output_kernel(K.ti), self._output_kernel(K.t_diag)
            means.append(K_ti @ alpha)
            v = K_tt - tril_solve(L, K_ti.mT).pow(2).sum(-2)
            v = v.clamp_min(0) + (self.noise if include_noise else 0.0)
            variances.append(v[:, None].expand(-1, self.out_channels))
        mean = self.y_loc + self.y_scale * torch.cat(means)  # back to y's units
        var = self.y_scale.pow(2) * torch.cat(variances)
        if self.out_channels == 1:
            mean, var = mean[:, 0], var[:, 0]
        return torch.distributions.Normal(mean, var.sqrt())
