"""The Pyro FunBaT with other likelihoods: the guide covers the sites they add."""

import math
import warnings

import pyro
import pyro.distributions as dist
import torch

from pyro_dkm.likelihoods import Poisson
from pyro_dkm.tucker import FunctionalTucker, PyroFunctionalTucker
from pyro_dkm.tucker.pyro_model import TuckerMeanFieldGuide, guide_from_cep

F64 = torch.float64


def _counts(T=25, n=500, seed=0):
    g = torch.Generator().manual_seed(seed)
    grid = torch.linspace(0, 1, T, dtype=F64)
    idx = torch.randint(0, T, (n, 2), generator=g)
    x = grid[idx]
    log_rate = 1.0 + 1.2 * torch.sin(2 * math.pi * x[:, 0]) * torch.cos(math.pi * x[:, 1])
    return grid, idx, x, log_rate, torch.poisson(log_rate.exp(), generator=g)


class WithBias(PyroFunctionalTucker):
    """A user's subclass: Gaussian entries with a sampled global bias."""

    def likelihood_params(self):
        tau = super().likelihood_params()
        return tau, pyro.sample("bias", dist.Normal(torch.tensor(0.0, dtype=F64), 1.0))

    def likelihood(self, f, params):
        tau, bias = params
        return dist.Normal(f + bias, tau.rsqrt())


def test_guide_covers_sites_a_likelihood_adds_and_drops_tau_without_it():
    grid, idx, _, log_rate, y = _counts(T=8, n=60)
    for model, sites in ((WithBias([grid, grid], [2, 2]), {"bias", "tau"}),
                         (PyroFunctionalTucker([grid, grid], [2, 2], likelihood=Poisson()),
                          set())):
        guide = TuckerMeanFieldGuide(model)
        svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.01}),
                             pyro.infer.Trace_ELBO())
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "Found vars in model but not guide" is an error
            for _ in range(3):
                svi.step(idx, log_rate if isinstance(model, WithBias) else y)
        tr = pyro.poutine.trace(guide).get_trace(idx, y)
        got = {n for n, s in tr.nodes.items() if s["type"] == "sample"
               and not s["infer"].get("is_auxiliary")
               and type(s["fn"]).__name__ != "_Subsample"} - {"u_0", "u_1", "core"}
        assert got == sites, got
        pyro.clear_param_store()


def test_poisson_tucker_started_from_a_cep_fit_recovers_the_rate():
    # CEP on log counts starts the Poisson model; 200 SVI steps on the Poisson likelihood.
    # Held-out rate RMSE far below the constant predictor's, and no worse than the start
    # (measured: CEP start 0.50, after SVI 0.46-0.50 depending on the draws, constant 1.80).
    grid, idx, x, log_rate, y = _counts()
    tr, te = slice(0, 400), slice(400, 500)
    exposure = float(y[tr].mean())
    cep = FunctionalTucker([2, 2], nu=1.5, lengthscale=0.3, variance=0.5, core="cp",
                           progress=False, seed=0)
    cep.fit(x[tr], (y[tr] + 0.5).log() - math.log(exposure))
    true = log_rate[te].exp()
    start = float(((cep.predict(x[te])[0].exp() * exposure) - true).pow(2).mean().sqrt())
    model = PyroFunctionalTucker([grid, grid], [2, 2], nu=1.5, lengthscale=0.3, variance=0.5,
                                 core="cp", likelihood=Poisson(exposure=exposure))
    guide = guide_from_cep(model, cep)
    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.005}),
                         pyro.infer.Trace_ELBO())
    for _ in range(200):
        svi.step(idx[tr], y[tr])
    with torch.no_grad():
        rate = guide.mean_entries(model, idx[te]).exp() * exposure
    rmse = float((rate - true).pow(2).mean().sqrt())
    const = float((y[tr].mean() - true).pow(2).mean().sqrt())
    assert rmse < 0.35 * const, (rmse, const)
    assert rmse < start + 0.02, (rmse, start)


def test_fitted_cep_model_gives_its_pyro_model_and_guide():
    # pyro_model(): the Pyro twin on the fitted grids (plus prediction coordinates) with a
    # guide at the CEP posterior; its mean entries equal CEP's predictions (1e-8). The grid
    # is small and the lengthscale long: guide_from_cep inverts the chain's dense precision
    # (meant for moderate grids), whose conditioning with 100 coordinates 0.01 apart at
    # lengthscale 0.3 limits the agreement to ~1e-6 (measured), while the Kalman path is exact.
    g = torch.Generator().manual_seed(3)
    levels = torch.linspace(0, 1, 8, dtype=F64)
    X = levels[torch.randint(0, 8, (120, 2), generator=g)]
    y = torch.sin(3 * X[:, 0]) * torch.cos(2 * X[:, 1]) + 0.05 * torch.randn(120, generator=g,
                                                                              dtype=F64)
    held = X[100:] + 0.05  # coordinates CEP never saw
    cep = FunctionalTucker([2, 2], nu=1.5, lengthscale=1.0, progress=False, seed=0,
                           init="random", tol=1e-10, max_iter=300)
    cep.fit(X[:100], y[:100])
    assert not cep.collapsed
    pm, guide = cep.pyro_model(coords=held)
    index = torch.stack([torch.searchsorted(pm.grids[k], held[:, k].contiguous())
                         for k in range(2)], 1)
    torch.testing.assert_close(guide.mean_entries(pm, index), cep.predict(held).mean,
                               rtol=1e-8, atol=1e-8)


def test_pyro_tucker_trains_through_the_one_fit_with_minibatches():
    # pyro_dkm.fit on a PyroFunctionalTucker: minibatch SVI with the mean-field guide;
    # the fitted mean entries explain most of the variance of a rank-2 smooth tensor
    from pyro_dkm import fit

    grid, idx, x, log_rate, _ = _counts(T=12, n=300)
    values = log_rate - log_rate.mean()
    model = PyroFunctionalTucker([grid, grid], [2, 2], nu=1.5, lengthscale=0.3, core="cp")
    res = fit(model, idx, values, steps=400, lr=0.02, batch_size=100, progress=False)
    assert res.steps == 400 and isinstance(res.details, TuckerMeanFieldGuide)
    with torch.no_grad():
        resid = res.details.mean_entries(model, idx) - values
    assert float(resid.pow(2).mean()) < 0.2 * float(values.var()), float(resid.pow(2).mean())
    # num_data: a minibatch of 100 entries is scaled as the whole 300
    tr = pyro.poutine.trace(model.model).get_trace(idx[:100], values[:100], None, 300)
    tr.compute_log_prob()
    assert tr.nodes["obs"]["scale"] == 3.0
