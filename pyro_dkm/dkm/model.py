r"""Sparse deep kernel machine as a Pyro model (Yang et al., ICML 2023).

Objective (maximised; minibatch-unbiased)

.. math:: \mathcal L = \sum_t \mathbb E_{q(f_t)} \log p(y_t\mid f_t)
          - \sum_l \nu_l\,\mathrm{KL}\big(\mathcal N(0,G^l_{ii})\,\|\,
          \mathcal N(0,K(G^{l-1})_{ii})\big)
          - \sum_c \mathrm{KL}\big(q(u_c)\,\|\,\mathcal N(0,K(G^L)_{ii})\big).

The DKM is a *latent function*: inside any Pyro model, ``f = dkm(X)`` adds
``pyro.factor("<prefix>.kl_{l}", -nu_l * KL_l)`` per learned Gram layer, samples
``u ~ N(0, K_ii)`` (site ``"<prefix>.u"``, event shape ``(C, M)``) and returns the latent
marginal ``Normal`` at the rows of ``X``; ``dkm.guide(X)`` samples ``u ~ q(u)``. The
caller observes ``y`` under any :mod:`~pyro_dkm.likelihoods` object inside its own
plate. :meth:`DeepKernelMachine.model` is exactly that with the DKM's own likelihood
and a ``pyro.plate("<prefix>.data", N, subsample_size=...)``; with
``TraceMeanField_ELBO`` its ELBO equals :meth:`DeepKernelMachine.objective` exactly
(Gaussian likelihood). The constructor runs no Pyro code, so any number of DKMs can
live in one parent ``PyroModule`` (their Pyro names follow the attribute path).
"""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import pyro
import torch
from pyro.nn import PyroModule
from pyro.nn.module import pyro_method
from torch import Tensor
from torch.distributions import transform_to

from .._pyro import sync_param_store
from .._training import target_statistics
from ..kernels.gram import GramKernel
from ..likelihoods import Categorical, Gaussian, Likelihood, StudentT, as_likelihood
from ..linalg import check_tensor, cholesky, cholesky_solve, tril_solve
from .gram_blocks import GramBlocks
from .inducing import select_inducing_points
from .layers import GramLayer, InputGram, KernelLayer
from .output import SparseGPOutput, conditional_weights

__all__ = ["DeepKernelMachine", "select_inducing_points", "outside_data_plates"]


