"""Student-t noise (per-observation inverse-gamma scales) by variational EM."""

import math

import numpy as np
import pytest
import torch
from scipy import integrate, special, stats

from pyro_dkm.processes import (
    GaussianProcessRegression,
    NNGPCovariance,
    SpectralProblem,
    StudentTProcessRegression,
    maximise_positive,
)
from pyro_dkm.processes.robust import (
    RobustRegression,
    StudentTNoisePredictive,
    robust_bound,
    robust_vb,
    student_t_noise_terms,
)

D = torch.float64


def data(n=40, m=6, d=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n + m, d, generator=g, dtype=D)
    y = torch.sin(X.sum(-1)) + 0.1 * torch.randn(n + m, generator=g, dtype=D)
    return X[:n], y[:n], X[n:], y[n:]


def kernel_mats(X, Xs=None):
    k = NNGPCovariance(learn_variance=False)
    with torch.no_grad():
        if Xs is None:
            return k(X)
        return k(X), k(X, Xs), k(Xs, diag=True)


# ----------------------------------------------------------------------------- (a) GP limit
def test_large_df_fit_is_the_gaussian_process_type_ii_ml():
    # nu -> inf: lam_i -> 1, the bound -> log N(y | 0, aK + s2 I) and its maximiser -> the
    # GP's; the terms in 1/nu are O(n/nu) = 4e-9 here
    X, y, _, _ = data()
    K = kernel_mats(X)
    sp = SpectralProblem(K, y)
    ref, ref_lm = maximise_positive(sp.gp_log_marginal, {"amplitude": 1.0, "noise": 0.1})
    fit = robust_vb(K, y, df=1e10, learn=("amplitude", "noise"), tol=1e-12)
    assert fit.converged
    assert fit.elbo == pytest.approx(ref_lm, abs=1e-7)
    assert fit.params["amplitude"] == pytest.approx(ref["amplitude"], rel=1e-4)
    assert fit.params["noise"] == pytest.approx(ref["noise"], rel=1e-4)
    assert float(fit.u.abs().max()) < 1e-8


