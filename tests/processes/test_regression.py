"""Exact GP / Student-t / scale-mixture regression and the one-eigendecomposition path."""

import math

import pyro.distributions as dist
import pytest
import torch

from pyro_dkm.processes import (
    BurrXII,
    GaussianProcessRegression,
    NNGPCovariance,
    ScaleMixtureRegression,
    SpectralProblem,
    StudentTProcess,
    StudentTProcessRegression,
    fit,
    maximise_positive,
    scale_posterior_quadrature,
)

D = torch.float64



def t(x):
    return torch.tensor(x, dtype=D)


def data(n=40, m=6, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + m, d, generator=g, dtype=D)
    y = torch.sin(X.sum(-1)) + 0.1 * torch.randn(n + m, generator=g, dtype=D)
    return X[:n], y[:n], X[n:], y[n:]


def test_log_marginal_is_the_multivariate_student_t_density():
    X, y, _, _ = data()
    m = StudentTProcessRegression(X, y, concentration=1.7, rate=0.9, noise=0.05)
    with torch.no_grad():
        Ky = m.kernel(X) + 0.05 * torch.eye(len(y), dtype=D)
        ref = dist.MultivariateStudentT(t(3.4), torch.zeros(len(y), dtype=D),
                                        torch.linalg.cholesky(0.9 / 1.7 * Ky)).log_prob(y)
        assert float(m.log_marginal()) == pytest.approx(float(ref), abs=1e-9)
        tp = StudentTProcess(concentration=t(1.7), rate=t(0.9), covariance_matrix=Ky)
        assert float(tp.log_prob(y)) == pytest.approx(float(ref), abs=1e-9)


def test_predictive_is_the_conditional_of_the_joint_student_t():
    # log p(y, y*) - log p(y) = log p(y* | y) for the joint MVT(2a, 0, b/a [Ky ...]):
    # checks df = 2a + n, the mean and the (b'/a') scale of docs/processes.md.
    X, y, Xs, ys = data(n=15, m=4)
    a, b, noise = 1.3, 0.6, 0.05
    m = StudentTProcessRegression(X, y, concentration=a, rate=b, noise=noise)
    with torch.no_grad():
        joint_pred = m.predict(Xs, full_cov=True)
        marg_pred = m.predict(Xs)
        Xa = torch.cat([X, Xs])
        Ka = m.kernel(Xa) + noise * torch.eye(len(Xa), dtype=D)
        ya = torch.cat([y, ys])
        lj = StudentTProcess(concentration=t(a), rate=t(b), covariance_matrix=Ka).log_prob(ya)
        lm = float(m.log_marginal())
        assert float(joint_pred.log_prob(ys)) == pytest.approx(float(lj) - lm, abs=1e-8)
        assert float(joint_pred.df) == pytest.approx(2 * a + len(y))
        # the marginal StudentT is the joint's marginal
        assert torch.allclose(marg_pred.loc, joint_pred.loc, atol=1e-12)
        assert torch.allclose(marg_pred.scale.pow(2),
                              joint_pred.covariance_matrix.diagonal(), rtol=1e-10)
        # same mean as the GP with the same kernel and noise
        gp = GaussianProcessRegression(X, y, m.kernel, noise=noise)
        assert torch.allclose(gp.predict(Xs).mean, marg_pred.mean, atol=1e-10)


def test_gp_log_marginal_is_the_normal_density():
    X, y, _, _ = data()
    gp = GaussianProcessRegression(X, y, noise=0.2)
    with torch.no_grad():
        C = gp.kernel(X) + 0.2 * torch.eye(len(y), dtype=D)
        ref = dist.MultivariateNormal(torch.zeros(len(y), dtype=D), C).log_prob(y)
        assert float(gp.log_marginal()) == pytest.approx(float(ref), abs=1e-9)


def test_fit_improves_the_marginal_likelihood_and_models_do_not_share_parameters():
    X, y, _, _ = data(n=30)
    m1 = StudentTProcessRegression(X, y)
    m2 = StudentTProcessRegression(X, y)
    before = float(m1.log_marginal().detach())
    hist = fit(m1, steps=40, lr=0.05)
    assert hist[-1] < hist[0] and float(m1.log_marginal().detach()) > before
    # the second model still has its own, untouched parameters
    assert float(m2.log_marginal().detach()) == pytest.approx(before, abs=1e-10)
    m3 = ScaleMixtureRegression(X, y, BurrXII(t(2.0), t(1.0)))
    b3 = float(m3.log_marginal().detach())
    hist = fit(m3, steps=15, optimizer="lbfgs")
    assert float(m3.log_marginal().detach()) > b3
    assert all(math.isfinite(h) for h in hist)


