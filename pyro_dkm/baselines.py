"""Baseline regressors for the DKM benchmarks: SVGP, a 2-layer doubly-stochastic deep GP
(GPyTorch ``DeepGP``, Salimbeni & Deisenroth 2017) and exact NNGP GP regression.

Each class has ``fit(X, y, epochs=..., batch_size=..., lr=...)`` (returns seconds per
epoch) and ``predict(X) -> torch.distributions.Normal`` (noise included). Inputs are
``X (N, d)`` and ``y (N,)`` in standardised units.
"""

from __future__ import annotations

import math
import os
import time

os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

import gpytorch  # noqa: E402
import torch  # noqa: E402
from torch import Tensor  # noqa: E402
from torch.distributions import Normal  # noqa: E402

from .linalg import check_tensor  # noqa: E402

__all__ = ["SVGPRegressor", "DeepGPRegressor", "NNGPRegressor", "ARDGPRegressor", "SmallCNN",
           "gaussian_test_metrics"]


def gaussian_test_metrics(pred: Normal, y: Tensor, y_mean: float = 0.0, y_std: float = 1.0
                          ) -> tuple[float, float]:
    """Mean test log-likelihood and RMSE in original units (``y_orig = y * y_std + y_mean``)
    of a Normal predictive on standardised targets ``y``."""
    mean = pred.loc * y_std + y_mean
    scale = pred.scale * y_std
    y_o = y * y_std + y_mean
    ll = Normal(mean, scale).log_prob(y_o).mean().item()
    rmse = (mean - y_o).pow(2).mean().sqrt().item()
    return ll, rmse


def _check_xy(X, y):
    check_tensor(X, "X", ndim=2)
    check_tensor(y, "y", ndim=1)
    if y.shape[0] != X.shape[0]:
        raise ValueError(f"y must have length {X.shape[0]} (rows of X), got {y.shape[0]}")


def _init_inducing(X: Tensor, M: int, seed: int) -> Tensor:
    if M < 1:
        raise ValueError(f"num_inducing must be positive, got {M}")
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(X.shape[0], generator=g)[:M]
    Z = X[idx].clone()
    if M > X.shape[0]:  # pad with jittered copies
        extra = X[torch.randint(X.shape[0], (M - X.shape[0],), generator=g)]
        Z = torch.cat([Z, extra + 0.01 * torch.randn(extra.shape, generator=g, dtype=X.dtype)])
    return Z


def _svi_loop(model, likelihood, mll, X, y, epochs, batch_size, lr, seed, num_samples=None):
    params = list(model.parameters()) + list(likelihood.parameters())
    params = list({id(p): p for p in params}.values())
    opt = torch.optim.Adam(params, lr=lr)
    N = X.shape[0]
    B = N if batch_size is None else min(batch_size, N)
    g = torch.Generator().manual_seed(seed)
    model.train()
    likelihood.train()
    t0 = time.perf_counter()
    ctx = gpytorch.settings.num_likelihood_samples(num_samples) if num_samples else None
    for _ in range(epochs):
        perm = torch.randperm(N, generator=g)
        for s in range(0, N, B):
            idx = perm[s:s + B]
            opt.zero_grad()
            if ctx is not None:
                with ctx:
                    loss = -mll(model(X[idx]), y[idx])
            else:
                loss = -mll(model(X[idx]), y[idx])
            loss.backward()
            opt.step()
    return (time.perf_counter() - t0) / max(epochs, 1)


class _ConstantMeanARD:
    """Constant mean and a scaled ARD RBF kernel over ``d`` inputs (the SVGP's and the exact
    GP baseline's prior)."""

    def _init_prior(self, d: int) -> None:
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(ard_num_dims=d))

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


class _SVGPModel(_ConstantMeanARD, gpytorch.models.ApproximateGP):
    def __init__(self, Z: Tensor):
        vd = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
        vs = gpytorch.variational.VariationalStrategy(self, Z, vd, learn_inducing_locations=True)
        super().__init__(vs)
        self._init_prior(Z.shape[1])


