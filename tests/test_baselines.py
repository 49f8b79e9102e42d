"""Baselines of the UCI benchmark: SVGP, 2-layer deep GP, exact NNGP regression."""

import math

import pytest
import torch
from torch.distributions import Normal

from pyro_dkm.baselines import (
    DeepGPRegressor,
    NNGPRegressor,
    SVGPRegressor,
    gaussian_test_metrics,
)
from pyro_dkm.kernels.nngp import Dense, Relu, serial


def _sin_data(n=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n, 1, generator=g, dtype=torch.float64) * 6 - 3
    y = torch.sin(2 * X[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    return X, (y - y.mean()) / y.std()


def test_gaussian_test_metrics_closed_form():
    # N(0, 1) on standardised y = 0 with y_std = 2, y_mean = 5: y_orig = 5, predictive
    # N(5, 2^2) so log p = -0.5 log(2 pi) - log 2; RMSE = 0. And y = 1 -> error 2 in original units.
    pred = Normal(torch.zeros(2, dtype=torch.float64), torch.ones(2, dtype=torch.float64))
    ll, rmse = gaussian_test_metrics(pred, torch.tensor([0.0, 0.0], dtype=torch.float64), 5.0, 2.0)
    assert ll == pytest.approx(-0.5 * math.log(2 * math.pi) - math.log(2.0), abs=1e-12)
    assert rmse == pytest.approx(0.0, abs=1e-12)
    _, rmse = gaussian_test_metrics(pred, torch.tensor([1.0, -1.0], dtype=torch.float64), 5.0, 2.0)
    assert rmse == pytest.approx(2.0, abs=1e-12)


def test_nngp_regressor_matches_dense_gp_formulas():
    # With 0 training steps the hyper-parameters stay at their initial values
    # (weight var 2, bias var 0.1, scale 1, noise 0.1); the predictive must equal the GP
    # formulas evaluated with a dense solve (torch.linalg.solve, no Cholesky), to 1e-9.
    X, y = _sin_data(40)
    Xt = torch.linspace(-3, 3, 7, dtype=torch.float64)[:, None]
    m = NNGPRegressor(depth=2)
    m.fit(X, y, epochs=0)
    pred = m.predict(Xt)
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1))
    K = kfn(X, get="nngp") + 0.1 * torch.eye(40, dtype=torch.float64)
    Kt = kfn(Xt, X, get="nngp")
    mean = Kt @ torch.linalg.solve(K, y)
    var = kfn(Xt, get="nngp").diagonal() - (Kt * torch.linalg.solve(K, Kt.T).T).sum(1) + 0.1
    assert torch.allclose(pred.loc, mean, atol=1e-9)
    assert torch.allclose(pred.variance, var, atol=1e-9)


def test_nngp_regressor_training_increases_marginal_likelihood():
    X, y = _sin_data(60)
    m = NNGPRegressor(depth=2)
    m.fit(X, y, epochs=0)
    before = m.gp.log_marginal().item()
    m.fit(X, y, epochs=25, lr=0.05)
    after = m.gp.log_marginal().item()
    assert after > before + 1.0


@pytest.mark.parametrize("cls", [SVGPRegressor,
                                 pytest.param(DeepGPRegressor, marks=pytest.mark.slow)])
def test_sparse_baselines_learn_a_sine(cls):
    # y = sin(2x) + 0.1 noise, standardised: predicting 0 gives RMSE ~1; a fitted GP must get
    # RMSE < 0.35 on a noise-free test grid (noise std ~0.14 in these units) and a
    # predictive that is a Normal of the right shape with positive scale.
    X, y = _sin_data(80)
    m = cls(num_inducing=10, seed=0)
    spe = m.fit(X, y, epochs=70, batch_size=None, lr=0.05)
    assert spe > 0
    Xt = torch.linspace(-2.8, 2.8, 50, dtype=torch.float64)[:, None]
    yt = torch.sin(2 * Xt[:, 0])
    yt = (yt - torch.sin(2 * X[:, 0]).mean()) / (torch.sin(2 * X[:, 0]) + 0.0).std()
    pred = m.predict(Xt)
    assert isinstance(pred, Normal) and pred.loc.shape == (50,)
    assert (pred.scale > 0).all()
    _, rmse = gaussian_test_metrics(pred, yt)
    assert rmse < 0.35