def test_large_df_predictive_is_the_gaussian_process_predictive():
    X, y, Xs, ys = data()
    amp, noise = 1.7, 0.05
    gp = GaussianProcessRegression(X, y, NNGPCovariance(variance=amp), noise=noise)
    rr = RobustRegression(X, y, df=1e12, noise=noise, amplitude=amp)
    rr.fit(learn=(), tol=1e-12)
    with torch.no_grad():
        ref = gp.predict(Xs)
        pred = rr.predict(Xs)
        lm = float(gp.log_marginal())
        probes = ys + torch.linspace(-3, 3, len(ys), dtype=D)
        torch.testing.assert_close(pred.mean, ref.mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(pred.variance, ref.variance, atol=1e-8, rtol=1e-8)
        torch.testing.assert_close(pred.log_prob(probes), ref.log_prob(probes), atol=1e-7,
                                   rtol=0)
    assert rr.elbo() == pytest.approx(lm, abs=1e-7)


def test_student_t_process_with_large_df_has_the_exact_scale_posterior():
    # noise scaled with s, nu -> inf: the joint optimum of q(f) q(s) has
    # E[1/s]^-1 = (b + q/2) / (a + n/2) = b'/a' of the conjugate model (only the dof
    # differ: 2(a + n) for mean field vs 2a + n exactly), and the same predictive mean
    X, y, Xs, _ = data()
    a, b, noise = 1.3, 0.7, 0.05
    tp = StudentTProcessRegression(X, y, concentration=a, rate=b, noise=noise)
    rr = RobustRegression(X, y, process="student_t", df=1e10, noise=noise, concentration=a,
                          rate=b)
    st = rr.fit(learn=(), tol=1e-12)
    with torch.no_grad():
        a2, b2 = tp.posterior()
        ref = tp.predict(Xs)
        pred = rr.predict(Xs)
    a_q, b_q = st.scale_posterior
    assert a_q == pytest.approx(a + len(y), rel=1e-14)
    assert b_q / a_q == pytest.approx(float(b2 / a2), rel=1e-9)
    torch.testing.assert_close(pred.mean, ref.mean, atol=1e-10, rtol=0)
    # variance of StudentT(df, mu, sd): sd^2 df / (df - 2)
    scale2 = pred.variance * (2 * a_q - 2) / (2 * a_q)
    torch.testing.assert_close(scale2, ref.scale.pow(2), rtol=1e-7, atol=0)


# ----------------------------------------------------------------------------- (b) the bound
def test_bound_eigen_and_cholesky_forms_agree_and_increase():
    X, y, _, _ = data(n=30)
    y = y.clone()
    y[::7] += 3.0  # outliers
    K = kernel_mats(X)
    for process in ("gp", "student_t"):
        fit = robust_vb(K, y, process=process, df=3.0, tol=1e-10)
        h = np.array(fit.history)
        assert (np.diff(h) >= -1e-9).all(), np.diff(h).min()  # monotone
        p = fit.params
        kw = (dict(amplitude=p["amplitude"]) if process == "gp" else
              dict(scale_posterior=fit.scale_posterior,
                   scale_prior=(p["concentration"], p["rate"])))
        chol = float(robust_bound(K, y, fit.u, noise=p["noise"], df=p["df"], **kw))
        assert fit.elbo == pytest.approx(chol, abs=1e-9)


def test_fixed_point_is_stationary():
    # at convergence d bound / d u = 0 (the q(lam) update) and d bound / d log(theta) = 0
    # (the M-step), by autograd through the independent Cholesky form of the bound
    X, y, _, _ = data(n=30, seed=1)
    y = y.clone()
    y[::6] -= 2.5
    K = kernel_mats(X)
    fit = robust_vb(K, y, df=3.0, tol=1e-13, max_iter=400)
    assert fit.converged
    p = fit.params
    u = fit.u.clone().requires_grad_(True)
    logs = torch.tensor([math.log(p[k]) for k in ("amplitude", "noise", "df")], dtype=D,
                        requires_grad=True)
    val = robust_bound(K, y, u, amplitude=logs[0].exp(), noise=logs[1].exp(), df=logs[2].exp())
    gu, gth = torch.autograd.grad(val, (u, logs))
    assert float(gu.abs().max()) < 1e-5
    assert float(gth.abs().max()) < 1e-4


def _cauchy_data(seed):
    X, y, _, _ = data(n=60, seed=seed)
    g = torch.Generator().manual_seed(5)
    return X, y + 0.2 * torch.tan(math.pi * (torch.rand(60, generator=g, dtype=D) - 0.5))


@pytest.mark.parametrize("process", ["gp", "student_t"])
@pytest.mark.parametrize("seed", [2, 3])
def test_em_stopped_at_a_loose_tolerance_is_near_the_optimum(process, seed):
    # Cauchy noise. The first M-step from u = 0 must not move nu: there the bound is
    # largest at nu -> inf for any data, and EM then crawled back ~1e-5 nats per sweep,
    # which the stopping rule took for convergence (3.7 nats short of the optimum here)
    X, y = _cauchy_data(seed)
    K = kernel_mats(X)
    loose = robust_vb(K, y, process=process, df=3.0, tol=1e-5)
    ref = robust_vb(K, y, process=process, df=3.0, tol=1e-12, max_iter=2000)
    assert loose.converged and ref.converged
    assert ref.params["df"] < 20  # a heavy-tailed fit, not the Gaussian limit
    assert loose.elbo == pytest.approx(ref.elbo, abs=1e-3)
    assert loose.params["df"] == pytest.approx(ref.params["df"], rel=0.05)


def test_student_t_process_fixed_point_is_stationary():
    # the t process's M-step profiles q(s) out; at convergence the Cholesky form of the
    # bound is stationary in u, log sigma^2, log nu and in q(s) = InvGamma(a_q, b_q)
    X, y = _cauchy_data(2)
    K = kernel_mats(X)
    fit = robust_vb(K, y, process="student_t", df=3.0, tol=1e-13, max_iter=400)
    assert fit.converged
    p = fit.params
    u = fit.u.clone().requires_grad_(True)
    th = torch.tensor([math.log(v) for v in (p["noise"], p["df"], *fit.scale_posterior)],
                      dtype=D, requires_grad=True)
    val = robust_bound(K, y, u, noise=th[0].exp(), df=th[1].exp(),
                       scale_posterior=(th[2].exp(), th[3].exp()),
                       scale_prior=(p["concentration"], p["rate"]))
    gu, gth = torch.autograd.grad(val, (u, th))
    assert float(gu.abs().max()) < 1e-5
    assert float(gth.abs().max()) < 1e-3


def _exact_log_marginal_n2(K, y, amp, noise, df):
    """log int int N(y | 0, amp K + noise diag(lam)) prod_i InvGamma(lam_i | df/2, df/2)
    by the trapezoid rule in t_i = log lam_i (exponentially accurate for this smooth,
    fast-decaying integrand) on a wide grid."""
    t = np.linspace(-25.0, 25.0 + 80.0 / df, 2401)
    h = t[1] - t[0]
    lam = np.exp(t)
    lp = stats.invgamma.logpdf(lam, df / 2, scale=df / 2) + t  # density in t
    A = amp * np.asarray(K)
    c11 = A[0, 0] + noise * lam[:, None]
    c22 = A[1, 1] + noise * lam[None, :]
    c12 = A[0, 1]
    det = c11 * c22 - c12**2
    quad = (c22 * y[0] ** 2 - 2 * c12 * y[0] * y[1] + c11 * y[1] ** 2) / det
    lg = -np.log(2 * np.pi) - 0.5 * np.log(det) - 0.5 * quad + lp[:, None] + lp[None, :]
    m = lg.max()
    return float(m + np.log(np.exp(lg - m).sum() * h * h))


@pytest.mark.parametrize("df, tight", [(3.0, False), (1e4, True)])
def test_bound_is_below_the_exact_log_marginal_n2(df, tight):
    X = torch.tensor([[0.3, -0.2], [0.1, 0.5]], dtype=D)
    K = kernel_mats(X)
    y = torch.tensor([0.4, 2.5], dtype=D)  # the second point is an outlier-ish target
    amp, noise = 0.8, 0.05
    fit = robust_vb(K, y, df=df, amplitude=amp, noise=noise, learn=(), tol=1e-14,
                    max_iter=2000)
    exact = _exact_log_marginal_n2(K.numpy(), y.numpy(), amp, noise, df)
    gap = exact - fit.elbo
    assert gap >= -1e-9
    if tight:  # nu = 1e4: the noise is nearly Gaussian, mean field nearly exact
        assert gap < 1e-3
    else:  # a real gap, but the bound is still informative
        assert 1e-4 < gap < 1.0


def test_noise_terms_vanish_in_the_gaussian_limit_and_match_direct_formula():
    # T(u, nu) from its definition with lgamma / digamma (exact at moderate nu)
    u = torch.tensor([-0.2, 0.0, 0.7, 5.0], dtype=D)
    for nu in (0.7, 3.0, 25.0):
        nu_t = torch.tensor(nu, dtype=D)
        a1, a0 = (nu_t + 1) / 2, nu_t / 2
        b1 = (nu_t + 1) * (1 + u) / 2
        e_log = torch.log(b1) - torch.digamma(a1)
        kl = ((a1 - a0) * torch.digamma(a1) - torch.lgamma(a1) + torch.lgamma(a0)
              + a0 * (torch.log(b1) - torch.log(a0)) + a1 * (a0 - b1) / b1)
        direct = -0.5 * (e_log + torch.log(a1 / b1)) - kl
        torch.testing.assert_close(student_t_noise_terms(u, nu), direct, atol=1e-12, rtol=0)
    assert float(student_t_noise_terms(torch.zeros(3, dtype=D), 1e12).abs().max()) < 1e-11


# ----------------------------------------------------------------------------- (c) predictive
def _brute_log_density(yv, mu, v, noise, df, latent_df=None, c=1.0):
    def f(t):
        lam = math.exp(t)
        sd = math.sqrt(c * (v + noise * lam))
        comp = (stats.norm.pdf(yv, mu, sd) if latent_df is None
                else stats.t.pdf(yv, latent_df, mu, sd))
        return comp * stats.invgamma.pdf(lam, df / 2, scale=df / 2) * lam

    val, _ = integrate.quad(f, -40, 40 + 120 / df, epsabs=0, epsrel=1e-12, limit=500,
                            points=[0.0, 2 * math.log(abs(yv - mu) / math.sqrt(noise) + 1)])
    return math.log(val)


@pytest.mark.parametrize("df", [1.0, 4.0, 30.0])
@pytest.mark.parametrize("latent_df", [None, 7.0])
def test_predictive_log_density_is_the_one_dimensional_integral(df, latent_df):
    mu = torch.tensor([0.2, -1.0, 0.5], dtype=D)
    v = torch.tensor([0.3, 0.01, 2.0], dtype=D)
    noise, c = 0.2, 1.3
    pred = StudentTNoisePredictive(mu, v, noise, df, latent_df=latent_df, latent_scale=c)
    assert pred.batch_shape == (3,) and pred.event_shape == ()
    for yv in (0.0, 1.5, -8.0, 60.0):
        lp = pred.log_prob(torch.full((3,), yv, dtype=D))
        for j in range(3):
            ref = _brute_log_density(yv, float(mu[j]), float(v[j]), noise, df, latent_df, c)
            assert float(lp[j]) == pytest.approx(ref, abs=1e-6)


def test_predictive_samples_have_the_stated_moments():
    mu = torch.tensor([0.5, -2.0], dtype=D)
    v = torch.tensor([0.2, 1.0], dtype=D)
    pred = StudentTNoisePredictive(mu, v, 0.3, 12.0)
    torch.manual_seed(0)
    s = pred.sample((40000,))
    assert s.shape == (40000, 2)
    # Monte Carlo standard errors from the samples themselves
    se_mean = s.std(0) / math.sqrt(len(s))
    assert bool(((s.mean(0) - pred.mean).abs() < 4 * se_mean).all())
    dev2 = (s - pred.mean).pow(2)
    se_var = dev2.std(0) / math.sqrt(len(s))
    assert bool(((dev2.mean(0) - pred.variance).abs() < 4 * se_var).all())
    # exact variance: v + noise nu/(nu-2)
    torch.testing.assert_close(pred.variance, v + 0.3 * 12 / 10)
    assert math.isinf(float(StudentTNoisePredictive(mu, v, 0.3, 2.0).variance[0]))
    # shapes broadcast like torch.distributions
    assert pred.log_prob(torch.zeros(5, 1, dtype=D)).shape == (5, 2)


# ----------------------------------------------------------------------------- (d) robustness
def test_gross_outliers_robust_fit_beats_the_gaussian_process():
    g = torch.Generator().manual_seed(3)
    n, m, true_noise = 150, 200, 0.01
    X = torch.rand(n + m, 1, generator=g, dtype=D) * 4 - 2
    f = torch.sin(2 * X[:, 0])
    y = f + math.sqrt(true_noise) * torch.randn(n + m, generator=g, dtype=D)
    ytr = y[:n].clone()
    bad = torch.randperm(n, generator=g)[: n // 10]  # 10% gross outliers
    ytr[bad] += 4.0 * torch.sign(torch.randn(len(bad), generator=g, dtype=D)) + torch.randn(
        len(bad), generator=g, dtype=D)
    Xtr, Xte, yte = X[:n], X[n:], y[n:]  # clean test targets
    K, Ks, kss = kernel_mats(Xtr, Xte)
    sp = SpectralProblem(K, ytr)
    gp, _ = maximise_positive(sp.gp_log_marginal, {"amplitude": 1.0, "noise": 0.1})
    mean, var = sp.conditional(Ks, kss, gp["amplitude"], gp["noise"])
    gp_pred = torch.distributions.Normal(mean, (var + gp["noise"]).sqrt())
    fit = robust_vb(K, ytr, spectral0=sp)
    rb_pred = fit.predict(Ks, kss)
    # the fitted noise: the GP's absorbs the outliers (~140x the clean level here); the
    # robust scale stays at the clean level (nu ~ 0.9 fits the outliers, so the t scale is
    # somewhat below the Gaussian variance)
    err_rb = abs(math.log(fit.params["noise"] / true_noise))
    err_gp = abs(math.log(gp["noise"] / true_noise))
    assert err_rb < math.log(3.0) and err_rb < 0.25 * err_gp
    # test NLL and squared error on clean targets, paired differences with their s.e.
    d_nll = rb_pred.log_prob(yte) - gp_pred.log_prob(yte)  # > 0: robust better
    assert float(d_nll.mean()) > 5 * float(d_nll.std() / math.sqrt(m))
    assert fit.params["df"] < 1 and bool(rb_pred.mean.isnan().all())  # no mean for nu <= 1
    d_se = (gp_pred.mean - yte).pow(2) - (rb_pred.loc - yte).pow(2)  # the centre instead
    assert float(d_se.mean()) > 3 * float(d_se.std() / math.sqrt(m))
    # the flagged observations are the outliers: E[1/lam] lowest there
    w = fit.noise_weights
    assert set(torch.argsort(w)[: len(bad)].tolist()) == set(bad.tolist())


# ----------------------------------------------------------------------------- (e) bad input
def test_bad_input_raises():
    X, y, Xs, _ = data(n=10)
    K = kernel_mats(X)
    with pytest.raises(ValueError, match="df"):
        robust_vb(K, y, df=0.0)
    with pytest.raises(ValueError, match="noise"):
        robust_vb(K, y, noise=-1.0)
    ynan = y.clone()
    ynan[2] = float("nan")
    with pytest.raises(ValueError, match="y"):
        robust_vb(K, ynan)
    with pytest.raises(ValueError, match="K must be"):
        robust_vb(K[:5, :5], y)
    with pytest.raises(ValueError, match="process"):
        robust_vb(K, y, process="cauchy")
    with pytest.raises(ValueError, match="learn"):
        robust_vb(K, y, process="student_t", learn=("amplitude",))
    with pytest.raises(ValueError, match="u0"):
        robust_vb(K, y, u0=torch.zeros(3, dtype=D))
    with pytest.raises(ValueError, match="df"):
        RobustRegression(X, y, df=-2.0)
    with pytest.raises(ValueError, match="same number"):
        RobustRegression(X, y[:5])
    with pytest.raises(ValueError, match="X_new"):
        RobustRegression(X, y).predict(Xs[:, :1])
    with pytest.raises(ValueError, match="noise"):
        StudentTNoisePredictive(torch.zeros(2, dtype=D), torch.ones(2, dtype=D), 0.0, 3.0)
    with pytest.raises(ValueError, match="latent_var"):
        StudentTNoisePredictive(torch.zeros(2, dtype=D), -torch.ones(2, dtype=D), 0.1, 3.0)


def test_special_values_used_above():
    # the direct noise-term formula above uses torch's digamma; cross-check one value
    assert float(torch.digamma(torch.tensor(2.5, dtype=D))) == pytest.approx(
        special.digamma(2.5), abs=1e-14)


@pytest.mark.parametrize("process", ["gp", "student_t"])
def test_fit_and_predictive_rescale_with_the_targets(process):
    # y -> c y (c = 1e4, 1e-4, 1e8): the fit happens in units where y's spread is O(1), so
    # the fitted noise scales by c^2 and the predictive centre by c; before, the noise hit
    # a bound (1e6 at c = 1e4) and the predictions moved. EM stops on the bound's change
    # (1e-8 n) and the M-step's optimiser has its own tolerance, so the noise itself is
    # fixed only to ~1e-7 relative: rounding alone (1 vs 2 BLAS threads, the same data)
    # moves it by 5e-8. Checked to 1e-6 relative; the bound and the predictive centre,
    # flat in that direction, to 1e-6 and 1e-8.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(60, 2, generator=g, dtype=torch.float64)
    y = torch.sin(X[:, 0]) + 0.1 * torch.randn(60, generator=g, dtype=torch.float64)
    Xt = torch.randn(10, 2, generator=g, dtype=torch.float64)
    base = RobustRegression(X, y, process=process)
    fit0 = base.fit()
    p0 = base.predict(Xt)
    for c in (1e4, 1e-4, 1e8):
        m = RobustRegression(X, c * y, process=process)
        fit = m.fit()
        assert abs(fit.params["noise"] / (c * c) - fit0.params["noise"]) < 1e-6 * fit0.params[
            "noise"], c
        p = m.predict(Xt)
        torch.testing.assert_close(p.loc / c, p0.loc, rtol=1e-8, atol=1e-10)
        # the bound on log p(y) shifts by -n log c
        assert abs(fit.elbo - (fit0.elbo - 60 * math.log(c))) < 1e-6 * abs(fit0.elbo) + 1e-6