def outside_data_plates(what: str) -> None:
    """Raise if called inside a ``pyro.plate`` (other than Pyro's particle plate): a
    global site there would be broadcast over, and scaled by, the plate."""
    frames = [f for f in pyro.poutine.runtime.get_plates()
              if not f.name.startswith("num_particles")]
    if frames:
        raise ValueError(
            f"{what} must be called outside pyro.plate (found plate {frames[-1].name!r}): "
            f"its KL factors and inducing outputs are global sites. Call it on the batch "
            f"first, then observe y under the likelihood inside your plate.")


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
        nu: :math:`\nu_l > 0`, one float or a list of ``L``; ``float("inf")`` holds that
            layer's Gram at its prior (no Gram parameters, no KL: the NNGP limit).
        kernel: Gram kernel per kernel layer: a name in
            :data:`~pyro_dkm.dkm.layers.KERNELS` or a ``GramKernel``; one value or a list
            of ``L + 1`` (the last one feeds the output GP).
        out_channels: output channels ``C`` (Gaussian); for ``"categorical"`` the number
            of classes (default 2 if left at 1).
        likelihood: a :class:`~pyro_dkm.likelihoods.Likelihood` (``Gaussian``,
            ``StudentT``, ``Bernoulli``, ``Poisson``, ``Categorical``, or any
            ``FunctionLikelihood``), a name of one, or a callable ``f -> Distribution``.
            ``"gaussian"`` gets variance ``noise``; ``"categorical"`` a softmax with
            ``num_likelihood_samples`` Monte-Carlo draws. Used by :meth:`model`,
            :meth:`objective` and :meth:`predict`; :meth:`forward` (the latent function)
            does not use it.
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
        name: Pyro name prefix when the DKM is a root module (e.g. two DKMs held by a
            plain ``nn.Module``); inside a parent ``PyroModule`` the attribute path is used.

    Hyper-parameters (``noise``, i.e. ``likelihood.variance``, kernel ``lengthscale``s) are
    ``PyroParam``; replace any with a ``PyroSample`` prior (and give it a guide, e.g. with
    ``AutoGuideList``).

    As a latent function inside a bigger model (``self.mean_dkm = DeepKernelMachine(...)``
    in a ``PyroModule``): ``f = self.mean_dkm(X_batch)`` in the model (outside the data
    plate) and ``self.mean_dkm.guide(X_batch)`` in the guide.
    """

    def __init__(
        self,
        inducing_points: Tensor,
        *,
        depth: int = 2,
        nu: float | Sequence[float] = 1.0,
        kernel: str | GramKernel | Sequence = "relu",
        out_channels: int = 1,
        likelihood: "str | Likelihood | Callable" = "gaussian",
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
        name: str = "",
    ):
        super().__init__(name=name)
        check_tensor(inducing_points, "inducing_points", ndim=2)
        if not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if likelihood == "gaussian":
            if not noise > 0:
                raise ValueError(f"noise must be positive, got {noise}")
            lik = Gaussian(noise)
        elif likelihood == "categorical":
            lik = Categorical(num_samples=num_likelihood_samples)
        else:
            lik = as_likelihood(likelihood)
        if isinstance(lik, Categorical) and out_channels == 1:
            out_channels = 2
        if not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"out_channels must be a positive int, got {out_channels!r}")
        if isinstance(lik, Categorical) and out_channels < 2:
            raise ValueError("a categorical likelihood needs out_channels >= 2 classes")
        if dtype not in (torch.float32, torch.float64):
            raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
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
                            input_ard=input_ard, dtype=dtype, name=name)
        self.depth = depth
        self.num_inducing = M
        self.out_channels = out_channels
        self.likelihood = lik
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
        # targets are modelled as (y - y_loc) / y_scale (identity unless set_target_scaling)
        self.register_buffer("y_loc", torch.zeros(out_channels, dtype=torch.float64))
        self.register_buffer("y_scale", torch.ones(out_channels, dtype=torch.float64))
        self.to(dtype)
        self.reset_to_nngp()

    # ------------------------------------------------------------------ helpers
    @property
    def dtype(self) -> torch.dtype:
        """Parameter dtype (follows ``.to()`` / ``.double()``)."""
        return self.input_layer.inducing_points.dtype

    @property
    def likelihood_name(self) -> str:
        """``"gaussian"``, ``"categorical"`` or the likelihood's class name."""
        if isinstance(self.likelihood, Gaussian):
            return "gaussian"
        if isinstance(self.likelihood, Categorical):
            return "categorical"
        return type(self.likelihood).__name__.lower()

    @property
    def noise(self) -> Tensor:
        """The Gaussian likelihood's variance (``likelihood.variance``); assign a
        ``PyroSample`` to put a prior on it."""
        if not isinstance(self.likelihood, Gaussian):
            raise AttributeError(f"noise: this DKM has a {type(self.likelihood).__name__} "
                                 f"likelihood, not a Gaussian one")
        return self.likelihood.variance

    def __setattr__(self, name, value):
        if name == "noise":
            return setattr(self.likelihood, "variance", value)
        return super().__setattr__(name, value)

    @property
    def nu(self) -> list[float]:
        return [layer.nu for layer in self.gram_layers]

    # ------------------------------------------------------------------ target scaling
    @property
    def location_scale(self) -> bool:
        """True for a Gaussian or Student-t likelihood (targets may be standardised)."""
        return isinstance(self.likelihood, (Gaussian, StudentT))

    @property
    def target_scaled(self) -> bool:
        """True when the targets are modelled in standardised units (see
        :meth:`set_target_scaling`)."""
        return bool((self.y_loc != 0).any() or (self.y_scale != 1).any())

    @torch.no_grad()
    def set_target_scaling(self, y: Tensor | None) -> None:
        """Model the targets as ``z = (y - y_loc) / y_scale`` with ``y_loc``/``y_scale``
        the per-channel mean and standard deviation (``ddof=0``) of ``y`` (``None``:
        back to the identity). The top-layer kernel has no amplitude and the noise is
        relative to it, so this makes a fit equivariant to the units of ``y``:
        :func:`~pyro_dkm.fit` calls it with the training targets. :meth:`model`,
        :meth:`objective` and :meth:`init_q` take ``y`` in its own units (the objective
        includes the Jacobian ``-N sum_c log y_scale_c``), :meth:`predict` returns it in
        them; ``forward`` (``dkm(X)``), ``noise`` and the likelihood's parameters are in
        standardised units. Gaussian and Student-t likelihoods only."""
        if y is None:
            self.y_loc.zero_()
            self.y_scale.fill_(1.0)
            return
        if not self.location_scale:
            raise ValueError(f"target scaling needs a Gaussian or Student-t likelihood, this "
                             f"DKM has a {type(self.likelihood).__name__} one")
        if not isinstance(y, Tensor) or y.dim() == 0:
            raise TypeError(f"y must be a torch.Tensor of targets with one row per point, "
                            f"got {type(y).__name__}")
        loc, scale = target_statistics(self._check_y(y, y.shape[0], scaled=False))
        self.y_loc.copy_(loc)
        self.y_scale.copy_(scale)

    def _unscale(self, pred: torch.distributions.Distribution):
        """A predictive of standardised targets in the units of ``y``."""
        if not self.target_scaled:
            return pred
        loc, scale = self._squeeze(self.y_loc), self._squeeze(self.y_scale)
        if isinstance(pred, torch.distributions.Normal):
            return torch.distributions.Normal(loc + scale * pred.loc, scale * pred.scale)
        if isinstance(pred, torch.distributions.MixtureSameFamily):
            comp = pred.component_distribution
            loc_, scale_ = loc.unsqueeze(-1), scale.unsqueeze(-1)  # over the mixture axis
            if isinstance(comp, torch.distributions.StudentT):
                comp = torch.distributions.StudentT(comp.df, loc_ + scale_ * comp.loc,
                                                    scale_ * comp.scale)
            elif isinstance(comp, torch.distributions.Normal):
                comp = torch.distributions.Normal(loc_ + scale_ * comp.loc, scale_ * comp.scale)
            else:  # pragma: no cover - only location-scale likelihoods are scaled
                raise TypeError(f"cannot rescale a {type(comp).__name__} predictive")
            return torch.distributions.MixtureSameFamily(pred.mixture_distribution, comp)
        raise TypeError(f"cannot rescale a {type(pred).__name__} predictive")  # pragma: no cover

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # state dicts saved before target scaling existed hold no y_loc / y_scale
        for key in ("y_loc", "y_scale"):
            state_dict.setdefault(prefix + key, getattr(self, key).clone())
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @torch.no_grad()
    def reset_to_nngp(self) -> None:
        """Set every learned Gram to the NNGP value ``K(G_{l-1})_ii`` and ``q(u)`` to the
        prior ``N(0, K_ii)`` (the initial state)."""
        # .forward, not __call__: no Pyro context is entered (the constructor must run no
        # Pyro code, or the module could not be attached to a parent PyroModule later)
        G = self.input_layer.forward(self.input_layer.inducing_points[:1])
        for kern, gl in zip(self.kernel_layers, self.gram_layers):
            K = kern.forward(G)
            gl.reset_to_prior(K.ii)
            G, _ = gl.forward(K)
        K = self.kernel_layers[-1].forward(G)
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

    def _check_y(self, y, N: int, name: str = "y", *, scaled: bool = True) -> Tensor | None:
        """Returns ``(N, C)`` values (scalar likelihoods; standardised by
        :meth:`set_target_scaling` unless ``scaled=False``) or ``(N,)`` class indices
        (categorical); the likelihood checks the support (counts, 0/1 labels, ...)."""
        if y is None:
            return None
        if not isinstance(y, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(y).__name__}")
        if y.shape[0:1] != (N,):
            raise ValueError(f"{name} must have {N} rows, one per row of X, got shape "
                             f"{tuple(y.shape)}")
        device = self.input_layer.inducing_points.device
        if isinstance(self.likelihood, Categorical):
            if y.dim() != 1 or y.is_floating_point() or y.dtype == torch.bool:
                raise TypeError(f"{name} must be a 1-d integer tensor of class indices for a "
                                f"categorical likelihood, got dtype {y.dtype}, shape "
                                f"{tuple(y.shape)}")
            C = self.out_channels
            if bool(((y < 0) | (y >= C)).any()):
                raise ValueError(f"{name} holds class indices outside [0, {C - 1}] "
                                 f"(min {int(y.min())}, max {int(y.max())})")
            return y.long().to(device)
        check_tensor(y, name, floating=isinstance(self.likelihood, Gaussian))
        C = self.out_channels
        y = y.to(device=device, dtype=self.dtype)
        if y.dim() == 1 and C == 1:
            y = y[:, None]
        if y.dim() != 2 or y.shape[1] != C:
            raise ValueError(f"{name} must have shape (N,) or (N, {C}) for {C} output "
                             f"channel(s), got shape {tuple(y.shape)}")
        self.likelihood.check_y(y)
        if scaled and self.target_scaled:
            y = (y - self.y_loc) / self.y_scale
        return y

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
        sync_param_store(self)
        K, K_tril, _ = self.forward_blocks(X)
        return self.output.marginals(*conditional_weights(K, K_tril))

    def _squeeze(self, t: Tensor) -> Tensor:
        """``(T, C)`` -> ``(T,)`` for one channel of a scalar likelihood."""
        if self.out_channels == 1 and not isinstance(self.likelihood, Categorical):
            return t[..., 0]
        return t

    def expected_log_likelihood(self, mean: Tensor, var: Tensor, y: Tensor) -> Tensor:
        """``E_{N(f; mean, var)} log p(y | f)`` per point ``(T,)`` (summed over channels)
        under the DKM's likelihood."""
        ell = self.likelihood.expected_log_prob(mean, var, y)
        return ell.sum(-1) if ell.dim() > 1 else ell

    # ------------------------------------------------------------------ Pyro
    @pyro_method
    def forward(self, X: Tensor) -> torch.distributions.Normal:
        """The DKM as a latent function inside a Pyro model (call it outside the data
        plate, on the rows of this step's batch).

        Registers ``"<prefix>.kl_{l}"`` factors (``-nu_l KL_l``) and the inducing outputs
        ``"<prefix>.u" ~ N(0, K_ii)``, and returns the marginal ``Normal`` of the latent
        ``f`` at the rows of ``X``: batch shape ``(N,)`` for one output channel, ``(N, C)``
        otherwise. With ``analytic_expectation`` it is the marginal under ``q(u)`` (so a
        likelihood's expectation under it is the exact ELBO term), else ``p(f | u)`` for
        the sampled ``u``.
        """
        outside_data_plates(f"{type(self).__name__}.forward (dkm(X))")
        sync_param_store(self)
        X = self._check_X(X)
        K, K_tril, kls = self.forward_blocks(X)
        for l, (kl, layer) in enumerate(zip(kls, self.gram_layers)):
            pyro.factor(self._pyro_get_fullname(f"kl_{l}"), -layer.kl_weight * kl)
        u = pyro.sample(self._pyro_get_fullname("u"), self.output.prior(K_tril))
        W, resid = conditional_weights(K, K_tril)
        mean, var = self.output.marginals(W, resid, None if self.analytic_expectation else u)
        # a zero variance is legitimate (p(f | u) at an inducing input): no validation
        return torch.distributions.Normal(self._squeeze(mean),
                                          self._squeeze(var).clamp_min(0).sqrt(),
                                          validate_args=False)

    @pyro_method
    def model(self, X: Tensor, y: Tensor | None = None, *, subsample_size: int | None = None,
              num_data: int | None = None):
        """Pyro model: :meth:`forward` on the batch, then the DKM's likelihood inside
        ``pyro.plate("<prefix>.data", N)``. ``X`` ``(N, d)``; ``y`` ``(N,)``/``(N, C)``
        values or ``(N,)`` classes.

        ``subsample_size``: draw a random minibatch of ``X`` inside the plate;
        ``num_data``: ``X``/``y`` already are a minibatch of a data set of this size.
        """
        X = self._check_X(X)  # (the parameter store is synced by self(...) below)
        N = X.shape[0]
        y = self._check_y(y, N)
        name = self._pyro_get_fullname("data")
        if subsample_size is not None and not 1 <= int(subsample_size) <= N:
            raise ValueError(f"subsample_size must be in [1, {N}] (the rows of X), got "
                             f"{subsample_size}")
        if num_data is None:
            data_plate = pyro.plate(name, N, subsample_size=subsample_size, device=X.device)
        else:
            if num_data < N:
                raise ValueError(f"num_data ({num_data}) must be >= the batch size ({N})")
            data_plate = pyro.plate(name, int(num_data), subsample=torch.arange(N),
                                    device=X.device)
        with data_plate as idx:
            pass
        f = self(X[idx])
        yb = None if y is None else self._squeeze(y[idx])
        with data_plate:
            if self.target_scaled:  # density of y, not of the standardised z
                pyro.factor(self._pyro_get_fullname("y_scaling"),
                            -self.y_scale.log().sum().expand(len(idx)))
            z = self.likelihood(f.loc, f.variance, yb)
        if not self.target_scaled:
            return z
        return self._squeeze(self.y_loc) + self._squeeze(self.y_scale) * z  # in y's units

    @pyro_method
    def guide(self, X: Tensor | None = None, y: Tensor | None = None, **kwargs):
        """Pyro guide: ``"<prefix>.u" ~ q(u) = N(u_loc, u_scale_tril u_scale_tril^T)`` per
        channel. Returns ``{name: sample}`` like an AutoGuide, so it composes in
        ``AutoGuideList`` (wrapped in ``AutoCallable``)."""
        outside_data_plates(f"{type(self).__name__}.guide")
        sync_param_store(self)
        name = self._pyro_get_fullname("u")
        return {name: pyro.sample(name, self.output.posterior())}

    # ------------------------------------------------------------------ closed forms
    @pyro_method
    def objective(self, X: Tensor, y: Tensor, *, num_data: int | None = None) -> Tensor:
        """The sparse DKM objective (closed form for Gaussian and Poisson likelihoods,
        quadrature for other scalar ones, Monte Carlo for the softmax). ``num_data=N``:
        ``X, y`` are a minibatch of a data set of ``N`` points and the likelihood term is
        scaled by ``N / len(X)`` (an unbiased estimate; equal to ``-TraceMeanField_ELBO``
        of the model on that batch)."""
        sync_param_store(self)
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
        if self.target_scaled:  # the Jacobian of z = (y - y_loc) / y_scale
            ell = ell - X.shape[0] * self.y_scale.log().sum()
        if num_data is not None:
            ell = ell * (num_data / X.shape[0])
        kl_u = self.output.kl_to_prior(K_tril)
        return ell - sum(layer.kl_weight * kl for layer, kl in zip(self.gram_layers, kls)) - kl_u

    @torch.no_grad()
    @pyro_method
    def init_q(self, X: Tensor, y: Tensor, *, batch_size: int = 4096) -> None:
        r"""Set ``q(u)`` to its optimum for the current Grams and noise (Gaussian
        likelihood; Titsias 2009): :math:`S = K (K + \sigma^{-2}K_{it}K_{ti})^{-1} K`,
        :math:`m_c = \sigma^{-2} S K^{-1} K_{it} y_c`. ``O(N M^2)``."""
        if not isinstance(self.likelihood, Gaussian):
            raise ValueError("init_q needs a Gaussian likelihood")
        sync_param_store(self)
        X = self._check_X(X)
        y = self._check_y(y, X.shape[0])
        s2 = self.noise
        M = self.num_inducing
        AAt = X.new_zeros(M, M)
        Ay = X.new_zeros(M, y.shape[1])
        for start in range(0, X.shape[0], batch_size):  # O(batch_size * M) memory
            K, K_tril, _ = self.forward_blocks(X[start:start + batch_size])
            A = tril_solve(K_tril, K.ti.mT)  # (M, b)
            AAt += A @ A.mT
            Ay += A @ y[start:start + batch_size]
        B = torch.eye(M, dtype=A.dtype, device=A.device) + AAt / s2
        L_B = cholesky(B, name="I + A A^T / noise")
        m = K_tril @ cholesky_solve(L_B, Ay) / s2  # (M, C)
        T = tril_solve(L_B, K_tril.mT)  # L_B^-1 L_K^T
        S_tril = cholesky(T.mT @ T, name="S")
        _set_param(self.output, "u_loc", m.mT)
        if not self.output.shared_covariance:
            S_tril = S_tril.expand(self.out_channels, M, M)
        _set_param(self.output, "u_scale_tril", S_tril)

    # ------------------------------------------------------------------ prediction
    @torch.no_grad()
    @pyro_method
    def predict(self, X: Tensor, *, include_noise: bool = True, batch_size: int = 4096,
                num_samples: int | None = None) -> torch.distributions.Distribution:
        """Predictive distribution at the rows of ``X`` ``(T, d)``, computed in batches.

        The likelihood's predictive of the latent marginal: Gaussian, a ``Normal`` with
        ``loc``/``scale`` ``(T,)`` (one channel) or ``(T, C)``; Bernoulli a ``Bernoulli``;
        categorical a ``Categorical`` (``probs`` ``(T, C)``, the softmax averaged over
        ``num_samples`` draws of ``f``, default the likelihood's ``predictive_samples``);
        other scalar likelihoods a quadrature mixture. ``include_noise=False`` gives the
        latent ``f``'s ``Normal``.
        """
        sync_param_store(self)
        X = self._check_X(X)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        means, variances = [], []
        for start in range(0, X.shape[0], batch_size):
            mean, var = self.latent_marginals(X[start:start + batch_size])
            means.append(mean)
            variances.append(var)
        mean, var = self._squeeze(torch.cat(means)), self._squeeze(torch.cat(variances))
        if not include_noise:
            return self._unscale(torch.distributions.Normal(mean, var.clamp_min(0).sqrt()))
        lik = self.likelihood
        if isinstance(lik, Categorical) and num_samples is not None:
            return torch.distributions.Categorical(
                probs=torch.softmax(lik._draws(mean, var, int(num_samples)), -1).mean(0))
        return self._unscale(lik.predictive(mean, var))

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