def test_fixed_concentration_is_the_ml_gp_predictive_with_student_t_tails():
    # a fixed, (b, noise) fitted: the rate's stationarity gives b = a q / n, and the
    # predictive has the centre and scale of the type-II ML GP (amplitude, noise fitted)
    # with df = 2a + n (docs/processes.md). Same kernel shape (w, b frozen) in both.
    X, y, Xs, _ = data(n=40)
    a = 2.0

    def kernel(learn):
        k = NNGPCovariance(weight_var=1.5, bias_var=0.2, learn_variance=learn)
        for name in ("weight_var_unconstrained", "bias_var_unconstrained"):
            getattr(k, name).requires_grad_(False)
        return k

    tp = StudentTProcessRegression(X, y, kernel(False), concentration=a,
                                   learn_concentration=False)
    gp = GaussianProcessRegression(X, y, kernel(True))
    assert "concentration" not in dict(tp.named_parameters())
    fit(tp, steps=200, optimizer="lbfgs")
    fit(gp, steps=200, optimizer="lbfgs")
    with torch.no_grad():
        assert float(tp.concentration) == a
        _, q = tp._stats()
        n = len(y)
        # fitted values: L-BFGS stops at a gradient of 1e-7 per point, i.e. ~1e-5 relative
        assert float(tp.rate) == pytest.approx(a * float(q) / n, rel=1e-5)
        ratio = float(gp.noise / gp.kernel.variance)
        assert float(tp.noise) == pytest.approx(ratio, rel=1e-4)
        pt, pg = tp.predict(Xs), gp.predict(Xs)
        assert torch.all(pt.df == 2 * a + n)
        assert torch.allclose(pt.loc, pg.loc, rtol=1e-4, atol=1e-8)
        assert torch.allclose(pt.scale, pg.scale, rtol=1e-4)
        # at the exact stationary points (same noise ratio) they agree to rounding
        tp.rate = a * q / n
        gp.kernel.variance = q / n
        gp.noise = tp.noise * q / n
        pt, pg = tp.predict(Xs), gp.predict(Xs)
        assert torch.allclose(pt.loc, pg.loc, rtol=1e-10, atol=1e-12)
        assert torch.allclose(pt.scale, pg.scale, rtol=1e-10)
    # learning a instead runs towards the Gaussian limit on these (Gaussian) data
    free = StudentTProcessRegression(X, y, kernel(False), concentration=a)
    fit(free, steps=200, optimizer="lbfgs")
    assert float(free.concentration.detach()) > 10 * a


def test_spectral_problem_agrees_with_the_dense_models():
    X, y, Xs, _ = data(n=25)
    kern = NNGPCovariance(learn_variance=False)
    with torch.no_grad():
        sp = SpectralProblem(kern(X), y)
        gp = GaussianProcessRegression(X, y, kern, noise=0.07)
        assert float(sp.gp_log_marginal(1.0, 0.07)) == pytest.approx(float(gp.log_marginal()),
                                                                    abs=1e-9)
        tp = StudentTProcessRegression(X, y, kern, concentration=2.2, rate=0.4, noise=0.07)
        assert float(sp.student_t_log_marginal(t(2.2), t(0.4), 0.07)) == pytest.approx(
            float(tp.log_marginal()), abs=1e-9)
        prior = BurrXII(t(2.0), t(1.0))
        sm = ScaleMixtureRegression(X, y, prior, kern, noise=0.07)
        lm = scale_posterior_quadrature(sp.scale_log_likelihood(1.0, 0.07), prior).log_marginal
        assert float(lm) == pytest.approx(float(sm.log_marginal()), abs=1e-9)
        mean, var = sp.conditional(kern(X, Xs), kern(Xs, diag=True), 1.0, 0.07)
        p = gp.predict(Xs, include_noise=False)
        assert torch.allclose(mean, p.mean, atol=1e-9)
        assert torch.allclose(var, p.variance, atol=1e-9)


def test_maximise_positive_finds_the_closed_form_gp_optimum():
    # K = I: y ~ N(0, (alpha + noise) I), optimum alpha + noise = mean(y^2)
    y = torch.randn(50, dtype=D)
    sp = SpectralProblem(torch.eye(50, dtype=D), y)
    best, val = maximise_positive(lambda amplitude: sp.gp_log_marginal(amplitude, 0.01),
                                  {"amplitude": 3.0})
    assert best["amplitude"] + 0.01 == pytest.approx(float(y.pow(2).mean()), rel=1e-6)


