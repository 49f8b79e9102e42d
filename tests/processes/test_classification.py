"""Sparse variational Student-t process (SVTP) and SVGP classifiers: the ELBO's closed-form
pieces, agreement with Pyro's own ELBO on model/guide, the s -> 1 limit equals the SVGP,
training on a small synthetic problem, and bad input."""

import math

import gpytorch
import pyro
import pyro.distributions as dist
import pytest
import torch
from torch.distributions import kl_divergence

from pyro_dkm.kernels.nngp import Dense, Relu, serial
from pyro_dkm.processes.classification import (
    NNGPCovariance,
    SparseVariationalClassifier,
    SVGPClassifier,
    SVTPClassifier,
    classification_metrics,
    fit_classifier,
    kl_inverse_gamma,
    kl_lognormal_inverse_gamma,
    kl_whitened_gaussian,
)

F64 = torch.float64



def _t(x):
    return torch.tensor(x, dtype=F64)


def _blobs(n_per=50, seed=0):
    """Three Gaussian blobs in 2-D (well separated: Bayes accuracy ~ 0.99)."""
    g = torch.Generator().manual_seed(seed)
    centres = _t([[2.0, 0.0], [-1.0, 1.7], [-1.0, -1.7]])
    X = torch.cat([c + 0.6 * torch.randn(n_per, 2, generator=g, dtype=F64) for c in centres])
    y = torch.arange(3).repeat_interleave(n_per)
    perm = torch.randperm(3 * n_per, generator=g)
    return X[perm], y[perm]


