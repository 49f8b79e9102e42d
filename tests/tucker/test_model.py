"""FunctionalTucker (CEP) on data drawn from the model; Pyro/SVI agreement; bad input."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.infer.autoguide import AutoMultivariateNormal
from pyro.infer.autoguide.initialization import init_to_median, init_to_value

from pyro_dkm.tucker import FunctionalTucker, discretise, matern_ssm
from pyro_dkm.tucker.pyro_model import GaussMarkovChain, PyroFunctionalTucker, grids_and_index

D = torch.float64


def _synthetic(n_u, ranks, n, noise, seed, ell=2.0, nu=1.5):
    """Entries drawn from the FunBaT prior: Matern factors via the exact SSM, N(0,1) core."""
    g = torch.Generator().manual_seed(seed)
    grids = [torch.sort(torch.rand(m, generator=g, dtype=D) * 5).values for m in n_u]
    fs = []
    for grid, R in zip(grids, ranks):
        ssm = matern_ssm(nu, ell, 1.0)
        A, Q = discretise(ssm, torch.cat([grid.new_zeros(1), grid.diff()]))
        torch.manual_seed(seed)
        fs.append(GaussMarkovChain(ssm.P_inf, A, Q).sample((R,))[..., 0].T)  # (m, R)
    W = torch.randn(*ranks, generator=g, dtype=D)
    idx = torch.stack([torch.randint(0, m, (n,), generator=g) for m in n_u], 1)
    f = torch.einsum("abc,na,nb,nc->n", W, fs[0][idx[:, 0]], fs[1][idx[:, 1]], fs[2][idx[:, 2]])
    y = f + noise * torch.randn(n, generator=g, dtype=D)
    X = torch.stack([grids[k][idx[:, k]] for k in range(3)], 1)
    return X, y, f


def test_recovers_held_out_entries_near_noise_level():
    noise = 0.1
    X, y, f = _synthetic([30, 40, 50], [2, 2, 2], 3000, noise, seed=3)
    m = FunctionalTucker([2, 2, 2], nu=1.5, lengthscale=2.0, progress=False, max_iter=100, tol=1e-5)
    m.fit(X[:2400], y[:2400])
    mu, var = m.predict(X[2400:])
    rmse = float(((mu - y[2400:]) ** 2).mean().sqrt())
    # the best possible test RMSE is the noise std 0.1 (SE of the RMSE on 600 points ~ 0.003)
    assert rmse < 1.15 * noise, rmse
    assert abs(m.noise_variance**0.5 - noise) < 0.015
    # calibrated predictive variance: mean squared z-score ~ 1 (SE ~ sqrt(2/600) = 0.06)
    z2 = float(((mu - y[2400:]) ** 2 / var).mean())
    assert 0.75 < z2 < 1.3, z2
    # unseen coordinates: perturbing coordinates slightly changes predictions slightly (continuity)
    mu2, _ = m.predict(X[2400:] + 1e-4)
    assert float((mu2 - mu).abs().max()) < 0.05


def test_cp_is_diagonal_core():
    X, y, f = _synthetic([20, 25, 30], [2, 2, 2], 800, 0.1, seed=4)
    m = FunctionalTucker([2, 2, 2], core="cp", lengthscale=2.0, progress=False, max_iter=25).fit(
        X, y
    )
    Mfull, _, _ = m._core_full()
    assert m.core_mean.shape == (2,)
    off = Mfull.clone()
    off[0, 0, 0] = off[1, 1, 1] = 0
    assert torch.equal(off, torch.zeros_like(off))
    # the CP fit explains most of the variance (it is misspecified for a Tucker truth)
    assert m.history[-1]["train_rmse"] < 0.8 * float(y.std())


@pytest.mark.slow
def test_cep_and_pyro_svi_agree():
    # KNOWN FAILING (see docs/tucker.md): 1500 SVI steps do not yet reach the CEP fit.
    # small Gaussian problem: CEP posterior-mean predictions vs SVI (full-covariance Gaussian guide)
    noise = 0.1
    X, y, f = _synthetic([5, 6, 7], [2, 2, 2], 200, noise, seed=5)
    ntr = 160
    cep = FunctionalTucker(
        [2, 2, 2], lengthscale=2.0, progress=False, max_iter=400, tol=1e-7, seed=1
    )
    cep.fit(X[:ntr], y[:ntr])
    mu_cep, _ = cep.predict(X[ntr:])
    pyro.clear_param_store()
    pyro.set_rng_seed(0)
    grids, idx = grids_and_index(X)
    pm = PyroFunctionalTucker(grids, [2, 2, 2], lengthscale=2.0)
    init = init_to_value(values={"tau": torch.tensor(10.0, dtype=D)}, fallback=init_to_median)
    guide = AutoMultivariateNormal(pm.model, init_scale=0.05, init_loc_fn=init)
    svi = SVI(pm.model, guide, pyro.optim.ClippedAdam({"lr": 0.03, "lrd": 0.998}), Trace_ELBO())
    for _ in range(1500):
        svi.step(idx[:ntr], y[:ntr])
    pred = pyro.infer.Predictive(
        pm.model, guide=guide, num_samples=300, return_sites=["_RETURN", "tau"]
    )
    out = pred(idx[ntr:])
    mu_svi = out["_RETURN"].mean(0)
    # both should predict held-out entries to about the noise level, and agree with each other
    # to a fraction of it (different approximations: mean-field CEP vs joint Gaussian SVI)
    rmse_cep = float(((mu_cep - y[ntr:]) ** 2).mean().sqrt())
    rmse_svi = float(((mu_svi - y[ntr:]) ** 2).mean().sqrt())
    diff = float(((mu_svi - mu_cep) ** 2).mean().sqrt())
    assert rmse_cep < 2 * noise and rmse_svi < 2 * noise, (rmse_cep, rmse_svi)
    assert diff < 0.6 * noise, diff
    noise_svi = float((1 / out["tau"]).mean().sqrt())
    assert abs(noise_svi - cep.noise_variance**0.5) < 0.05


def test_gauss_markov_chain_log_prob_matches_dense():
    x = torch.tensor([0.0, 0.3, 1.0, 1.1, 2.5], dtype=D)
    ssm = matern_ssm(1.5, 0.8, 1.2)
    A, Q = discretise(ssm, torch.cat([x.new_zeros(1), x.diff()]))
    d = GaussMarkovChain(ssm.P_inf, A, Q)
    s = d.sample((3,))
    # joint covariance of the stacked states: Cov(x_i, x_j) = expm(F (t_i - t_j)) P_inf for i >= j
    T, k = 5, 2
    C = torch.zeros(T * k, T * k, dtype=D)
    for i in range(T):
        for j in range(T):
            dt = (x[i] - x[j]).abs()
            Aij = torch.linalg.matrix_exp(ssm.F * dt)
            blk = Aij @ ssm.P_inf if i >= j else ssm.P_inf @ Aij.T
            C[i * k : (i + 1) * k, j * k : (j + 1) * k] = blk
    ref = torch.distributions.MultivariateNormal(torch.zeros(T * k, dtype=D), C).log_prob(
        s.reshape(3, -1)
    )
    torch.testing.assert_close(d.log_prob(s), ref, rtol=0, atol=1e-8)


@pytest.mark.parametrize(
    "coords,values,match",
    [
        (np.zeros((10, 2)), np.zeros(10), "3 columns"),
        (np.zeros(10), np.zeros(10), "shape"),
        (np.r_[np.zeros((9, 3)), [[np.nan, 0, 0]]], np.zeros(10), "finite"),
        (np.r_[np.zeros((9, 3)), [[np.inf, 0, 0]]], np.zeros(10), "finite"),
        (np.zeros((10, 3)), np.r_[np.zeros(9), np.nan], "values must be finite"),
        (np.zeros((10, 3)), np.zeros(9), "entries"),
    ],
)
def test_bad_data_raises(coords, values, match):
    with pytest.raises(ValueError, match=match):
        FunctionalTucker([2, 2, 2], progress=False).fit(coords, values)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="ranks must be >= 1"):
        FunctionalTucker([2, 0, 2])
    with pytest.raises(TypeError, match="ranks"):
        FunctionalTucker(3)
    with pytest.raises(TypeError, match="ranks must be ints"):
        FunctionalTucker([2.5, 2, 2])
    with pytest.raises(ValueError, match="nu"):
        FunctionalTucker([2, 2, 2], nu=2.0)
    with pytest.raises(ValueError, match="lengthscale"):
        FunctionalTucker([2, 2, 2], lengthscale=[1.0, -1.0, 1.0])
    with pytest.raises(ValueError, match="cp"):
        FunctionalTucker([2, 3, 2], core="cp")
    with pytest.raises(RuntimeError, match="fit"):
        FunctionalTucker([2, 2, 2]).predict(np.zeros((3, 3)))
    m = FunctionalTucker([1, 1, 1], progress=False, max_iter=2).fit(
        np.random.rand(20, 3), np.random.rand(20)
    )
    with pytest.raises(ValueError, match="3 columns"):
        m.predict(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        m.predict(np.full((3, 3), math.nan))
