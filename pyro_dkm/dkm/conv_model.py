r"""Convolutional deep kernel machine: the model (layers in :mod:`pyro_dkm.dkm.conv`).

``X (B, C, L)`` or ``(B, C, H, W)`` -> :class:`~pyro_dkm.dkm.conv.ConvInput` (inducing
patches) -> learned Gram -> [batch norm] -> ReLU kernel -> :class:`~pyro_dkm.dkm.conv.ConvMix`
-> [pool] -> learned Gram -> ... -> ReLU, global average pooling, dense read-out -> sparse
GP output (softmax for classes). The objective is the DKM's,

.. math:: \mathcal L = \sum_t \mathbb E_{q(f_t)} \log p(y_t\mid f_t)
          - \sum_l \nu_l\,\mathrm{KL}(\mathcal N(0,G^l_{ii})\,\|\,\mathcal N(0,K^l_{ii}))
          - \mathrm{KL}(q(u)\,\|\,p(u)),

and everything a :class:`~pyro_dkm.dkm.DeepKernelMachine` offers works unchanged: the
Pyro ``model``/``guide`` (two DKMs in one model, user plates), ``objective``, ``predict``,
:func:`~pyro_dkm.dkm.fit`.
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import torch
from pyro.nn import PyroModule
from torch import Tensor

from ..kernels.gram import GramKernel
from ..likelihoods import Categorical, Gaussian, TemperedCategorical, as_likelihood
from ..linalg import check_tensor, cholesky
from .conv import (
    ConvGramLayer,
    ConvInput,
    ConvKernel,
    ConvMix,
    GlobalAvgPoolHead,
    GramBatchNorm,
    GramPool,
    run_layers,
)
from .model import DeepKernelMachine, _per_layer, _set_param
from .output import SparseGPOutput

__all__ = ["ConvDeepKernelMachine"]


class ConvDeepKernelMachine(DeepKernelMachine):
    r"""Convolutional DKM (1-D sequences or 2-D images).

    Args:
        inducing_patches: ``(P, C, q_1)`` (1-D) or ``(P, C, q_1, q_1)`` (2-D) initial
            inducing patches (e.g. :func:`~pyro_dkm.dkm.conv.select_inducing_patches`); their
            width is the first layer's filter width.
        filters: widths ``(q_2, ..)`` (odd) of the later convolutions; the DKM has
            ``1 + len(filters)`` learned Gram layers.
        pool: average-pooling window after each learned Gram layer (one int or one per
            layer; 1 = none).
        nu: :math:`\nu_l` per learned Gram layer (one float or a list); ``float("inf")``
            holds a Gram at its prior (the conv NNGP kernel machine).
        out_channels: classes (categorical) or output channels (Gaussian).
        likelihood: ``"tempered_categorical"`` (default: softmax of ``f / T``, ``T``
            learned), ``"categorical"``, ``"gaussian"`` or any likelihood object.
        kernel: the nonlinearity's Gram kernel (``"relu"``, ``"erf"`` or a ``GramKernel``).
        weight_var, bias_var: convolution weight / bias variances (one value or one per
            convolution), ``head_weight_var`` / ``head_bias_var`` those of the read-out.
        batch_norm: batch norm on the Grams after every learned Gram layer.
        skr_dof: stochastic kernel regularisation: Wishart degrees of freedom of the
            training-mode draws of every inducing Gram (``None``: off).
        gram_parameterisation: ``"whitened"`` (default here: the KL does not depend on the
            inducing patches; with the Cholesky form the first Adam steps on MNIST-1D
            gave KL spikes of ~1e4 nats per point) or
            ``"cholesky"``; see :class:`~pyro_dkm.dkm.layers.GramLayer`.
        kl: ``"exact"`` or ``"taylor"`` KL of the Gram layers; noise,
            num_likelihood_samples, shared_covariance, analytic_expectation, dtype, name:
            as for :class:`~pyro_dkm.dkm.DeepKernelMachine`.
        checkpoint: recompute each layer in the backward pass (bounded memory).
        readout: ``"gap"`` (global average pooling, default) or ``"flatten"`` (a dense
            read-out of every position, like a CNN's; needs ``spatial_shape``).
        spatial_shape: the inputs' spatial size, ``(L,)`` or ``(H, W)``.
    """

    def __init__(
        self,
        inducing_patches: Tensor,
        *,
        filters: Sequence[int] = (3, 3),
        pool=1,
        nu=1.0,
        out_channels: int = 10,
        likelihood="tempered_categorical",
        kernel="relu",
        weight_var=1.0,
        bias_var=0.0,
        head_weight_var: float = 1.0,
        head_bias_var: float = 0.0,
        batch_norm: bool = False,
        skr_dof: int | None = None,
        kl: str = "exact",
        gram_parameterisation: str = "whitened",
        noise: float = 0.1,
        num_likelihood_samples: int = 8,
        shared_covariance: bool = True,
        analytic_expectation: bool = True,
        learn_inducing: bool = True,
        checkpoint: bool = False,
        readout: str = "gap",
        spatial_shape: Sequence[int] | None = None,
        dtype: torch.dtype = torch.float64,
        name: str = "",
    ):
        # (not DeepKernelMachine.__init__: that builds the dense layers)
        PyroModule.__init__(self, name=name)
        check_tensor(inducing_patches, "inducing_patches", min_ndim=3)
        filters = list(filters)
        depth = 1 + len(filters)
        if likelihood == "gaussian":
            lik = Gaussian(noise)
        elif likelihood == "categorical":
            lik = Categorical(num_samples=num_likelihood_samples)
        elif likelihood == "tempered_categorical":
            lik = TemperedCategorical(num_samples=num_likelihood_samples)
        else:
            lik = as_likelihood(likelihood)
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if isinstance(lik, Categorical) and out_channels < 2:
            raise ValueError("a categorical likelihood needs out_channels >= 2 classes")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not isinstance(kernel, (str, GramKernel)):
            raise TypeError(f"kernel must be a name or a GramKernel, got {type(kernel).__name__}")
        P = inducing_patches.shape[0]
        self._config = dict(filters=filters, pool=pool, nu=nu, out_channels=out_channels,
                            likelihood=likelihood, kernel=kernel, weight_var=weight_var,
                            bias_var=bias_var, head_weight_var=head_weight_var,
                            head_bias_var=head_bias_var, batch_norm=batch_norm,
                            skr_dof=skr_dof, kl=kl,
                            gram_parameterisation=gram_parameterisation, noise=noise,
                            num_likelihood_samples=num_likelihood_samples,
                            shared_covariance=shared_covariance,
                            analytic_expectation=analytic_expectation,
                            learn_inducing=learn_inducing, checkpoint=checkpoint,
                            readout=readout, spatial_shape=spatial_shape,
                            dtype=dtype, name=name)
        self.depth = depth
        self.num_inducing = P
        self.out_channels = out_channels
        self.likelihood = lik
        self.analytic_expectation = bool(analytic_expectation)
        self.num_likelihood_samples = int(num_likelihood_samples)
        self.use_checkpoint = bool(checkpoint)
        nus = [float(v) for v in _per_layer(nu, depth, "nu")]
        pools = [int(v) for v in _per_layer(pool, depth, "pool")]
        wv = [float(v) for v in _per_layer(weight_var, depth, "weight_var")]
        bv = [float(v) for v in _per_layer(bias_var, depth, "bias_var")]
        self.input_layer = ConvInput(inducing_patches.to(torch.float64), wv[0], bv[0],
                                     learn_inducing=learn_inducing)
        ndim = self.input_layer.ndim
        layers = [self.input_layer]
        grams = []
        for l in range(depth):
            if l > 0:
                layers += [ConvKernel(kernel),
                           ConvMix(filters[l - 1], P, ndim=ndim, weight_var=wv[l],
                                   bias_var=bv[l], seed=l)]
            gl = ConvGramLayer(P, nu=nus[l], kl=kl, parameterisation=gram_parameterisation,
                               skr_dof=skr_dof)
            grams.append(gl)
            layers.append(gl)
            if batch_norm:
                layers.append(GramBatchNorm())
            if pools[l] > 1:
                layers.append(GramPool(pools[l]))
        self.layers = torch.nn.ModuleList(layers)
        self.gram_layers = [m for m in layers if isinstance(m, ConvGramLayer)]
        positions = None
        self._spatial_shape = None if spatial_shape is None else tuple(int(v) for v in
                                                                       spatial_shape)
        if readout == "flatten":
            if spatial_shape is None:
                raise ValueError("readout='flatten' needs spatial_shape (the inputs' spatial "
                                 "size, e.g. (40,))")
            sizes = [int(v) for v in spatial_shape]
            for p in pools:
                if any(n % p for n in sizes):
                    raise ValueError(f"spatial_shape {tuple(spatial_shape)} is not divisible "
                                     f"by the pooling windows {pools}")
                sizes = [n // p for n in sizes]
            positions = math.prod(sizes)
        self.head = GlobalAvgPoolHead(P, kernel, head_weight_var, head_bias_var,
                                      readout=readout, num_positions=positions)
        self.output = SparseGPOutput(P, out_channels, shared_covariance)
        self.register_buffer("y_loc", torch.zeros(out_channels, dtype=torch.float64))
        self.register_buffer("y_scale", torch.ones(out_channels, dtype=torch.float64))
        self.to(dtype)
        self.reset_to_nngp()

    # the Gram layers are held by self.layers; expose them as a plain list (not a second
    # registration of the same modules)
    def __setattr__(self, name, value):
        if name == "gram_layers":
            object.__setattr__(self, name, value)
            return
        super().__setattr__(name, value)

    @property
    def dtype(self) -> torch.dtype:
        return self.input_layer.inducing_points.dtype

    @property
    def spatial_shape(self) -> tuple | None:
        return getattr(self, "_spatial_shape", None)

    def _check_X(self, X, name: str = "X") -> Tensor:
        nd = self.input_layer.ndim + 2
        check_tensor(X, name, ndim=nd)
        C = self.input_layer.in_channels
        if X.shape[1] != C:
            raise ValueError(f"{name} must have {C} channels (dimension 1, like the inducing "
                             f"patches), got shape {tuple(X.shape)}")
        if X.shape[0] < 1:
            raise ValueError(f"{name} must have at least one row")
        if self._spatial_shape is not None and tuple(X.shape[2:]) != self._spatial_shape:
            raise ValueError(f"{name} must have spatial shape {self._spatial_shape} (the "
                             f"model's spatial_shape), got shape {tuple(X.shape)}")
        return X.to(device=self.input_layer.inducing_points.device, dtype=self.dtype)

    def forward_blocks(self, X: Tensor):
        G, kls = run_layers(self.layers, X, self.use_checkpoint)
        K = self.head(G)
        K_tril = cholesky(K.ii, name="K_ii (top-layer kernel at the inducing points)")
        return K, K_tril, kls

    def hidden_grams(self, X: Tensor) -> list:
        """The learned :class:`~pyro_dkm.dkm.conv.ConvGram` of every Gram layer at ``X``
        (evaluation mode: no SKR draws, running batch-norm statistics)."""
        X = self._check_X(X)
        out, G = [], X
        was = self.training
        self.eval()
        try:
            with torch.no_grad():
                for layer in self.layers:
                    G = layer(G)
                    if isinstance(layer, ConvGramLayer):
                        G = G[0]
                        out.append(G)
        finally:
            self.train(was)
        return out

    @torch.no_grad()
    def reset_to_nngp(self) -> None:
        """Every learned inducing Gram at its prior ``K_ii`` and ``q(u)`` at ``p(u)``."""
        Z = self.input_layer.inducing_points[:1]
        # a dummy image: only the inducing blocks matter here (its spatial size: the
        # inputs' when given, else the smallest the pooling windows permit)
        was = self.training
        self.eval()
        try:
            shape = self._spatial_shape or (self._dummy_size(),) * self.input_layer.ndim
            X = torch.zeros((1, Z.shape[1]) + shape, dtype=Z.dtype, device=Z.device)
            G = X
            for layer in self.layers:
                if isinstance(layer, ConvGramLayer):
                    layer.reset_to_prior(G.ii)
                    G = layer(G)[0]
                else:
                    G = layer(G)
            K = self.head(G)
        finally:
            self.train(was)
        K_tril = cholesky(K.ii, name="K_ii (top-layer kernel at the inducing points)")
        _set_param(self.output, "u_loc", torch.zeros_like(self.output.u_loc))
        S = K_tril if self.output.shared_covariance else K_tril.expand(
            self.out_channels, -1, -1)
        _set_param(self.output, "u_scale_tril", S)

    def _dummy_size(self) -> int:
        n = 1
        for layer in self.layers:
            if isinstance(layer, GramPool):
                n *= layer.p
        return n

    def predict(self, X: Tensor, **kwargs):
        """As :meth:`DeepKernelMachine.predict`, in evaluation mode (no SKR draws, running
        batch-norm statistics); the training mode is restored after."""
        was = self.training
        self.eval()
        try:
            return super().predict(X, **kwargs)
        finally:
            self.train(was)

    def init_q(self, *args, **kwargs):
        return super().init_q(*args, **kwargs)

    def save(self, path) -> None:
        config = dict(self._config)
        config["inducing_patches"] = self.input_layer.inducing_points.detach().clone()
        torch.save({"config": config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location=None) -> "ConvDeepKernelMachine":
        blob = torch.load(path, map_location=map_location, weights_only=False)
        config = copy.copy(blob["config"])
        Z = config.pop("inducing_patches")
        model = cls(Z, **config)
        model.load_state_dict(blob["state_dict"])
        return model