def _randomise_q(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    C, M = model.num_classes, model.num_inducing
    with torch.no_grad():
        model.v_loc_unconstrained.copy_(torch.randn(C, M, generator=g, dtype=F64))
        L = torch.eye(M, dtype=F64) * 0.5 + 0.1 * torch.randn(M, M, generator=g, dtype=F64).tril(-1)
        if model.v_scale_tril.dim() == 3:
            L = L.expand(C, M, M).clone()
        model.v_scale_tril = L  # PyroModule setter of a constrained PyroParam


# --------------------------------------------------------------------------- closed forms
@pytest.mark.parametrize("aq,bq,ap,bp", [(5.0, 4.0, 3.0, 2.0), (1.2, 0.3, 2.0, 2.0),
                                         (40.0, 41.0, 1.0, 1.0)])
def test_kl_inverse_gamma_closed_form(aq, bq, ap, bp):
    got = kl_inverse_gamma(_t(aq), _t(bq), _t(ap), _t(bp))
    # KL is invariant under s -> 1/s: torch's Gamma-Gamma KL (rates b)
    ref = kl_divergence(torch.distributions.Gamma(_t(aq), _t(bq)),
                        torch.distributions.Gamma(_t(ap), _t(bp)))
    assert abs(float(got - ref)) < 1e-12
    # and Monte Carlo of log q - log p under q (4 standard errors)
    q, p = dist.InverseGamma(_t(aq), _t(bq)), dist.InverseGamma(_t(ap), _t(bp))
    s = q.sample((200_000,))
    d = q.log_prob(s) - p.log_prob(s)
    assert abs(float(d.mean() - got)) < 4 * float(d.std()) / math.sqrt(s.numel())


@pytest.mark.parametrize("mu,sigma,a,b", [(0.0, 0.3, 2.0, 2.0), (1.0, 1.0, 0.7, 3.0),
                                          (-0.5, 0.05, 10.0, 5.0)])
def test_kl_lognormal_inverse_gamma_monte_carlo(mu, sigma, a, b):
    got = float(kl_lognormal_inverse_gamma(_t(mu), _t(sigma), _t(a), _t(b)))
    q, p = dist.LogNormal(_t(mu), _t(sigma)), dist.InverseGamma(_t(a), _t(b))
    s = q.sample((400_000,))
    d = q.log_prob(s) - p.log_prob(s)
    assert abs(float(d.mean()) - got) < 4 * float(d.std()) / math.sqrt(s.numel())


@pytest.mark.parametrize("shared", [True, False])
def test_kl_whitened_gaussian_equals_torch(shared):
    g = torch.Generator().manual_seed(0)
    C, M = 3, 5
    m = torch.randn(C, M, generator=g, dtype=F64)
    shape = (M, M) if shared else (C, M, M)
    L = torch.randn(shape, generator=g, dtype=F64).tril(-1) + torch.diag_embed(
        torch.rand(shape[:-1], generator=g, dtype=F64) + 0.2)
    got = kl_whitened_gaussian(m, L)
    q = torch.distributions.MultivariateNormal(m, scale_tril=L.expand(C, M, M))
    p = torch.distributions.MultivariateNormal(torch.zeros(C, M, dtype=F64),
                                               torch.eye(M, dtype=F64).expand(C, M, M))
    assert abs(float(got - kl_divergence(q, p).sum())) < 1e-10


def test_latent_marginals_equal_unwhitened_sparse_gp():
    X, _ = _blobs(10)
    Z = X[:6].clone() + 0.05
    model = SVGPClassifier(Z, 3, shared_covariance=False)
    _randomise_q(model)
    mean, var = model.latent_marginals(X)
    # q(u_c) = N(L m_c, L S_c L^T); f = K_xZ K^-1 u + N(0, k_xx - K_xZ K^-1 K_Zx)
    kern = model.kernel
    with torch.no_grad():
        Kzz, Kzx, kxx = kern(Z), kern(Z, X), kern(X, diag=True)
        L = torch.linalg.cholesky(Kzz)
        W = torch.linalg.solve(Kzz, Kzx)  # (M, N)
        for c in range(3):
            Lq = model.v_scale_tril[c]
            Su = L @ Lq @ Lq.mT @ L.T
            ref_mean = W.T @ (L @ model.v_loc[c])
            ref_var = kxx - (Kzx * W).sum(0) + (W * (Su @ W)).sum(0)
            assert torch.allclose(mean[:, c], ref_mean, atol=1e-10)
            assert torch.allclose(var[:, c], ref_var, atol=1e-9)


# --------------------------------------------------------------------------- ELBO
def test_elbo_agrees_with_pyro_trace_elbo_on_model_guide():
    X, y = _blobs(8)
    model = SVTPClassifier(X[:5].clone(), 3, a=3.0, b=2.0, num_likelihood_samples=4)
    _randomise_q(model)
    R = 400
    ours = torch.stack([model.elbo(X, y, num_data=60).detach() for _ in range(R)])
    elbo = pyro.infer.Trace_ELBO()
    theirs = torch.stack([-elbo.differentiable_loss(model.model, model.guide, X, y,
                                                    num_data=60).detach() for _ in range(R)])
    se = math.sqrt(float(ours.var()) / R + float(theirs.var()) / R)
    # the same expectation (Pyro: KLs by Monte Carlo, v sampled; ours: closed forms)
    assert abs(float(ours.mean() - theirs.mean())) < 4 * se


def test_elbo_minibatch_is_unbiased_for_full_data():
    X, y = _blobs(6)
    model = SVTPClassifier(X[:4].clone(), 3, a=2.0, b=2.0)
    _randomise_q(model)
    full = torch.stack([model.elbo(X, y, num_samples=64).detach() for _ in range(50)]).mean()
    idx = torch.arange(18)
    parts = []
    for i in range(50):
        pyro.set_rng_seed(i)
        sub = idx[torch.randperm(18)[:6]]
        parts.append(model.elbo(X[sub], y[sub], num_data=18, num_samples=64).detach())
    parts = torch.stack(parts)
    se = float(parts.std()) / math.sqrt(50)
    assert abs(float(parts.mean() - full)) < 4 * se + 0.05


def test_monte_carlo_scale_kl_matches_closed_form():
    Z = _blobs(3)[0][:4]
    closed = SVTPClassifier(Z, 3, a=3.0, b=2.0)
    generic = SparseVariationalClassifier(Z, 3, scale_prior=dist.InverseGamma(_t(3.0), _t(2.0)))
    with torch.no_grad():
        for m in (closed, generic):
            m.q_concentration = _t(6.0)
            m.q_rate = _t(5.0)
    s = generic.scale_posterior_dist().sample((200_000,))
    q, p = generic.scale_posterior_dist(), generic.scale_prior()
    d = (q.log_prob(s) - p.log_prob(s)).detach()
    diff = float((generic.scale_kl(s) - closed.scale_kl()).detach())
    assert abs(diff) < 4 * float(d.std()) / math.sqrt(s.numel())


def test_concentrated_prior_at_one_matches_svgp():
    X, y = _blobs(20)
    Z = X[:8].clone()
    a = 1e8  # InvGamma(a, a): s = 1 +- 1e-4
    gp = SVGPClassifier(Z, 3, learn_scale=False)
    tp = SVTPClassifier(Z, 3, a=a, b=a)
    for m in (gp, tp):
        _randomise_q(m)
    with torch.no_grad():  # q(s) = p(s): KL(q(s)||p(s)) = 0
        tp.q_concentration = _t(a)
        tp.q_rate = _t(a)
    assert abs(float(tp.scale_kl().detach())) < 1e-6
    e_gp = gp.elbo(X, y, generator=torch.Generator().manual_seed(3)).detach()
    e_tp = tp.elbo(X, y, generator=torch.Generator().manual_seed(3)).detach()
    # same f noise; f scales by sqrt(s) = 1 +- 5e-5 and d log softmax / df is O(1)
    assert abs(float(e_gp - e_tp)) < 1e-3 * abs(float(e_gp))
    # trained with one seed (same minibatches and f noise): the same predictions
    fit_classifier(gp, X, y, num_steps=60, batch_size=20, lr=0.03, seed=0, progress=False)
    fit_classifier(tp, X, y, num_steps=60, batch_size=20, lr=0.03, seed=0, progress=False)
    p_gp = gp.predict_proba(X, generator=torch.Generator().manual_seed(0))
    p_tp = tp.predict_proba(X, generator=torch.Generator().manual_seed(0))
    assert float((p_gp - p_tp).abs().max()) < 5e-3


@pytest.mark.parametrize("cls,kw", [(SVGPClassifier, {}), (SVTPClassifier, dict(a=2.0, b=2.0)),
                                    (SparseVariationalClassifier,
                                     dict(scale_prior=(2.0, 2.0), scale_posterior="lognormal"))])
def test_training_beats_chance_on_blobs(cls, kw):
    X, y = _blobs(50)
    Xtr, ytr, Xte, yte = X[:100], y[:100], X[100:], y[100:]
    model = cls(Xtr[:10].clone(), 3, **kw)
    res = fit_classifier(model, Xtr, ytr, num_steps=150, batch_size=50, lr=0.05, seed=0,
                         progress=False)
    assert res.steps == 150 and sum(res.losses[-10:]) < sum(res.losses[:10])
    probs = model.predict_proba(Xte, batch_size=17)
    assert probs.shape == (50, 3)
    assert torch.allclose(probs.sum(-1), torch.ones(50, dtype=F64), atol=1e-12)
    acc, nll = classification_metrics(probs, yte)
    assert acc > 0.85  # chance is 1/3; Bayes accuracy of these blobs is ~0.99
    assert nll < math.log(3) / 2


def test_predict_proba_batched_agrees_with_unbatched():
    X, y = _blobs(20)
    model = SVTPClassifier(X[:6].clone(), 3)
    _randomise_q(model)
    p1 = model.predict_proba(X, num_samples=2000)
    p2 = model.predict_proba(X, num_samples=2000, batch_size=7)
    # each entry is a mean of 2000 values in [0, 1]: standard error <= 0.5/sqrt(2000) = 0.011
    assert float((p1 - p2).abs().max()) < 5 * math.sqrt(2) * 0.5 / math.sqrt(2000)


@pytest.mark.parametrize("kernel", ["nngp_fn", "gpytorch_rbf", "module"])
def test_other_kernels(kernel):
    X, y = _blobs(10)
    k = {"nngp_fn": serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1)),
         "gpytorch_rbf": gpytorch.kernels.RBFKernel(),
         "module": NNGPCovariance(depth=1, activation="erf", learn_variance=False)}[kernel]
    model = SVTPClassifier(X[:5].clone(), 3, kernel=k)
    e = model.elbo(X, y)
    assert torch.isfinite(e)
    e.backward()
    if kernel == "gpytorch_rbf":
        assert k.raw_lengthscale.grad is not None
    if kernel == "module":
        assert model.kernel.weight_var_unconstrained.grad is not None