class SVGPRegressor:
    """Sparse variational GP (Hensman et al. 2013), ARD RBF kernel, ``M`` learned inducing
    inputs, Gaussian likelihood, trained by Adam on the minibatch ELBO."""

    def __init__(self, num_inducing: int = 100, seed: int = 0):
        self.num_inducing = num_inducing
        self.seed = seed
        self.model = None

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 100, batch_size: int | None = None,
            lr: float = 0.01) -> float:
        """Train; returns seconds per epoch."""
        _check_xy(X, y)
        torch.manual_seed(self.seed)
        self.model = _SVGPModel(_init_inducing(X, self.num_inducing, self.seed)).to(X.dtype)
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood().to(X.dtype)
        mll = gpytorch.mlls.VariationalELBO(self.likelihood, self.model, num_data=X.shape[0])
        return _svi_loop(self.model, self.likelihood, mll, X, y, epochs, batch_size, lr,
                         self.seed)

    @torch.no_grad()
    def predict(self, X: Tensor, *, include_noise: bool = True) -> Normal:
        if self.model is None:
            raise RuntimeError("call fit before predict")
        check_tensor(X, "X", ndim=2)
        self.model.eval()
        self.likelihood.eval()
        f = self.model(X)
        var = f.variance + (self.likelihood.noise if include_noise else 0.0)
        return Normal(f.mean, var.clamp_min(1e-12).sqrt())


class _DGPLayer(gpytorch.models.deep_gps.DeepGPLayer):
    def __init__(self, input_dims: int, output_dims: int | None, Z: Tensor, linear_mean: bool):
        M = Z.shape[0]
        if output_dims is None:
            batch = torch.Size([])
            Zb = Z
        else:
            batch = torch.Size([output_dims])
            Zb = Z.unsqueeze(0).expand(output_dims, M, input_dims).clone()
        vd = gpytorch.variational.CholeskyVariationalDistribution(M, batch_shape=batch)
        vs = gpytorch.variational.VariationalStrategy(self, Zb, vd,
                                                      learn_inducing_locations=True)
        super().__init__(vs, input_dims, output_dims)
        self.mean_module = (gpytorch.means.LinearMean(input_dims, batch_shape=batch)
                            if linear_mean else gpytorch.means.ConstantMean(batch_shape=batch))
        self.covar_module = gpytorch.kernels.ScaleKernel(
            gpytorch.kernels.RBFKernel(batch_shape=batch, ard_num_dims=input_dims),
            batch_shape=batch)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


class _DGP(gpytorch.models.deep_gps.DeepGP):
    def __init__(self, Z: Tensor, hidden_dims: int):
        super().__init__()
        d = Z.shape[1]
        # hidden layer: linear mean (identity-like skip, as in Salimbeni & Deisenroth)
        self.hidden = _DGPLayer(d, hidden_dims, Z, linear_mean=True)
        Zh = Z[:, :hidden_dims] if d >= hidden_dims else torch.cat(
            [Z, torch.zeros(Z.shape[0], hidden_dims - d, dtype=Z.dtype)], 1)
        self.last = _DGPLayer(hidden_dims, None, Zh, linear_mean=False)
        self.likelihood = gpytorch.likelihoods.GaussianLikelihood()

    def forward(self, x):
        return self.last(self.hidden(x))