def test_dgp_log_predictive_is_mixture_of_the_samples():
    X, y = _sin_data(50)
    m = DeepGPRegressor(num_inducing=8, num_samples=4, seed=0)
    m.fit(X, y, epochs=2)
    torch.manual_seed(1)
    lp = m.log_predictive(X[:5], y[:5], num_samples=16)
    torch.manual_seed(1)
    mu, var = m._mixture(X[:5], True, 16)
    manual = (torch.logsumexp(Normal(mu, var.sqrt()).log_prob(y[:5]), 0) - math.log(16)).mean()
    assert lp == pytest.approx(manual.item(), abs=1e-10)


@pytest.mark.parametrize("cls", [SVGPRegressor, DeepGPRegressor, NNGPRegressor])
def test_bad_input(cls):
    X, y = _sin_data(20)
    m = cls()
    with pytest.raises(RuntimeError, match="fit"):
        m.predict(X)
    with pytest.raises(ValueError, match="y"):
        m.fit(X, y[:-1], epochs=1)
    Xn = X.clone()
    Xn[0, 0] = float("nan")
    with pytest.raises(ValueError, match="X"):
        m.fit(Xn, y, epochs=1)


def _assert_ard_gp_posterior(m, X, y, Xt):
    """``m.predict(Xt)`` equals the textbook GP posterior given ``(X, y)`` with m's learned
    ARD RBF kernel, constant mean and noise, computed here by hand (1e-8)."""
    cov = m.model.covar_module
    ell = cov.base_kernel.lengthscale.detach()[0]
    amp = cov.outputscale.detach()
    noise = m.model.likelihood.noise.detach()[0]
    c = m.model.mean_module.constant.detach()

    def k(a, b):
        return amp * torch.exp(-0.5 * torch.cdist(a / ell, b / ell) ** 2)

    K = k(X, X) + noise * torch.eye(len(X), dtype=torch.float64)
    Ks = k(Xt, X)
    mean = c + Ks @ torch.linalg.solve(K, y - c)
    var = amp - (Ks * torch.linalg.solve(K, Ks.T).T).sum(1) + noise
    p = m.predict(Xt)
    torch.testing.assert_close(p.mean, mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(p.variance, var, rtol=1e-6, atol=1e-8)


def test_ard_gp_baseline_predicts_the_closed_form_posterior_of_its_fitted_kernel():
    # after type-II ML, the predictive equals the textbook GP posterior with the learned
    # ARD RBF kernel, constant mean and noise (computed here by hand, 1e-8), and the
    # irrelevant third input got the longest lengthscale
    from pyro_dkm.baselines import ARDGPRegressor

    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 3, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.3 * X[:, 1] + 0.05 * torch.randn(60, generator=g,
                                                                    dtype=torch.float64)
    Xt = torch.randn(8, 3, generator=g, dtype=torch.float64)
    m = ARDGPRegressor()
    m.fit(X, y, epochs=150)
    _assert_ard_gp_posterior(m, X, y, Xt)
    ell = m.model.covar_module.base_kernel.lengthscale.detach()[0]
    assert int(ell.argmax()) == 2, ell


@pytest.mark.parametrize("condition_on_all", [True, False])
def test_ard_gp_baseline_on_a_subset_conditions_on_the_rows_asked_for(condition_on_all):
    # hyper-parameters fitted on max_train = 25 random rows of 60; the predictive is the
    # closed-form posterior of that kernel given all 60 rows (default) or only the 25
    from pyro_dkm.baselines import ARDGPRegressor

    g = torch.Generator().manual_seed(1)
    X = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.sin(2 * X[:, 0]) + 0.05 * torch.randn(60, generator=g, dtype=torch.float64)
    Xt = torch.randn(8, 2, generator=g, dtype=torch.float64)
    m = ARDGPRegressor(max_train=25, seed=3, condition_on_all=condition_on_all)
    m.fit(X, y, epochs=60)
    idx = torch.randperm(60, generator=torch.Generator().manual_seed(3))[:25]
    Xc, yc = (X, y) if condition_on_all else (X[idx], y[idx])
    _assert_ard_gp_posterior(m, Xc, yc, Xt)
    # the hyper-parameters are those of a fit on the subset alone
    ref = ARDGPRegressor(seed=3)
    ref.fit(X[idx], y[idx], epochs=60)
    torch.testing.assert_close(ref.model.covar_module.base_kernel.lengthscale,
                               m.model.covar_module.base_kernel.lengthscale, rtol=1e-10,
                               atol=1e-12)
    with pytest.raises(ValueError, match="max_train"):
        ARDGPRegressor(max_train=0)