@pytest.mark.parametrize("prior", [dist.HalfCauchy(_t(1.0)), dist.Gamma(_t(2.0), _t(2.0)),
                                   dist.LogNormal(_t(0.0), _t(0.5))])
def test_non_conjugate_scale_priors(prior):
    X, y = _blobs(10)
    model = SparseVariationalClassifier(X[:5].clone(), 3, scale_prior=prior)
    e = model.elbo(X, y)
    assert torch.isfinite(e)
    e.backward()
    assert model.q_concentration_unconstrained.grad is not None
    res = fit_classifier(model, X, y, num_steps=20, batch_size=15, progress=False, seed=0)
    assert all(math.isfinite(v) for v in res.losses)


def test_learned_point_scale():
    X, y = _blobs(10)
    k1 = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1))
    k4 = serial(Dense(2.0, 0.1), Relu(), Dense(8.0, 0.4))  # last-layer variances x 4 = 4 K
    model = SVGPClassifier(X[:5].clone(), 3, kernel=k1)  # learn_scale=True: s is a PyroParam
    ref = SVGPClassifier(X[:5].clone(), 3, kernel=k4, learn_scale=False)
    _randomise_q(model)
    _randomise_q(ref)
    assert float(model.output_scale.detach()) == 1.0
    e1 = model.elbo(X, y, generator=torch.Generator().manual_seed(0)).detach()
    with torch.no_grad():
        model.output_scale = _t(4.0)
    # whitened: s K with s = 4 gives the same q(f) as the kernel 4 K with s = 1
    e2 = model.elbo(X, y, generator=torch.Generator().manual_seed(0)).detach()
    e3 = ref.elbo(X, y, generator=torch.Generator().manual_seed(0)).detach()
    assert abs(float(e2 - e3)) < 1e-9 * abs(float(e3)) and float(e1) != float(e2)
    fit_classifier(model, X, y, num_steps=10, lr=0.1, progress=False, seed=0)
    assert float(model.output_scale.detach()) != 4.0
    with pytest.raises(ValueError, match="learn_scale"):
        SparseVariationalClassifier(X[:5], 3, scale_prior=(1.0, 1.0), learn_scale=True)