def test_works_with_a_gpytorch_kernel():
    from pyro_dkm.gpytorch import NNGPKernel
    X, y, Xs, _ = data(n=20)
    k = NNGPKernel(depth=1).double()
    m = StudentTProcessRegression(X, y, k)
    with torch.no_grad():
        K = k(X, X).to_dense()
        sp = SpectralProblem(K, y)
        assert float(m.log_marginal()) == pytest.approx(
            float(sp.student_t_log_marginal(t(2.0), t(2.0), 0.1)), abs=1e-9)
        assert m.predict(Xs).loc.shape == (6,)


def test_bad_input():
    X, y, Xs, _ = data(n=10)
    with pytest.raises(ValueError, match="same number of points"):
        StudentTProcessRegression(X, y[:9])
    with pytest.raises(ValueError, match="2 dimension"):
        StudentTProcessRegression(X[:, 0], y)
    bad = X.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GaussianProcessRegression(bad, y)
    with pytest.raises(TypeError, match="floating-point"):
        StudentTProcessRegression(X.long(), y)
    with pytest.raises(ValueError, match="concentration must be positive"):
        StudentTProcessRegression(X, y, concentration=0.0)
    with pytest.raises(ValueError, match="noise must be positive"):
        StudentTProcessRegression(X, y, noise=-1.0)
    with pytest.raises(ValueError, match="features"):
        StudentTProcessRegression(X, y).predict(Xs[:, :1])
    with pytest.raises(ValueError, match="optimizer"):
        fit(StudentTProcessRegression(X, y), optimizer="sgd")
    with pytest.raises(ValueError, match="method"):
        ScaleMixtureRegression(X, y, BurrXII(t(1.0), t(1.0)), method="mcmc")
    with pytest.raises(ValueError, match="activation"):
        NNGPCovariance(activation="tanh")
    with pytest.raises(ValueError, match="semi-definite"):
        SpectralProblem(torch.diag(t([1.0, -2.0])), t([0.0, 1.0]))
    with pytest.raises(ValueError, match="init"):
        maximise_positive(lambda a: a, {"a": -1.0})


def test_type_two_ml_fits_rescale_with_the_targets():
    # unset starting values are relative to y's power-of-ten scale, and the parameters are
    # optimised in log space, so the fit of c y is the fit of y rescaled: predictive centre
    # times c, scale times c (to 1e-8), for c = 1e4 and 1e-4 (absolute starts would leave
    # the optimiser 18 log-units away)
    from pyro_dkm.processes import GaussianProcessRegression, StudentTProcessRegression, fit

    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 2, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(40, generator=g, dtype=torch.float64)
    Xt = torch.randn(7, 2, generator=g, dtype=torch.float64)
    for cls in (GaussianProcessRegression, StudentTProcessRegression):
        base = cls(X, y)
        fit(base, steps=40, lr=0.05)
        p0 = base.predict(Xt)
        for c in (1e4, 1e-4):
            m = cls(X, c * y)
            fit(m, steps=40, lr=0.05)
            p = m.predict(Xt)
            torch.testing.assert_close(p.mean / c, p0.mean, rtol=1e-8, atol=1e-10)
            torch.testing.assert_close(p.stddev / c, p0.stddev, rtol=1e-8, atol=1e-10)


def test_scale_mixture_regression_fit_rescales_with_the_targets():
    # the scale prior is on the dimensionless multiplier of a kernel whose unset variance and
    # noise are relative to y's scale, so an absolute prior (InvGamma(2, 2)) still gives a fit
    # of c y that is the fit of y rescaled (predictive mean x c, variance x c^2, to 1e-9)
    import pyro.distributions as dist

    from pyro_dkm.processes import ScaleMixtureRegression, fit

    g = torch.Generator().manual_seed(0)
    X = torch.randn(30, 2, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(30, generator=g, dtype=torch.float64)
    Xt = torch.randn(5, 2, generator=g, dtype=torch.float64)
    prior = dist.InverseGamma(torch.tensor(2.0, dtype=torch.float64),
                              torch.tensor(2.0, dtype=torch.float64))
    preds = {}
    for c in (1.0, 1e4, 1e-4):
        m = ScaleMixtureRegression(X, c * y, prior)
        fit(m, steps=60)
        with torch.no_grad():
            p = m.predict(Xt)
            preds[c] = (p.mean / c, p.variance / c**2)
    for c in (1e4, 1e-4):
        torch.testing.assert_close(preds[c][0], preds[1.0][0], rtol=1e-9, atol=1e-12)
        torch.testing.assert_close(preds[c][1], preds[1.0][1], rtol=1e-9, atol=1e-12)
