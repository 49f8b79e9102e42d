"""NNGPKernel inside GPyTorch models, checked against our own dense computations."""

import gpytorch
import pytest
import torch

from pyro_dkm.datasets import load_uci
from pyro_dkm.gpytorch import NNGPKernel
from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial
from pyro_dkm.linalg import cholesky, gaussian_log_marginal


class NNGPRegression(gpytorch.models.ExactGP):
    def __init__(self, X, y, likelihood, **kernel_kwargs):
        super().__init__(X, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = NNGPKernel(**kernel_kwargs)

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


def test_kernel_values_match_serial_description():
    x = torch.randn(6, 3, dtype=torch.float64)
    k = NNGPKernel(depth=2, activation="erf", weight_var=1.7, bias_var=0.3).double()
    k.weight_var = torch.tensor([1.7, 1.2, 0.9], dtype=torch.float64)  # per layer
    k.bias_var = torch.tensor([0.3, 0.2, 0.1], dtype=torch.float64)
    ref = serial(Dense(1.7, 0.3), Erf(), Dense(1.2, 0.2), Erf(), Dense(0.9, 0.1))(x)
    torch.testing.assert_close(k(x).to_dense(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(k(x, diag=True), ref.diagonal(), rtol=1e-12, atol=1e-12)
    ntk = NNGPKernel(depth=1, kernel="ntk").double()
    ntk.initialize(weight_var=2.0, bias_var=0.1)
    ref_ntk = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1))(x, get="ntk")
    torch.testing.assert_close(ntk(x).to_dense(), ref_ntk, rtol=1e-12, atol=1e-12)


def test_exact_gp_trains_on_uci_split_and_mll_matches_dense():
    split = load_uci("concrete", 0)  # bundled with the package
    X, y = split.X_train[:400], split.y_train[:400]
    likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
    model = NNGPRegression(X, y, likelihood, depth=2).double()
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=0.05)
    model.train()
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = -mll(model(X), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1  # it learns
    with torch.no_grad(), gpytorch.settings.max_cholesky_size(10_000):
        theirs = mll(model(X), y)
        # ours: log N(y | m, K + sigma^2 I) / n with the same hyper-parameters
        K = model.covar_module(X).to_dense() + likelihood.noise * torch.eye(len(y),
                                                                            dtype=y.dtype)
        ours = gaussian_log_marginal(cholesky(K), y - model.mean_module.constant) / len(y)
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-6)
    # hyper-parameters moved and stayed positive
    assert (model.covar_module.weight_var > 0).all() and (model.covar_module.bias_var > 0).all()


def test_batched_kernel_and_approximate_gp():
    k = NNGPKernel(depth=1, batch_shape=torch.Size([3])).double()
    x = torch.randn(3, 5, 2, dtype=torch.float64)
    assert k(x).to_dense().shape == (3, 5, 5)
    assert k.weight_var.shape == (3, 2)

    class SVGP(gpytorch.models.ApproximateGP):
        def __init__(self, Z):
            dist = gpytorch.variational.CholeskyVariationalDistribution(Z.shape[0])
            strat = gpytorch.variational.VariationalStrategy(self, Z, dist,
                                                             learn_inducing_locations=True)
            super().__init__(strat)
            self.mean_module = gpytorch.means.ZeroMean()
            self.covar_module = NNGPKernel(depth=2)

        def forward(self, x):
            return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                             self.covar_module(x))

    X = torch.randn(50, 2, dtype=torch.float64)
    model = SVGP(X[:10]).double()
    out = model(X)
    assert out.mean.shape == (50,) and torch.isfinite(out.variance).all()


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        ({"depth": -1}, ValueError, "depth"),
        ({"activation": "tanh"}, ValueError, "activation"),
        ({"kernel": "cntk"}, ValueError, "kernel"),
        ({"weight_var": 0.0}, ValueError, "weight_var must be positive"),
        ({"bias_var": -1.0}, ValueError, "bias_var must be non-negative"),
    ],
)
def test_bad_arguments(kwargs, err, match):
    with pytest.raises(err, match=match):
        NNGPKernel(**kwargs)


def test_nan_inputs_rejected():
    k = NNGPKernel().double()
    with pytest.raises(ValueError, match="x1 contains"):
        k(torch.tensor([[float("nan"), 0.0]], dtype=torch.float64)).to_dense()


@pytest.mark.keops
def test_keops_path_predictive_mean_matches_dense():
    # NNGPKernel(use_keops=True) inside an ExactGP: GPyTorch solves by CG through the lazy
    # NNGPOperator (Cholesky disabled); the posterior mean must equal the dense-kernel
    # model's (Cholesky) to 1e-4 (linear_operator's CG stalls near 1e-5 relative error
    # in float64, see docs/keops.md). Same network and d as tests/kernels/test_keops.py's
    # depth-2 ReLU NNGP, so no extra KeOps build.
    keops = pytest.importorskip("pyro_dkm.kernels.keops")
    if not keops.keops_available():
        pytest.skip("pykeops not installed")
    g = torch.Generator().manual_seed(0)
    X = torch.randn(1000, 3, generator=g, dtype=torch.float64)
    y = torch.sin(X.sum(-1)) + 0.1 * torch.randn(1000, generator=g, dtype=torch.float64)
    Xs = torch.randn(50, 3, generator=g, dtype=torch.float64)
    means = {}
    for use in (True, False):
        likelihood = gpytorch.likelihoods.GaussianLikelihood().double()
        likelihood.noise = 0.05
        model = NNGPRegression(X, y, likelihood, depth=2, use_keops=use).double()
        model.covar_module.initialize(weight_var=1.5, bias_var=0.1)
        model.eval()
        with torch.no_grad(), gpytorch.settings.max_cholesky_size(0 if use else 10_000), \
                gpytorch.settings.eval_cg_tolerance(1e-5), \
                gpytorch.settings.max_cg_iterations(400), \
                gpytorch.settings.skip_posterior_variances(True):
            if use:
                assert isinstance(model.covar_module(X).evaluate_kernel(),
                                  keops.NNGPOperator)
            means[use] = model(Xs).mean
    torch.testing.assert_close(means[True], means[False], rtol=1e-4, atol=1e-4)