def test_pyro_elbo_training_path():
    X, y = _blobs(20)
    model = SVTPClassifier(X[:6].clone(), 3)
    res = fit_classifier(model, X, y, num_steps=5, elbo=pyro.infer.TraceMeanField_ELBO(),
                         progress=False)
    assert res.steps == 5 and all(math.isfinite(v) for v in res.losses)
    samples = model.model(X)  # labels sampled from the prior predictive
    assert samples.shape == (60,) and samples.dtype == torch.int64


def test_bad_input():
    X, y = _blobs(5)
    Z = X[:4].clone()
    with pytest.raises(ValueError, match="num_classes"):
        SVGPClassifier(Z, 1)
    for a, b in ((0.0, 1.0), (1.0, -1.0), (math.nan, 1.0), (1.0, math.inf)):
        with pytest.raises(ValueError, match="positive"):
            SVTPClassifier(Z, 3, a=a, b=b)
    with pytest.raises(ValueError, match="positive support"):
        SparseVariationalClassifier(Z, 3, scale_prior=dist.Normal(_t(0.0), _t(1.0)))
    with pytest.raises(TypeError, match="scale_prior"):
        SparseVariationalClassifier(Z, 3, scale_prior="wide")
    with pytest.raises(ValueError, match="scale_posterior"):
        SparseVariationalClassifier(Z, 3, scale_prior=(1.0, 1.0), scale_posterior="gamma")
    with pytest.raises(ValueError, match="inducing_points"):
        SVGPClassifier(Z[0], 3)
    with pytest.raises(ValueError, match="NaN"):
        SVGPClassifier(torch.full_like(Z, math.nan), 3)
    model = SVTPClassifier(Z, 3)
    with pytest.raises(ValueError, match=r"labels in \[0, 2\]"):
        model.elbo(X, torch.full_like(y, 3))
    with pytest.raises(ValueError, match=r"labels in \[0, 2\]"):
        model.elbo(X, -torch.ones_like(y))
    with pytest.raises(TypeError, match="integer"):
        model.elbo(X, y.double())
    with pytest.raises(ValueError, match="shape"):
        model.elbo(X, y[:-1])
    with pytest.raises(ValueError, match="columns"):
        model.elbo(X[:, :1], y)
    with pytest.raises(ValueError, match="NaN"):
        model.predict_proba(torch.full_like(X, math.nan))
    with pytest.raises(TypeError, match="dtype"):
        model.predict_proba(X.float())
    with pytest.raises(ValueError, match="batch_size"):
        model.predict_proba(X, batch_size=0)
    with pytest.raises(ValueError, match="num_data"):
        model.elbo(X, y, num_data=3)
    with pytest.raises(ValueError, match="batch_size"):
        fit_classifier(model, X, y, batch_size=0, progress=False)