class DeepGPRegressor:
    """2-layer doubly-stochastic deep GP (Salimbeni & Deisenroth 2017) with GPyTorch's
    ``DeepGP``: a hidden GP layer of ``hidden_dims`` outputs (linear mean) and an output GP
    layer, ``M`` inducing points per layer, ARD RBF kernels, trained by Adam on the
    Monte-Carlo ``DeepApproximateMLL(VariationalELBO)``. Prediction averages
    ``num_samples`` Monte-Carlo Gaussians; we report the moment-matched Normal."""

    def __init__(self, num_inducing: int = 100, hidden_dims: int | None = None,
                 num_samples: int = 10, seed: int = 0):
        self.num_inducing = num_inducing
        self.hidden_dims = hidden_dims
        self.num_samples = num_samples
        self.seed = seed
        self.model = None

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 100, batch_size: int | None = None,
            lr: float = 0.01) -> float:
        """Train; returns seconds per epoch."""
        _check_xy(X, y)
        torch.manual_seed(self.seed)
        H = self.hidden_dims or min(X.shape[1], 5)
        self.model = _DGP(_init_inducing(X, self.num_inducing, self.seed), H).to(X.dtype)
        mll = gpytorch.mlls.DeepApproximateMLL(
            gpytorch.mlls.VariationalELBO(self.model.likelihood, self.model, X.shape[0]))
        return _svi_loop(self.model, self.model.likelihood, mll, X, y, epochs, batch_size, lr,
                         self.seed, num_samples=self.num_samples)

    @torch.no_grad()
    def predict(self, X: Tensor, *, include_noise: bool = True, num_samples: int = 64
                ) -> Normal:
        """Moment-matched Normal of the Monte-Carlo mixture predictive. (The test
        log-likelihood reported by :meth:`log_predictive` uses the mixture itself.)"""
        m, v = self._mixture(X, include_noise, num_samples)
        mean = m.mean(0)
        var = (v + m.pow(2)).mean(0) - mean.pow(2)
        return Normal(mean, var.clamp_min(1e-12).sqrt())

    def _mixture(self, X, include_noise, num_samples):
        if self.model is None:
            raise RuntimeError("call fit before predict")
        check_tensor(X, "X", ndim=2)
        self.model.eval()
        with gpytorch.settings.num_likelihood_samples(num_samples):
            f = self.model(X)
        noise = self.model.likelihood.noise if include_noise else 0.0
        return f.mean, f.variance + noise

    @torch.no_grad()
    def log_predictive(self, X: Tensor, y: Tensor, y_mean: float = 0.0, y_std: float = 1.0,
                       num_samples: int = 64) -> float:
        """Mean test log-likelihood of the Gaussian-mixture predictive in original units
        (the standard DGP metric)."""
        m, v = self._mixture(X, True, num_samples)
        lp = Normal(m * y_std + y_mean, v.sqrt() * y_std).log_prob(y * y_std + y_mean)
        return (torch.logsumexp(lp, 0) - math.log(lp.shape[0])).mean().item()


class NNGPRegressor:
    """Exact GP regression with an NNGP kernel (:mod:`pyro_dkm.kernels.nngp`): a ReLU net
    of ``depth`` hidden layers, weight/bias variances, amplitude and noise fitted by Adam on
    the exact log marginal likelihood (``O(N^3)`` per step; one "epoch" is one full-batch
    step). A thin front end of :class:`~pyro_dkm.processes.GaussianProcessRegression` with
    an :class:`~pyro_dkm.processes.NNGPCovariance` (the package's one exact regression)."""

    def __init__(self, depth: int = 2, activation: str = "relu"):
        if activation not in ("relu", "erf"):
            raise ValueError(f"activation must be 'relu' or 'erf', got {activation!r}")
        self.depth = depth
        self.activation = activation
        self.gp = None

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 100, lr: float = 0.05, **_) -> float:
        """Fit hyper-parameters by ``epochs`` Adam steps; returns seconds per step."""
        from .processes.regression import GaussianProcessRegression, NNGPCovariance
        from .processes.regression import fit as fit_exact

        _check_xy(X, y)
        kernel = NNGPCovariance(self.depth, self.activation, weight_var=2.0, bias_var=0.1,
                                variance=1.0)
        self.gp = GaussianProcessRegression(X, y, kernel.to(X.dtype), noise=0.1).to(X.dtype)
        t0 = time.perf_counter()
        if epochs:  # epochs=0: the initial hyper-parameters
            fit_exact(self.gp, steps=epochs, lr=lr)
        return (time.perf_counter() - t0) / max(epochs, 1)

    @torch.no_grad()
    def predict(self, X: Tensor, *, include_noise: bool = True) -> Normal:
        if self.gp is None:
            raise RuntimeError("call fit before predict")
        check_tensor(X, "X", ndim=2)
        return self.gp.predict(X, include_noise=include_noise)


class _ExactARD(_ConstantMeanARD, gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood):
        super().__init__(X, y, likelihood)
        self._init_prior(X.shape[1])


