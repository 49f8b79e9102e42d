"""The kernel protocol and its adapters to pyro.contrib.gp and GPyTorch."""

import gpytorch
import pyro.contrib.gp as gp
import torch

from pyro_dkm.kernels import ReluGram, SqExpGram
from pyro_dkm.kernels.adapters import (
    GPyTorchKernel,
    MaternKernel,
    PyroGPKernel,
    gram_kernel_on_inputs,
)
from pyro_dkm.processes import GaussianProcessRegression, NNGPCovariance

F64 = torch.float64


def _data(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 3, generator=g, dtype=F64)
    return X, torch.sin(X[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=F64)


def test_nngp_kernel_in_contrib_gp_regression_equals_our_exact_regression():
    # the same NNGP covariance inside gp.models.GPRegression (no jitter) and inside our
    # GaussianProcessRegression: predictive means/variances and log marginal to 1e-8
    X, y = _data()
    Xt, _ = _data(15, seed=1)
    ours = GaussianProcessRegression(X, y, NNGPCovariance(depth=2, variance=1.3), noise=0.05)
    kern = PyroGPKernel(NNGPCovariance(depth=2, variance=1.3), input_dim=3)
    theirs = gp.models.GPRegression(X, y, kern, noise=torch.tensor(0.05, dtype=F64), jitter=0.0)
    with torch.no_grad():
        loc, var = theirs(Xt, full_cov=False, noiseless=False)
        pred = ours.predict(Xt)
        torch.testing.assert_close(loc, pred.mean, rtol=1e-8, atol=1e-8)
        torch.testing.assert_close(var, pred.variance, rtol=1e-8, atol=1e-8)
        # contrib.gp's model log density is the GP marginal likelihood
        import pyro

        tr = pyro.poutine.trace(theirs.model).get_trace()
        tr.compute_log_prob()
        assert abs(float(tr.log_prob_sum()) - float(ours.log_marginal())) < 1e-8


def test_adapted_kernels_compose_with_contrib_gp_sums_and_train_their_parameters():
    import pyro

    X, y = _data(30)
    base = NNGPCovariance(depth=1)
    rbf = gp.kernels.RBF(3, lengthscale=torch.tensor(1.0, dtype=F64),
                         variance=torch.tensor(0.5, dtype=F64))
    k = gp.kernels.Sum(PyroGPKernel(base, input_dim=3), rbf)
    m = gp.models.GPRegression(X, y, k, noise=torch.tensor(0.1, dtype=F64))
    with torch.no_grad():
        expected = NNGPCovariance(depth=1)(X) + rbf.forward(X)
        torch.testing.assert_close(m.kernel(X), expected, rtol=1e-12, atol=1e-12)
    before = float(base.weight_var.detach())
    opt = torch.optim.Adam(m.parameters(), lr=0.05)
    for _ in range(20):
        opt.zero_grad()
        loss = pyro.infer.Trace_ELBO().differentiable_loss(m.model, m.guide)
        loss.backward()
        opt.step()
    assert abs(float(base.weight_var.detach()) - before) > 1e-3


def test_gram_kernels_on_inputs_and_matern_follow_the_protocol():
    X, _ = _data(7)
    Z, _ = _data(5, seed=3)
    for gk in (ReluGram(), SqExpGram(lengthscale=0.7)):
        k = gram_kernel_on_inputs(gk)
        G = torch.cat([X, Z]) @ torch.cat([X, Z]).mT / 3
        full = gk(G)
        torch.testing.assert_close(k(X), full[:7, :7], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k(X, Z), full[:7, 7:], rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k(X, diag=True), full.diagonal()[:7], rtol=1e-12,
                                   atol=1e-12)
    m = MaternKernel(nu=0.5, lengthscale=2.0, variance=1.5)
    x = torch.linspace(0, 1, 6, dtype=F64)[:, None]
    expected = 1.5 * torch.exp(-(x - x.mT).abs() / 2.0)  # Matern-1/2 closed form
    torch.testing.assert_close(m(x), expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(m(x, diag=True), torch.full((6,), 1.5, dtype=F64))


def test_gpytorch_kernel_adapter_matches_the_protocol_kernel():
    X, _ = _data(9)
    base = NNGPCovariance(depth=2, variance=0.8)
    k = GPyTorchKernel(base)
    assert isinstance(k, gpytorch.kernels.Kernel)
    with torch.no_grad():
        torch.testing.assert_close(k(X).to_dense(), base(X), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(k(X, diag=True), base(X, diag=True), rtol=1e-12,
                                   atol=1e-12)
    assert any(p is base.weight_var_unconstrained for p in k.parameters())
