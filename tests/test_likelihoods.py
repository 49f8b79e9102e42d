"""Likelihood objects: expectations against closed forms / quadrature / Monte Carlo."""

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_dkm import likelihoods as L

F64 = torch.float64


def _marginals(n=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, generator=g, dtype=F64),
            0.1 + torch.rand(n, generator=g, dtype=F64))


def _mc(lik, m, v, y, n=400000, seed=1):
    """Monte-Carlo mean of log p(y | f) and its standard error."""
    g = torch.Generator().manual_seed(seed)
    f = m + v.sqrt() * torch.randn((n,) + m.shape, generator=g, dtype=F64)
    lp = lik.conditional(f).log_prob(y)
    return lp.mean(0), lp.std(0) / n ** 0.5


def _close_to_mc(got, mc):
    mean, se = mc
    assert bool(((got - mean).abs() < 4 * se + 1e-12).all()), ((got - mean) / se)


def test_closed_forms_and_quadrature_agree_with_monte_carlo():
    # E_{N(m, v)} log p(y | f): Gaussian and Poisson closed forms, Gauss-Hermite for the
    # others; Monte Carlo with 4e5 draws as the reference, within 4 standard errors
    m, v = _marginals()
    cases = [
        (L.Gaussian(0.3), torch.randn(7, dtype=F64)),
        (L.Poisson(exposure=2.0), torch.tensor([0.0, 1, 2, 3, 5, 0, 8], dtype=F64)),
        (L.Bernoulli(), torch.tensor([0.0, 1, 1, 0, 1, 0, 1], dtype=F64)),
        (L.StudentT(df=3.0, scale=0.5), torch.randn(7, dtype=F64)),
    ]
    for lik, y in cases:
        _close_to_mc(lik.expected_log_prob(m, v, y), _mc(lik, m, v, y))
    # quadrature is exact for the Gaussian: its expectation is a quadratic in f
    gauss = L.Gaussian(0.3)
    quad = L.Likelihood.expected_log_prob(gauss, m, v, cases[0][1])
    torch.testing.assert_close(quad, gauss.expected_log_prob(m, v, cases[0][1]),
                               rtol=1e-12, atol=1e-12)


def test_predictive_distributions():
    m, v = _marginals()
    pred = L.Bernoulli().predictive(m, v)
    assert isinstance(pred, torch.distributions.Bernoulli)
    g = torch.Generator().manual_seed(2)
    f = m + v.sqrt() * torch.randn((400000, 7), generator=g, dtype=F64)
    torch.testing.assert_close(pred.probs, torch.sigmoid(f).mean(0), rtol=0, atol=3e-3)
    pois = L.Poisson().predictive(m, v)  # E[y] = exp(m + v / 2) for the log link
    torch.testing.assert_close(pois.mean, (m + v / 2).exp(), rtol=1e-6, atol=0)
    gauss = L.Gaussian(0.3).predictive(m, v)
    torch.testing.assert_close(gauss.variance, v + 0.3, rtol=1e-12, atol=0)
    cat = L.Categorical(predictive_samples=16).predictive(torch.zeros(5, 3, dtype=F64),
                                                          torch.ones(5, 3, dtype=F64))
    assert isinstance(cat, torch.distributions.Categorical) and cat.probs.shape == (5, 3)


def test_site_inside_a_plate_and_sampling_without_y():
    m, v = _marginals()
    y = torch.tensor([0.0, 1, 2, 3, 5, 0, 8], dtype=F64)
    lik = L.Poisson()

    def model(y):
        with pyro.plate("data", 7):
            return lik(m, v, y)

    tr = pyro.poutine.trace(model).get_trace(y)
    tr.compute_log_prob()
    torch.testing.assert_close(tr.nodes["y"]["log_prob_sum"],
                               lik.expected_log_prob(m, v, y).sum())
    sample = model(None)
    assert sample.shape == (7,) and bool((sample >= 0).all())


def test_function_likelihood_and_names():
    lik = L.as_likelihood(lambda f: dist.Gamma(2.0, 2.0 / f.exp()))
    assert isinstance(lik, L.FunctionLikelihood)
    m, v = _marginals()
    y = torch.rand(7, dtype=F64) + 0.1
    _close_to_mc(lik.expected_log_prob(m, v, y), _mc(lik, m, v, y))
    assert isinstance(L.as_likelihood("bernoulli"), L.Bernoulli)


def test_bad_targets_are_named():
    m, v = _marginals()
    with pytest.raises(ValueError, match="non-negative integer counts"):
        L.Poisson()(m, v, torch.full((7,), -1.0, dtype=F64))
    with pytest.raises(ValueError, match="0/1 labels"):
        L.Bernoulli()(m, v, torch.full((7,), 0.5, dtype=F64))
    with pytest.raises(ValueError, match="finite"):
        L.Gaussian()(m, v, torch.full((7,), float("nan"), dtype=F64))
    with pytest.raises(ValueError, match="variance must be positive"):
        L.Gaussian(-1.0)
