r"""Sparse deep kernel machine as a Pyro model (Yang et al., ICML 2023).

Objective (maximised; minibatch-unbiased)

.. math:: \mathcal L = \sum_t \mathbb E_{q(f_t)} \log p(y_t\mid f_t)
          - \sum_l \nu_l\,\mathrm{KL}\big(\mathcal N(0,G^l_{ii})\,\|\,
          \mathcal N(0,K(G^{l-1})_{ii})\big)
          - \sum_c \mathrm{KL}\big(q(u_c)\,\|\,\mathcal N(0,K(G^L)_{ii})\big).

``model`` adds ``pyro.factor(f"kl_{l}", -nu_l * KL_l)`` per learned Gram layer, samples
``u ~ N(0, K_ii)`` (site ``"u"``, event shape ``(C, M)``) and observes ``y`` inside
``pyro.plate("data", N, subsample_size=...)``; ``guide`` samples ``u ~ q(u)``. With
``TraceMeanField_ELBO`` the ELBO equals :meth:`DeepKernelMachine.objective` exactly
(Gaussian likelihood).
"""

from __future__ import annotations

import copy
import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import constraints, transform_to

from ..kernels.gram import GramKernel
from ..linalg import check_tensor, cholesky, cholesky_solve, solve_tril
from .gram_blocks import GramBlocks
from .layers import GramLayer, InputGram, KernelLayer, claim_param_store
from .output import SparseGPOutput, conditional_weights

__all__ = ["DeepKernelMachine", "select_inducing_points"]

LIKELIHOODS = ("gaussian", "categorical")


def select_inducing_points(X: Tensor, num_inducing: int, *, method: str = "kmeans",
                           seed: int = 0, iters: int = 25) -> Tensor:
    """Pick ``num_inducing`` inducing inputs from ``X`` ``(N, d)``: a random subset
    (``method="random"``) or k-means centres started from one (``"kmeans"``, default)."""
    check_tensor(X, "X", ndim=2)
    N = X.shape[0]
    if not isinstance(num_inducing, int) or num_inducing < 1:
        raise ValueError(f"num_inducing must be a positive int, got {num_inducing!r}")
    if num_inducing > N:
        raise ValueError(f"num_inducing ({num_inducing}) cannot exceed the number of rows of X "
                         f"({N})")
    if method not in ("kmeans", "random"):
        raise ValueError(f"method must be 'kmeans' or 'random', got {method!r}")
    g = torch.Generator().manual_seed(seed)
    Z = X[torch.randperm(N, generator=g)[:num_inducing]].clone()
    if method == "random":
        return Z
    for _ in range(iters):
        assign = torch.cdist(X, Z).argmin(1)
        counts = torch.bincount(assign, minlength=num_inducing).to(X.dtype)
        sums = torch.zeros_like(Z).index_add_(0, assign, X)
        keep = counts > 0  # empty clusters keep their centre
        Z[keep] = sums[keep] / counts[keep, None]
    return Z


