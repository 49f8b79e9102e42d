"""FunctionalTucker (CEP) on data drawn from the model; Pyro/SVI agreement; bad input."""

import math

import numpy as np
import pyro
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO
from pyro.nn import PyroParam
from pyro.optim import ClippedAdam
from torch.distributions import constraints

from pyro_dkm.tucker import FunctionalTucker, discretise, matern_ssm
from pyro_dkm.tucker.pyro_model import (
    GaussMarkovChain,
    PyroFunctionalTucker,
    grids_and_index,
    guide_from_cep,
)

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


def _cep_and_pyro(max_iter=100):
    """A small Gaussian problem fitted by CEP, and the same model in Pyro over all grid points."""
    X, y, f = _synthetic([5, 6, 7], [2, 2, 2], 200, 0.1, seed=5)
    ntr = 160
    cep = FunctionalTucker(
        [2, 2, 2], lengthscale=2.0, progress=False, max_iter=max_iter, tol=1e-8, seed=1
    ).fit(X[:ntr], y[:ntr])
    grids, idx = grids_and_index(X)  # includes the held-out coordinates (unseen by CEP)
    pm = PyroFunctionalTucker(grids, [2, 2, 2], lengthscale=2.0)
    return X, y, ntr, cep, pm, idx


def _perturbed_svi(pm, cep, idx, y, ntr, eps, steps, lr, reset_scale, seed=0):
    """SVI with the CEP-family guide started from the CEP posterior with its means moved by
    ``eps`` N(0, 1) noise (and, optionally, its covariances reset to 0.02^2 I)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    guide = guide_from_cep(pm, cep)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k in range(pm.K):
            loc = getattr(guide, f"u_{k}_loc")
            setattr(guide, f"u_{k}_loc", PyroParam(loc + eps * torch.randn(loc.shape, generator=g,
                                                                           dtype=D)))
            if reset_scale:
                n = loc.shape[-1]
                tril = 0.02 * torch.eye(n, dtype=D).expand(loc.shape[0], n, n).clone()
                setattr(guide, f"u_{k}_scale_tril",
                        PyroParam(tril, constraint=constraints.lower_cholesky))
        guide.core_loc = PyroParam(guide.core_loc + eps * torch.randn(guide.core_loc.shape,
                                                                      generator=g, dtype=D))
    start = guide.mean_entries(pm, idx)
    svi = SVI(pm.model, guide, ClippedAdam({"lr": lr, "lrd": 0.1 ** (1 / steps)}), Trace_ELBO())
    for _ in range(steps):
        svi.step(idx[:ntr], y[:ntr])
    return guide, start, guide.mean_entries(pm, idx)


def test_cep_posterior_in_pyro_guide_and_svi_returns_to_it():
    # For Gaussian entries the CEP updates are coordinate ascent on the ELBO of the family of
    # TuckerMeanFieldGuide, so (1) the guide holding the CEP posterior predicts exactly what
    # CEP predicts, also at coordinates CEP never saw (conditional of the chain = neighbour
    # conditioning), and (2) SVI on the Pyro model, started with the means moved away,
    # comes back to the CEP predictions.
    noise = 0.1
    X, y, ntr, cep, pm, idx = _cep_and_pyro()
    mu_cep, _ = cep.predict(X)
    guide = guide_from_cep(pm, cep)
    torch.testing.assert_close(guide.mean_entries(pm, idx), mu_cep, rtol=0, atol=1e-8)
    assert float(((mu_cep[ntr:] - y[ntr:]) ** 2).mean().sqrt()) < 1.5 * noise
    _, start, end = _perturbed_svi(pm, cep, idx, y, ntr, eps=0.1, steps=250, lr=0.01,
                                   reset_scale=False)
    before = float(((start - mu_cep) ** 2).mean().sqrt())
    after = float(((end - mu_cep) ** 2).mean().sqrt())
    # moved by ~1.5-2 noise sds, back to a fraction of the noise (SVI noise: 1 particle)
    assert before > 1.2 * noise and after < 0.4 * noise, (before, after)


@pytest.mark.slow
def test_cep_and_pyro_svi_agree():
    # longer SVI from a larger perturbation with the guide covariances reset: predictions at
    # training and held-out coordinates and the noise level agree with CEP
    noise = 0.1
    X, y, ntr, cep, pm, idx = _cep_and_pyro(max_iter=300)
    mu_cep, _ = cep.predict(X)
    guide, start, end = _perturbed_svi(pm, cep, idx, y, ntr, eps=0.3, steps=1500, lr=0.01,
                                       reset_scale=True)
    assert float(((start - mu_cep) ** 2).mean().sqrt()) > 3 * noise
    assert float(((end - mu_cep) ** 2).mean().sqrt()) < 0.2 * noise
    assert float(((end[ntr:] - mu_cep[ntr:]) ** 2).mean().sqrt()) < 0.25 * noise
    noise_svi = float((guide.tau_rate / (guide.tau_concentration - 1)).sqrt().detach())
    assert abs(noise_svi - cep.noise_variance**0.5) < 0.15 * noise, noise_svi


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


# its tiny rank-1, two-sweep fits may collapse (and be restarted): not what it tests
@pytest.mark.filterwarnings("ignore::pyro_dkm.tucker.model.CollapsedFitWarning")
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
    with pytest.raises(ValueError, match="init"):
        FunctionalTucker([2, 2, 2], init="svd")
    with pytest.raises(RuntimeError, match="fit"):
        FunctionalTucker([2, 2, 2]).predict(np.zeros((3, 3)))
    m = FunctionalTucker([1, 1, 1], progress=False, max_iter=2).fit(
        np.random.rand(20, 3), np.random.rand(20)
    )
    with pytest.raises(ValueError, match="3 columns"):
        m.predict(np.zeros((3, 4)))
    with pytest.raises(ValueError, match="finite"):
        m.predict(np.full((3, 3), math.nan))


def test_collapsed_als_start_is_detected_and_restarted():
    # 200 entries with unique coordinates, ranks [2, 2, 2]: the ALS start (seed 1) ends at
    # the all-zero fixed point (training RMSE = rms(values), constant predictions). fit()
    # detects it, warns, and refits from a random start, which fits (RMSE 0.08).
    import warnings

    from pyro_dkm.tucker.model import CollapsedFitWarning

    g = torch.Generator().manual_seed(1)
    X = torch.rand(200, 3, generator=g, dtype=torch.float64)
    y = (torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1]) + X[:, 2]
         + 0.1 * torch.randn(200, generator=g, dtype=torch.float64))
    m = FunctionalTucker([2, 2, 2], nu=1.5, lengthscale=0.3, progress=False, seed=1)
    with pytest.warns(CollapsedFitWarning, match="collapsed to a constant"):
        m.fit(X, y)
    assert m.restarted and not m.collapsed
    rmse = float((m.predict(X).mean - y).pow(2).mean().sqrt())
    assert rmse < 0.2 * float(y.pow(2).mean().sqrt()), rmse
    with warnings.catch_warnings():  # a start that does not collapse: no warning, no restart
        warnings.simplefilter("error", CollapsedFitWarning)
        m0 = FunctionalTucker([2, 2, 2], nu=1.5, lengthscale=0.3, progress=False, seed=0)
        m0.fit(X, y)
    assert not m0.restarted


def test_values_are_fitted_at_their_own_scale_and_too_few_entries_are_refused():
    # values x 1e8 (the ALS start used to fail with a singular solve, then fits were wrong):
    # values of extreme spread are fitted in units of their power-of-ten scale, so it is the
    # fit of the unscaled values, rescaled (1e-8 relative); fewer than 3 entries: an error
    # (E[1/tau] needs a0 + N/2 > 1; 1 entry used to report a noise variance of 2.6e12)
    g = torch.Generator().manual_seed(0)
    X = torch.rand(200, 3, generator=g, dtype=torch.float64)
    y = torch.sin(3 * X[:, 0]) + X[:, 1] + 0.1 * torch.randn(200, generator=g,
                                                           dtype=torch.float64)
    base = FunctionalTucker([2, 2, 2], progress=False, seed=0).fit(X, y)
    big = FunctionalTucker([2, 2, 2], progress=False, seed=0).fit(X, y * 1e8)
    p0, p1 = base.predict(X[:20]), big.predict(X[:20])
    torch.testing.assert_close(p1.mean / 1e8, p0.mean, rtol=1e-8, atol=1e-8)
    torch.testing.assert_close(p1.variance / 1e16, p0.variance, rtol=1e-8, atol=1e-10)
    assert abs(big.noise_variance / 1e16 - base.noise_variance) < 1e-8 * base.noise_variance
    for n in (1, 2):
        with pytest.raises(ValueError, match="at least 3 entries"):
            FunctionalTucker([2, 2, 2], progress=False).fit(X[:n], y[:n])
