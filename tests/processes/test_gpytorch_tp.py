"""GPyTorch route to Student-t processes: the MLL equals the closed-form Student-t marginal,
reduces to GPyTorch's Gaussian MLL as df -> inf, trains, and its predictive matches the
dense closed form of docs/processes.md."""

import math

import gpytorch
import pytest
import torch
from pyro.distributions import MultivariateStudentT

from pyro_dkm.gpytorch import NNGPKernel
from pyro_dkm.processes.gpytorch import StudentTMarginalLogLikelihood, student_t_predictive


class _GP(gpytorch.models.ExactGP):
    def __init__(self, x, y, likelihood, kernel):
        super().__init__(x, y, likelihood)
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


def _data(n=30, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.sin(x.sum(-1)) + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
    return x, y


def _model(x, y, kernel=None):
    lik = gpytorch.likelihoods.GaussianLikelihood().double()
    lik.noise = 0.2
    kernel = kernel or gpytorch.kernels.ScaleKernel(NNGPKernel(depth=2))
    model = _GP(x, y, lik, kernel).double()
    model.mean_module.constant.data.fill_(0.3)
    return model, lik


def _dense(model, lik, x1, x2=None):
    x2 = x1 if x2 is None else x2
    with torch.no_grad():
        return model.covar_module(x1, x2).to_dense()


@pytest.mark.parametrize("kernel", ["nngp", "rbf"])
@pytest.mark.parametrize("a,b", [(2.0, 2.0), (0.7, 3.0), (15.0, 0.5)])
def test_mll_equals_multivariate_student_t(kernel, a, b):
    x, y = _data()
    k = None if kernel == "nngp" else gpytorch.kernels.RBFKernel()
    model, lik = _model(x, y, k)
    mll = StudentTMarginalLogLikelihood(lik, model, a=a, b=b)
    model.train()
    value = mll(model(x), y) * x.shape[0]
    # closed form: MVT(df=2a, mean, scale^2 = b/a (K + noise I)) with Pyro's own log_prob
    Ky = _dense(model, lik, x) + lik.noise.detach() * torch.eye(30, dtype=torch.float64)
    L = torch.linalg.cholesky((b / a) * Ky)
    ref = MultivariateStudentT(torch.tensor(2 * a, dtype=torch.float64),
                               torch.full((30,), 0.3, dtype=torch.float64), L).log_prob(y)
    assert abs(float(value.detach()) - float(ref)) < 1e-8


def test_large_df_equals_gaussian_mll():
    x, y = _data()
    model, lik = _model(x, y)
    model.train()
    gauss = float(gpytorch.mlls.ExactMarginalLogLikelihood(lik, model)(model(x), y).detach())
    diffs = []
    for a in (1e4, 1e6):
        mll = StudentTMarginalLogLikelihood(lik, model, a=a, b=a)
        diffs.append(abs(float(mll(model(x), y).detach()) - gauss))
    # log MVT - log N = O(n^2 / df): 100x larger df -> 100x smaller difference
    assert diffs[1] < 1e-5
    assert diffs[0] / diffs[1] == pytest.approx(100, rel=0.05)


def test_trains_with_adam_and_learns_a_b():
    x, y = _data(n=40)
    model, lik = _model(x, y)
    mll = StudentTMarginalLogLikelihood(lik, model, a=2.0, b=2.0)
    names = {n for n, _ in mll.named_parameters()}
    assert {"raw_a", "raw_b"} <= names
    opt = torch.optim.Adam(mll.parameters(), lr=0.05)
    model.train()
    lik.train()
    start = float(mll(model(x), y).detach())
    a0 = float(mll.a.detach())
    for _ in range(60):
        opt.zero_grad()
        loss = -mll(model(x), y)
        loss.backward()
        opt.step()
    end = float(mll(model(x), y).detach())
    assert end > start + 0.05
    assert float(mll.a.detach()) != a0


def test_fixed_a_b_are_buffers():
    x, y = _data()
    model, lik = _model(x, y)
    mll = StudentTMarginalLogLikelihood(lik, model, a=3.0, b=1.5, learn_a=False, learn_b=False)
    assert "raw_a" not in {n for n, _ in mll.named_parameters()}
    assert float(mll.a) == pytest.approx(3.0, abs=1e-12)
    assert float(mll.b) == pytest.approx(1.5, abs=1e-12)
    assert float(mll.df) == pytest.approx(6.0, abs=1e-12)


@pytest.mark.parametrize("include_noise", [True, False])
def test_predictive_matches_dense_closed_form(include_noise):
    x, y = _data()
    xs = torch.linspace(-2, 2, 7, dtype=torch.float64)[:, None].expand(7, 3).clone()
    model, lik = _model(x, y)
    a, b = 1.5, 2.5
    mll = StudentTMarginalLogLikelihood(lik, model, a=a, b=b)
    pred = student_t_predictive(mll, xs, include_noise=include_noise)
    joint = mll.predictive(xs, include_noise=include_noise, joint=True)
    # docs/processes.md by dense algebra
    s2 = float(lik.noise.detach())
    Ky = _dense(model, lik, x) + s2 * torch.eye(30, dtype=torch.float64)
    Ks = _dense(model, lik, x, xs)
    Kss = _dense(model, lik, xs) + (s2 * torch.eye(7, dtype=torch.float64) if include_noise
                                    else 0)
    r = y - 0.3
    n = 30
    a1 = a + n / 2
    b1 = b + 0.5 * r @ torch.linalg.solve(Ky, r)
    mean = 0.3 + Ks.T @ torch.linalg.solve(Ky, r)
    cov = (b1 / a1) * (Kss - Ks.T @ torch.linalg.solve(Ky, Ks))
    assert torch.allclose(pred.df, torch.full((7,), 2 * a1, dtype=torch.float64))
    assert torch.allclose(pred.loc, mean, atol=1e-8)
    assert torch.allclose(pred.scale, cov.diagonal().sqrt(), atol=1e-8)
    assert torch.allclose(joint.loc, mean, atol=1e-8)
    assert torch.allclose(joint.scale_tril @ joint.scale_tril.mT, cov, atol=1e-7)
    assert model.training  # modes restored


def test_batched_model():
    # a batch of 2 independent GPs: the MLL is per batch element
    x, y = _data()
    xb, yb = torch.stack([x, x + 0.1]), torch.stack([y, -y])
    lik = gpytorch.likelihoods.GaussianLikelihood(batch_shape=torch.Size([2])).double()
    kernel = gpytorch.kernels.RBFKernel(batch_shape=torch.Size([2]))
    model = _GP(xb, yb, lik, kernel).double()
    model.mean_module = gpytorch.means.ConstantMean(batch_shape=torch.Size([2])).double()
    mll = StudentTMarginalLogLikelihood(lik, model, a=2.0, b=1.0)
    value = mll(model(xb), yb) * 30
    assert value.shape == (2,)
    for i in range(2):
        with torch.no_grad():
            K = kernel(xb[i]).to_dense()[i] + lik.noise[i] * torch.eye(30, dtype=torch.float64)
        ref = MultivariateStudentT(torch.tensor(4.0, dtype=torch.float64),
                                   torch.zeros(30, dtype=torch.float64),
                                   torch.linalg.cholesky(0.5 * K)).log_prob(yb[i])
        assert abs(float(value[i].detach()) - float(ref)) < 1e-8


def test_nan_mask_policy_matches_dropping_points():
    x, y = _data()
    y_nan = y.clone()
    y_nan[[3, 11]] = math.nan
    model, lik = _model(x, y)
    mll = StudentTMarginalLogLikelihood(lik, model, a=2.0, b=2.0)
    model.train()
    with pytest.raises(ValueError, match="NaN"):
        mll(model(x), y_nan)
    with gpytorch.settings.observation_nan_policy("mask"):
        masked = mll(model(x), y_nan) * 30
    keep = torch.ones(30, dtype=torch.bool)
    keep[[3, 11]] = False
    Ky = _dense(model, lik, x[keep]) + lik.noise.detach() * torch.eye(28, dtype=torch.float64)
    ref = MultivariateStudentT(torch.tensor(4.0, dtype=torch.float64),
                               torch.full((28,), 0.3, dtype=torch.float64),
                               torch.linalg.cholesky(Ky)).log_prob(y[keep])
    assert abs(float(masked.detach()) - float(ref)) < 1e-8


def test_bad_input():
    x, y = _data()
    model, lik = _model(x, y)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="a must be positive"):
            StudentTMarginalLogLikelihood(lik, model, a=bad)
        with pytest.raises(ValueError, match="b must be positive"):
            StudentTMarginalLogLikelihood(lik, model, b=bad)
    with pytest.raises(TypeError, match="a must be a float"):
        StudentTMarginalLogLikelihood(lik, model, a="2")
    with pytest.raises(TypeError, match="likelihood"):
        StudentTMarginalLogLikelihood(gpytorch.likelihoods.BernoulliLikelihood(), model)
    mll = StudentTMarginalLogLikelihood(lik, model)
    model.train()
    with pytest.raises(ValueError, match="target must end with"):
        mll(model(x), y[:-1])
    with pytest.raises(TypeError, match="target"):
        mll(model(x), y.long())
    with pytest.raises(TypeError, match="MultivariateNormal"):
        mll(torch.distributions.Normal(0.0, 1.0), y)
    with pytest.raises(ValueError, match="X contains NaN"):
        mll.predictive(torch.full((2, 3), math.nan, dtype=torch.float64))
    with pytest.raises(TypeError, match="mll must be"):
        student_t_predictive(gpytorch.mlls.ExactMarginalLogLikelihood(lik, model), x)