class ARDGPRegressor:
    """Exact GP regression with an ARD RBF kernel (one lengthscale per input), a constant
    mean and Gaussian noise, hyper-parameters by maximising the exact marginal likelihood
    with Adam (GPyTorch ``ExactGP``; ``epochs`` full-batch steps, default 300). On training
    sets larger than ``max_train`` the hyper-parameters are fitted on a random subset of that
    size (``O(N^3)`` per step); with ``condition_on_all=True`` (default) predictions then
    condition on every training row (one ``O(N^3)`` factorisation), else on the subset."""

    def __init__(self, max_train: int = 5000, seed: int = 0, condition_on_all: bool = True):
        if int(max_train) < 1:
            raise ValueError(f"max_train must be a positive int, got {max_train!r}")
        self.max_train, self.seed = int(max_train), int(seed)
        self.condition_on_all = bool(condition_on_all)
        self.model = None

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 300, lr: float = 0.1, **_) -> float:
        """Fit by ``epochs`` Adam steps on the exact marginal likelihood; seconds per step."""
        _check_xy(X, y)
        X_all, y_all = X, y
        if X.shape[0] > self.max_train:
            g = torch.Generator().manual_seed(self.seed)
            idx = torch.randperm(X.shape[0], generator=g)[: self.max_train]
            X, y = X[idx], y[idx]
        lik = gpytorch.likelihoods.GaussianLikelihood().to(X.dtype)
        self.model = _ExactARD(X, y, lik).to(X.dtype)
        self.model.train()
        lik.train()
        opt = torch.optim.Adam(self.model.parameters(), lr=lr)
        mll = gpytorch.mlls.ExactMarginalLogLikelihood(lik, self.model)
        t0 = time.perf_counter()
        with gpytorch.settings.max_cholesky_size(10**6):  # exact Cholesky, no CG
            for _ in range(epochs):
                opt.zero_grad()
                loss = -mll(self.model(X), y)
                loss.backward()
                opt.step()
        seconds = (time.perf_counter() - t0) / max(epochs, 1)
        if self.condition_on_all and X.shape[0] < X_all.shape[0]:
            self.model.set_train_data(X_all, y_all, strict=False)
        return seconds

    @torch.no_grad()
    def predict(self, X: Tensor, *, include_noise: bool = True) -> Normal:
        if self.model is None:
            raise RuntimeError("call fit before predict")
        check_tensor(X, "X", ndim=2)
        self.model.eval()
        self.model.likelihood.eval()
        with gpytorch.settings.max_cholesky_size(10**6), gpytorch.settings.fast_pred_var(False):
            f = self.model(X)
            out = self.model.likelihood(f) if include_noise else f
            return Normal(out.mean, out.variance.clamp_min(0).sqrt())


class SmallCNN(torch.nn.Module):
    """The 3-layer convolutional classifier of the MNIST-1D paper (Greydanus & Kobak):
    ``Conv1d(C, 25, 5, stride 2, padding 1)``, two ``Conv1d(25, 25, 3, stride 2, padding
    1)``, ReLU after each, a linear read-out of the flattened features; ``ndim=2`` uses
    the 2-D convolutions of the same shapes (images). ``fit(X, y, epochs, batch_size, lr)``
    trains with Adam on the cross-entropy (returns seconds per epoch); ``predict(X)`` gives
    a ``Categorical``."""

    def __init__(self, in_channels: int, spatial_shape: tuple, num_classes: int = 10,
                 channels: int = 25, seed: int = 0):
        super().__init__()
        ndim = len(spatial_shape)
        if ndim not in (1, 2):
            raise ValueError(f"spatial_shape must have 1 or 2 sizes, got {spatial_shape!r}")
        conv = torch.nn.Conv1d if ndim == 1 else torch.nn.Conv2d
        torch.manual_seed(seed)
        self.features = torch.nn.Sequential(
            conv(in_channels, channels, 5, stride=2, padding=1), torch.nn.ReLU(),
            conv(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
            conv(channels, channels, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten())
        with torch.no_grad():
            n = self.features(torch.zeros(1, in_channels, *spatial_shape)).shape[-1]
        self.readout = torch.nn.Linear(n, num_classes)

    def forward(self, X: Tensor) -> Tensor:
        return self.readout(self.features(X))

    def fit(self, X: Tensor, y: Tensor, *, epochs: int = 100, batch_size: int = 100,
            lr: float = 1e-2, seed: int = 0) -> float:
        X, y = X.float(), y.long()
        g = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.parameters(), lr=lr)
        N = X.shape[0]
        start = time.perf_counter()
        self.train()
        for _ in range(epochs):
            perm = torch.randperm(N, generator=g)
            for i in range(0, N, batch_size):
                idx = perm[i:i + batch_size]
                opt.zero_grad()
                loss = torch.nn.functional.cross_entropy(self(X[idx]), y[idx])
                loss.backward()
                opt.step()
        self.eval()
        return (time.perf_counter() - start) / max(epochs, 1)

    @torch.no_grad()
    def predict(self, X: Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self(X.float()).double())