def _per_layer(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(f"{name} must be a single value or a list of {n}, got {len(value)}")
        return list(value)
    return [value] * n


def _set_param(module: PyroModule, name: str, value: Tensor) -> None:
    """Set a PyroParam's value in place (keeps optimiser references valid)."""
    constraint = module._pyro_params[name][0]
    unconstrained = getattr(module, name + "_unconstrained")
    with torch.no_grad():
        unconstrained.copy_(transform_to(constraint).inv(value).to(unconstrained))


class DeepKernelMachine(PyroModule):
    r"""Sparse deep kernel machine.

    ``G_0 = X X^T/d -> K_1 = k_1(G_0) -> G_1 (learned) -> ... -> G_L -> K(G_L) -> GP output``.

    Args:
        inducing_points: ``(M, d)`` initial inducing inputs (e.g. from
            :func:`select_inducing_points`).
        depth: number ``L >= 0`` of learned Gram layers.
        nu: :math:`\nu_l > 0`, one float or a list of ``L``.
        kernel: Gram kernel per kernel layer: a name in
            :data:`~pyro_dkm.dkm.layers.KERNELS` or a ``GramKernel``; one value or a list
            of ``L + 1`` (the last one feeds the output GP).
        out_channels: output channels ``C`` (Gaussian); for ``"categorical"`` the number
            of classes (default 2 if left at 1).
        likelihood: ``"gaussian"`` (learned noise variance ``noise``) or ``"categorical"``
            (softmax, Monte Carlo over ``num_likelihood_samples`` draws of ``f``).
        noise: initial Gaussian noise variance.
        kl: ``"exact"`` or ``"taylor"`` KL for the Gram layers.
        learn_inducing: learn the inducing inputs.
        shared_covariance: one ``S`` for all channels (default) or one per channel.
        analytic_expectation: compute the likelihood term under the marginal ``q(f_t)``
            (reads ``q(u)``'s parameters in the model, as ``pyro.contrib.gp`` does; exact
            ELBO with ``TraceMeanField_ELBO``); if False use the sampled ``u`` (a pure
            generative model, an unbiased Monte-Carlo ELBO).
        lengthscale: initial lengthscale of named kernels that have one.
        gram_parameterisation: ``"cholesky"`` (``G_ii = V V^T``, initialised at
            ``chol(K_ii)``) or ``"whitened"`` (``G_ii = L_K V V^T L_K^T``, ``V = I`` at the
            start; better conditioned for large ``nu``); see :class:`GramLayer`.
        input_ard: learn one input lengthscale per feature, ``G_0 = (X/l)(Z/l)^T / d``
            (``input_layer.input_lengthscale``, a ``PyroParam``).
        dtype: parameter dtype (default float64); inputs are cast to it.

    Hyper-parameters (``noise``, kernel ``lengthscale``s) are ``PyroParam``; replace any with
    a ``PyroSample`` prior (and give it a guide, e.g. with ``AutoGuideList``).
    """

    def __init__(
        self,
        inducing_points: Tensor,
        *,
        depth: int = 2,
        nu: float | Sequence[float] = 1.0,
        kernel: str | GramKernel | Sequence = "relu",
        out_channels: int = 1,
        likelihood: str = "gaussian",
        noise: float = 0.1,
        kl: str = "exact",
        learn_inducing: bool = True,
        shared_covariance: bool = True,
        analytic_expectation: bool = True,
        num_likelihood_samples: int = 8,
        lengthscale: float = 1.0,
        gram_parameterisation: str = "cholesky",
        input_ard: bool = False,
        dtype: torch.dtype = torch.float64,
    ):
        super().__init__()
        check_tensor(inducing_points, "inducing_points", ndim=2)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if likelihood not in LIKELIHOODS:
            raise ValueError(f"likelihood must be one of {LIKELIHOODS}, got {likelihood!r}")
        if likelihood == "categorical" and out_channels == 1:
            out_channels = 2
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if likelihood == "categorical" and out_channels < 2:
            raise ValueError("a categorical likelihood needs out_channels >= 2 classes")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
        if not noise > 0:
            raise ValueError(f"noise must be positive, got {noise}")
        M = inducing_points.shape[0]
        if M < 1:
            raise ValueError("inducing_points must hold at least one inducing point")
        self._config = dict(depth=depth, nu=nu, kernel=kernel, out_channels=out_channels,
                            likelihood=likelihood, noise=noise, kl=kl,
                            learn_inducing=learn_inducing, shared_covariance=shared_covariance,
                            analytic_expectation=analytic_expectation,
                            num_likelihood_samples=num_likelihood_samples,
                            lengthscale=lengthscale,
                            gram_parameterisation=gram_parameterisation,
                            input_ard=input_ard, dtype=dtype)
        self.depth = depth
        self.num_inducing = M
        self.out_channels = out_channels
        self.likelihood = likelihood
        self.analytic_expectation = bool(analytic_expectation)
        self.num_likelihood_samples = int(num_likelihood_samples)
        nus = [float(v) for v in _per_layer(nu, depth, "nu")]
        kernels = _per_layer(kernel, depth + 1, "kernel")
        self.input_layer = InputGram(inducing_points.to(torch.float64), learn_inducing,
                                     ard=input_ard)
        self.kernel_layers = PyroModule[torch.nn.ModuleList](
            [KernelLayer(k, lengthscale=lengthscale) for k in kernels])
        self.gram_layers = PyroModule[torch.nn.ModuleList](
            [GramLayer(M, nu=v, kl=kl, parameterisation=gram_parameterisation) for v in nus])
        self.output = SparseGPOutput(M, out_channels, shared_covariance)
        if likelihood == "gaussian":
            self.noise = PyroParam(torch.tensor(float(noise), dtype=torch.float64),
                                   constraints.positive)
        self.to(dtype)
        self.reset_to_nngp()

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (follows ``.to()`` / ``.double()``)."""
        return self.input_layer.inducing_points.dtype

    @property
    def nu(self) -> list[float]:
        return [layer.nu for layer in self.gram_layers]

    @torch.no_grad()
    def reset_to_nngp(self) -> None:
        """Set every learned Gram to the NNGP value ``K(G_{l-1})_ii`` and ``q(u)`` to the
        prior ``N(0, K_ii)`` (the initial state)."""
        claim_param_store(self)
        G = self.input_layer(self.input_layer.inducing_points[:1])
        for kern, gl in zip(self.kernel_layers, self.gram_layers):
            K = kern(G)
            gl.reset_to_prior(K.ii)
            G, _ = gl(K)
        K = self.kernel_layers[-1](G)
        K_tril = cholesky(K.ii, name="K_ii (top-layer kernel at the inducing points)")
        _set_param(self.output, "u_loc", torch.zeros_like(self.output.u_loc))
        S = K_tril if self.output.shared_covariance else K_tril.expand(
            self.out_channels, -1, -1)
        _set_param(self.output, "u_scale_tril", S)

    def _check_X(self, X, name: str = "X") -> Tensor:
        check_tensor(X, name, ndim=2)
        d = self.input_layer.input_dim
        if X.shape[1] != d:
            raise ValueError(f"{name} must have {d} columns (the inducing points' input "
                             f"dimension), got shape {tuple(X.shape)}")
        if X.shape[0] < 1:
            raise ValueError(f"{name} must have at least one row")
        return X.to(device=self.input_layer.inducing_points.device, dtype=self.dtype)

    def _check_y(self, y, N: int, name: str = "y") -> Tensor | None:
        """Returns ``(N, C)`` floats (Gaussian) or ``(N,)`` class indices (categorical)."""
        if y is None:
            return None
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.shape[0:1] != (N,):
            raise ValueError(f"{name} must have {N} rows, one per row of X, got shape "
                             f"{tuple(y.shape)}")
        if self.likelihood == "categorical":
            if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{name} must be a 1-d integer tensor of class indices for a "
                                f"categorical likelihood, got dtype {y.dtype}, shape "
                                f"{tuple(y.shape)}")
            C = self.out_channels
            if bool(((y < 0) | (y >= C)).any()):
                raise ValueError(f"{name} holds class indices outside [0, {C - 1}] "
                                 f"(min {int(y.min())}, max {int(y.max())})")
            return y.long().to(self.input_layer.inducing_points.device)
        check_tensor(y, name)
        C = self.out_channels
        if y.dim() == 1 and C == 1:
            return y.to(device=self.input_layer.inducing_points.device,
                        dtype=self.dtype)[:, None]
        if y.dim() != 2 or y.shape[1] != C:
            raise ValueError(f"{name} must have shape (N,) or (N, {C}) for {C} output "
                             f"channel(s), got shape {tuple(y.shape)}")
        return y.to(device=self.input_layer.inducing_points.device, dtype=self.dtype)

    @pyro_method
    def forward_blocks(self, X: Tensor) -> tuple[GramBlocks, Tensor, list[Tensor]]:
        """Top-layer kernel blocks at inducing points and rows of ``X``, the Cholesky
        factor of their ``K_ii`` and the per-layer (unweighted) KLs."""
        G = self.input_layer(X)
        kls = []
        for kern, gl in zip(self.kernel_layers, self.gram_layers):
            G, kl = gl(kern(G))
            kls.append(kl)
        K = self.kernel_layers[-1](G)
        K_tril = cholesky(K.ii, name="K_ii (top-layer kernel at the inducing points)")
        return K, K_tril, kls

    @pyro_method
    def latent_marginals(self, X: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and variance ``(T, C)`` of ``q(f)`` at the rows of ``X``."""
        K, K_tril, _ = self.forward_blocks(X)
        return self.output.marginals(*conditional_weights(K, K_tril))

    def expected_log_likelihood(self, mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``E_{N(f; mean, var)} log p(y | f)`` per point ``(T,)`` (Gaussian: closed form;
        categorical: Monte Carlo)."""
        if self.likelihood == "gaussian":
            noise = self.noise
            return (-0.5 * math.log(2 * math.pi) - 0.5 * noise.log()
                    - 0.5 * ((y - mean).pow(2) + var) / noise).sum(-1)
        S = self.num_likelihood_samples
        f = mean + var.sqrt() * torch.randn((S,) + mean.shape, dtype=mean.dtype,
                                            device=mean.device)
        logp = torch.log_softmax(f, -1)  # (S, T, C)
        return logp.gather(-1, y[None, :, None].expand(S, -1, 1)).squeeze(-1).mean(0)

    # ------------------------------------------------------------------ Pyro
    @pyro_method
    def model(self, X: Tensor, y: Tensor | None = None, *, subsample_size: int | None = None,
              num_data: int | None = None):
        """Pyro model. ``X`` ``(N, d)``; ``y`` ``(N,)``/``(N, C)`` floats or ``(N,)`` classes.

        ``subsample_size``: draw a random minibatch of ``X`` inside the plate;
        ``num_data``: ``X``/``y`` already are a minibatch of a data set of this size.
        """
        claim_param_store(self)
        X = self._check_X(X)
        N = X.shape[0]
        y = self._check_y(y, N)
        if num_data is None:
            data_plate = pyro.plate("data", N, subsample_size=subsample_size, device=X.device)
        else:
            if num_data < N:
                raise ValueError(f"num_data ({num_data}) must be >= the batch size ({N})")
            data_plate = pyro.plate("data", int(num_data), subsample=torch.arange(N),
                                    device=X.device)
        with data_plate as idx:
            pass
        Xb = X[idx]
        yb = None if y is None else y[idx]
        K, K_tril, kls = self.forward_blocks(Xb)
        for l, (kl, layer) in enumerate(zip(kls, self.gram_layers)):
            pyro.factor(f"kl_{l}", -layer.nu * kl)
        u = pyro.sample("u", self.output.prior(K_tril))
        W, resid = conditional_weights(K, K_tril)
        mean, var = self.output.marginals(W, resid, None if self.analytic_expectation else u)
        # hyper-parameters are read outside the plate (a PyroSample prior is global)
        noise = self.noise if self.likelihood == "gaussian" else None
        with data_plate:
            return self._observe(mean, var, yb, noise)

    def _observe(self, mean: Tensor, var: Tensor, y: Tensor | None, noise: Tensor | None):
        if self.likelihood == "gaussian":
            if y is None:
                return pyro.sample("obs", dist.Normal(mean, (var + noise).sqrt()).to_event(1))
            pyro.sample("obs", dist.Normal(mean, noise.sqrt()).to_event(1), obs=y)
            # E_q log N(y | f, noise) = log N(y | mean, noise) - var / (2 noise)
            pyro.factor("obs_var", -0.5 * (var / noise).sum(-1))
            return y
        if y is None:
            f = mean + var.sqrt() * torch.randn_like(mean)
            return pyro.sample("obs", dist.Categorical(logits=f))
        pyro.factor("obs", self.expected_log_likelihood(mean, var, y))
        return y

    @pyro_method
    def guide(self, X: Tensor, y: Tensor | None = None, **kwargs):
        """Pyro guide: ``u ~ q(u) = N(u_loc, u_scale_tril u_scale_tril^T)`` per channel.
        Returns ``{"u": sample}`` like an AutoGuide, so it composes in ``AutoGuideList``
        (wrapped in ``AutoCallable``)."""
        claim_param_store(self)
        return {"u": pyro.sample("u", self.output.posterior())}

    # ------------------------------------------------------------------ closed forms
    @pyro_method
    def objective(self, X: Tensor, y: Tensor, *, num_data: int | None = None) -> Tensor:
        """The sparse DKM objective (closed form for a Gaussian likelihood, Monte-Carlo
        likelihood term for categorical). ``num_data=N``: ``X, y`` are a minibatch of a
        data set of ``N`` points and the likelihood term is scaled by ``N / len(X)`` (an
        unbiased estimate; equal to ``-TraceMeanField_ELBO`` of the model on that batch)."""
        claim_param_store(self)
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        if num_data is not None and num_data < X.shape[0]:
            raise ValueError(f"num_data ({num_data}) must be >= the batch size ({X.shape[0]})")
        return self._objective(X, y, num_data)

    @pyro_method
    def _objective(self, X: Tensor, y: Tensor, num_data: int | None) -> Tensor:
        """:meth:`objective` without argument checks (``X``, ``y`` already validated)."""
        K, K_tril, kls = self.forward_blocks(X)
        mean, var = self.output.marginals(*conditional_weights(K, K_tril))
        ell = self.expected_log_likelihood(mean, var, y).sum()
        if num_data is not None:
            ell = ell * (num_data / X.shape[0])
        kl_u = self.output.kl_to_prior(K_tril)
        return ell - sum(layer.nu * kl for layer, kl in zip(self.gram_layers, kls)) - kl_u

    @torch.no_grad()
    @pyro_method
    def init_q(self, X: Tensor, y: Tensor, *, batch_size: int = 4096) -> None:
        r"""Set ``q(u)`` to its optimum for the current Grams and noise (Gaussian
        likelihood; Titsias 2009): :math:`S = K (K + \sigma^{-2}K_{it}K_{ti})^{-1} K`,
        :math:`m_c = \sigma^{-2} S K^{-1} K_{it} y_c`. ``O(N M^2)``."""
        if self.likelihood != "gaussian":
            raise ValueError("init_q needs a Gaussian likelihood")
        claim_param_store(self)
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        s2 = self.noise
        M = self.num_inducing
        AAt = X.new_zeros(M, M)
        Ay = X.new_zeros(M, y.shape[1])
        for start in range(0, X.shape[0], batch_size):  # O(batch_size * M) memory
            K, K_tril, _ = self.forward_blocks(X[start:start + batch_size])
            A = solve_tril(K_tril, K.ti.mT)  # (M, b)
            AAt += A @ A.mT
            Ay += A @ y[start:start + batch_size]
        B = torch.eye(M, dtype=A.dtype, device=A.device) + AAt / s2
        L_B = cholesky(B, name="I + A A^T / noise")
        m = K_tril @ cholesky_solve(L_B, Ay) / s2  # (M, C)
        T = solve_tril(L_B, K_tril.mT)  # L_B^-1 L_K^T
        S_tril = cholesky(T.mT @ T, name="S")
        _set_param(self.output, "u_loc", m.mT)
        if not self.output.shared_covariance:
            S_tril = S_tril.expand(self.out_channels, M, M)
        _set_param(self.output, "u_scale_tril", S_tril)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    @pyro_method
    def predict(self, X: Tensor, *, include_noise: bool = True, batch_size: int = 4096,
                num_samples: int = 64):
        """Predictive at the rows of ``X`` ``(T, d)``, computed in batches.

        Gaussian: a ``torch.distributions.Normal`` with ``loc``/``scale`` ``(T,)`` (one
        channel) or ``(T, C)``; ``include_noise=False`` gives the latent ``f``.
        Categorical: ``(T, C)`` class probabilities averaged over ``num_samples`` draws of
        ``f`` from its marginal.
        """
        claim_param_store(self)
        X = self._check_X(X)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        means, variances = [], []
        for start in range(0, X.shape[0], batch_size):
            mean, var = self.latent_marginals(X[start:start + batch_size])
            if self.likelihood == "categorical":
                f = mean + var.sqrt() * torch.randn((num_samples,) + mean.shape,
                                                    dtype=mean.dtype, device=mean.device)
                means.append(torch.softmax(f, -1).mean(0))
                continue
            means.append(mean)
            variances.append(var + self.noise if include_noise else var)
        if self.likelihood == "categorical":
            return torch.cat(means)
        mean, var = torch.cat(means), torch.cat(variances)
        if self.out_channels == 1:
            mean, var = mean[:, 0], var[:, 0]
        return torch.distributions.Normal(mean, var.clamp_min(0).sqrt())

    # ------------------------------------------------------------------ persistence
    def save(self, path) -> None:
        """Save constructor arguments and ``state_dict`` (reload with :meth:`load`)."""
        config = dict(self._config)
        config["inducing_points"] = self.input_layer.inducing_points.detach().clone()
        torch.save({"config": config, "state_dict": self.state_dict()}, path)

    @classmethod
    def load(cls, path, map_location=None) -> "DeepKernelMachine":
        blob = torch.load(path, map_location=map_location, weights_only=False)
        config = copy.copy(blob["config"])
        Z = config.pop("inducing_points")
        model = cls(Z, **config)
        model.load_state_dict(blob["state_dict"])
        return model