# --------------------------------------------------------------------------- benchmark (c)
def _digits_module():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
    import _digits

    return _digits


def test_digits_corruptions():
    _digits = _digits_module()
    X = torch.zeros(2, 64, dtype=F64)
    X[0, 3 * 8 + 3] = 1.0  # one interior pixel
    assert torch.equal(_digits.corrupt(X, "clean", 0.0), X)
    blurred = _digits.corrupt(X, "blur", 0.7)
    # a normalised Gaussian filter keeps the mass of an interior pixel (edges are far)
    assert abs(float(blurred[0].sum()) - 1.0) < 1e-3 and float(blurred[0].max()) < 0.5
    noisy = _digits.corrupt(X, "noise", 0.3, seed=1)
    assert float(noisy.min()) >= 0 and float(noisy.max()) <= 1
    assert not torch.equal(noisy, X)
    with pytest.raises(ValueError, match="kind"):
        _digits.corrupt(X, "rotate", 1.0)


def test_digits_benchmark_smoke():
    import argparse

    _digits = _digits_module()
    p = _digits.add_digits_args(argparse.ArgumentParser())
    args = p.parse_args(["--digits-steps", "8", "--digits-inducing", "8",
                         "--digits-predict-samples", "4", "--digits-seeds", "1"])
    args.progress = False
    rows = _digits.run_digits(args)
    assert len(rows) == 7 * 2 * 2 + 2 + 1 + 2 * 3
    assert {r["model"] for r in rows} == {"SVGP", "SVTP"}
    assert all(math.isfinite(r["mean"]) and r["n"] == 1 for r in rows)
    assert all(0 <= r["mean"] <= 1 for r in rows if r["metric"] == "accuracy")
    assert _digits.summary_line(rows).startswith("SVTP vs SVGP on digits")
