"""The exact regression models as Pyro models: ``model()`` for NUTS / SVI."""

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import MCMC, NUTS
from pyro.nn import PyroSample

from pyro_dkm.processes import (
    GaussianProcessRegression,
    ScaleMixtureRegression,
    StudentTProcessRegression,
)

F64 = torch.float64


def _data(n=50, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, 2, generator=g, dtype=F64)
    y = torch.sin(2 * X[:, 0]) + 0.2 * torch.randn(n, generator=g, dtype=F64)
    return X, y


def test_model_log_density_is_the_closed_form_marginal():
    # the model's observed site has log p(y) = log_marginal() (same maths, 1e-10)
    X, y = _data(30)
    for m in (GaussianProcessRegression(X, y), StudentTProcessRegression(X, y)):
        tr = pyro.poutine.trace(m.model).get_trace()
        tr.compute_log_prob()
        got, want = tr.nodes["y"]["log_prob_sum"].item(), m.log_marginal().item()
        assert abs(got - want) < 1e-10


def test_scale_mixture_model_integrates_to_the_quadrature_marginal():
    # the scale is a latent site: the Monte-Carlo average of p(y | s) over s ~ prior
    # equals the quadrature marginal (log-mean-exp over 20000 prior draws, 2e-2)
    X, y = _data(15)
    prior = dist.Gamma(torch.tensor(2.0, dtype=F64), torch.tensor(2.0, dtype=F64))
    m = ScaleMixtureRegression(X, y, prior)
    with pyro.plate("draws", 20000, dim=-1):
        tr = pyro.poutine.trace(m.model).get_trace()
    lp = tr.nodes["y"]["fn"].log_prob(y)
    mc = (torch.logsumexp(lp, 0) - torch.log(torch.tensor(20000.0))).item()
    want = m.log_marginal().item()
    assert abs(mc - want) < 2e-2, (mc, want)


def test_nuts_on_student_t_process_hyper_parameters_mixes():
    # PyroSample priors on the noise and the rate: NUTS runs on model() and its chain
    # has split-chain r_hat < 1.1 for both (50 points)
    X, y = _data(50)
    tp = StudentTProcessRegression(X, y, learn_concentration=False)
    tp.noise = PyroSample(dist.LogNormal(torch.tensor(-3.0, dtype=F64),
                                         torch.tensor(1.0, dtype=F64)))
    tp.rate = PyroSample(dist.LogNormal(torch.tensor(0.0, dtype=F64),
                                        torch.tensor(1.0, dtype=F64)))
    mcmc = MCMC(NUTS(tp.model), num_samples=150, warmup_steps=150, disable_progbar=True)
    mcmc.run()
    diag = mcmc.diagnostics()
    for site in ("noise", "rate"):
        assert float(diag[site]["r_hat"]) < 1.1, (site, diag[site])
    noise = mcmc.get_samples()["noise"]
    assert 0.005 < float(noise.median()) < 0.2  # the data's noise variance is 0.04
