"""Scale priors, quadrature / importance-sampling posteriors over the scale, ScaleMixture."""

import math

import pyro.distributions as dist
import pytest
import torch
from scipy import integrate

from pyro_dkm.processes import (
    BurrXII,
    GaussianScaleLikelihood,
    ScaleMixture,
    ScaleMixtureRegression,
    StudentTProcess,
    StudentTProcessRegression,
    check_scale_prior,
    scale_posterior_importance,
    scale_posterior_quadrature,
)

D = torch.float64



def t(x):
    return torch.tensor(x, dtype=D)


def spd(*batch, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=D)
    return A @ A.mT / n + 0.3 * torch.eye(n, dtype=D)


def rbf(x1, x2):
    return torch.exp(-0.5 * (x1[:, None, :] - x2[None, :, :]).pow(2).sum(-1))


# ------------------------------------------------------------------ Burr XII
def test_burr_density_integrates_to_one_and_matches_its_cdf():
    b = BurrXII(t(2.0), t(1.5), t(0.7))
    total, _ = integrate.quad(lambda x: math.exp(b.log_prob(t(x))), 0, math.inf, limit=200)
    assert total == pytest.approx(1.0, abs=1e-8)
    part, _ = integrate.quad(lambda x: math.exp(b.log_prob(t(x))), 0, 1.3)
    assert part == pytest.approx(float(b.cdf(t(1.3))), abs=1e-8)
    x = t([0.01, 0.5, 3.0, 40.0])
    assert torch.allclose(b.icdf(b.cdf(x)), x, rtol=1e-10)


def test_burr_samples_have_the_stated_mean_and_cdf():
    torch.manual_seed(0)
    b = BurrXII(t(3.0), t(2.0), t(1.2))  # tail x^-7: finite variance
    x = b.sample((100000,))
    se = float(x.std()) / math.sqrt(len(x))
    assert abs(float(x.mean() - b.mean)) < 5 * se
    for v in (0.5, 1.0, 2.0):
        p = float(b.cdf(t(v)))
        assert abs(float((x < v).double().mean()) - p) < 5 * math.sqrt(p * (1 - p) / len(x))
    assert torch.isinf(BurrXII(t(1.0), t(0.5)).mean)  # c k <= 1: infinite mean


def test_burr_broadcasts_and_expands():
    b = BurrXII(t([1.0, 2.0]), t(1.0), t([[1.0], [3.0]]))
    assert b.batch_shape == (2, 2) and b.sample((5,)).shape == (5, 2, 2)
    assert b.expand((4, 2, 2)).log_prob(t(1.0)).shape == (4, 2, 2)


# ------------------------------------------------------------------ priors
@pytest.mark.parametrize("prior", [dist.Gamma(t(2.0), t(1.0)), dist.HalfCauchy(t(1.0)),
                                   dist.LogNormal(t(0.0), t(1.0)),
                                   dist.InverseGamma(t(2.0), t(1.0)),
                                   BurrXII(t(2.0), t(1.0)), dist.Exponential(t(1.0))])
def test_positive_priors_accepted(prior):
    assert check_scale_prior(prior) is prior


@pytest.mark.parametrize("prior, err, match", [
    (dist.Normal(t(0.0), t(1.0)), ValueError, "positive support"),
    (dist.Uniform(t(-1.0), t(1.0)), ValueError, "positive support"),
    (dist.StudentT(t(3.0)), ValueError, "positive support"),
    (dist.MultivariateNormal(torch.zeros(2, dtype=D), torch.eye(2, dtype=D)), ValueError,
     "univariate"),
    (1.0, TypeError, "distribution"),
])
def test_priors_without_positive_support_rejected(prior, err, match):
    with pytest.raises(err, match=match):
        check_scale_prior(prior)
    with pytest.raises(err, match=match):
        ScaleMixture(prior, spd())


# ------------------------------------------------------------------ ScaleMixture
def test_inverse_gamma_mixture_is_the_student_t_process():
    K = spd(3)
    a, b = t([1.2, 4.0, 0.6]), t(0.8)
    sm = ScaleMixture(dist.InverseGamma(a, b), K, loc=0.5)
    tp = StudentTProcess(concentration=a, rate=b, covariance_matrix=K, loc=0.5)
    f = tp.sample((4,))
    assert sm.batch_shape == (3,)
    # quadrature over log s vs the closed form
    assert torch.allclose(sm.log_prob(f), tp.log_prob(f), atol=1e-10, rtol=0)


@pytest.mark.parametrize("prior", [dist.Gamma(t(2.0), t(3.0)), dist.HalfCauchy(t(0.5)),
                                   dist.LogNormal(t(-0.3), t(0.8)), BurrXII(t(2.0), t(1.0))])
def test_mixture_log_prob_equals_scipy_integral(prior):
    K = spd(n=4)
    f = torch.tensor([0.3, -1.2, 0.8, 0.1], dtype=D)
    sm = ScaleMixture(prior, K)

    def integrand(s):
        return math.exp(float(dist.MultivariateNormal(torch.zeros(4, dtype=D), s * K).log_prob(f)
                              + prior.log_prob(t(s))))

    val = sum(integrate.quad(integrand, lo, hi, limit=400, epsabs=0, epsrel=1e-12)[0]
              for lo, hi in [(0, 0.1), (0.1, 1), (1, 10), (10, 1e3), (1e3, math.inf)])
    assert float(sm.log_prob(f)) == pytest.approx(math.log(val), abs=1e-8)


def test_mixture_samples_have_covariance_mean_scale_times_k():
    torch.manual_seed(2)
    K = spd(n=3)
    prior = dist.Gamma(t(3.0), t(2.0))  # E[s] = 1.5
    f = ScaleMixture(prior, K).sample((40000,))
    prod = f.unsqueeze(-1) * f.unsqueeze(-2)
    emp, se = prod.mean(0), prod.std(0) / math.sqrt(len(f))
    assert ((emp - 1.5 * K).abs() < 5 * se).all()
    assert torch.allclose(ScaleMixture(prior, K).variance, 1.5 * K.diagonal())


def test_mixture_broadcasting():
    K = spd(3)
    prior = dist.LogNormal(t([[0.0], [0.5]]), t(1.0))  # batch (2, 1)
    sm = ScaleMixture(prior, K)
    assert sm.batch_shape == (2, 3)
    f = torch.randn(7, 1, 1, 5, dtype=D)
    lp = sm.log_prob(f)
    assert lp.shape == (7, 2, 3)
    one = ScaleMixture(dist.LogNormal(t(0.5), t(1.0)), K[2]).log_prob(f[:, 0, 0])
    assert torch.allclose(lp[:, 1, 2], one, atol=1e-12)
    assert sm.sample((4,)).shape == (4, 2, 3, 5)
    assert sm.expand((6, 2, 3)).batch_shape == (6, 2, 3)


# ------------------------------------------------------------------ regression posteriors
def data(n=30, m=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.rand(n + m, 1, generator=g, dtype=D) * 6
    y = torch.sin(X[:, 0]) + 0.2 * torch.randn(n + m, generator=g, dtype=D)
    return X[:n], y[:n], X[n:], y[n:]


def test_quadrature_reproduces_conjugate_student_t_predictive():
    X, y, Xs, ys = data()
    a, b, noise = 2.0, 1.5, 0.05
    tp = StudentTProcessRegression(X, y, rbf, concentration=a, rate=b, noise=noise)
    sm = ScaleMixtureRegression(X, y, dist.InverseGamma(t(a), t(b)), rbf, noise=noise)
    with torch.no_grad():
        assert float(sm.log_marginal()) == pytest.approx(float(tp.log_marginal()), abs=1e-9)
        p_tp, p_sm = tp.predict(Xs), sm.predict(Xs)
        # predictive density of the mixture (quadrature) = closed-form Student-t, to 1e-6
        assert torch.allclose(p_sm.log_prob(ys), p_tp.log_prob(ys), atol=1e-6, rtol=0)
        assert torch.allclose(p_sm.mean, p_tp.mean, atol=1e-10)
        assert torch.allclose(p_sm.variance, p_tp.variance, rtol=1e-7)
        # the posterior over s is InvGamma(a + n/2, b + q/2): compare its mean
        a2, b2 = tp.posterior()
        assert float(sm.scale_posterior().mean()) == pytest.approx(float(b2 / (a2 - 1)),
                                                                   rel=1e-9)


def test_unscaled_noise_eigen_path_equals_dense_gaussians():
    X, y, Xs, _ = data(n=12, m=4)
    K = rbf(X, X)
    lik = GaussianScaleLikelihood(K, y, 0.1, noise_scaled=False)
    s = t([0.3, 1.0, 4.0])
    eye = torch.eye(12, dtype=D)
    dense = torch.stack([dist.MultivariateNormal(torch.zeros(12, dtype=D), si * K + 0.1 * eye)
                         .log_prob(y) for si in s])
    assert torch.allclose(lik(s), dense, atol=1e-10)
    mean, var = lik.predictive_components(rbf(X, Xs), torch.ones(4, dtype=D), s)
    for j, si in enumerate(s):
        C = si * K + 0.1 * eye
        Ks = si * rbf(X, Xs)
        m_ref = Ks.mT @ torch.linalg.solve(C, y)
        v_ref = si - (Ks * torch.linalg.solve(C, Ks)).sum(0) + 0.1
        assert torch.allclose(mean[:, j], m_ref, atol=1e-10)
        assert torch.allclose(var[:, j], v_ref, atol=1e-10)


def test_importance_sampling_converges_to_quadrature():
    # small n: the posterior over s is broad, so sampling from the prior is efficient enough
    X, y, Xs, ys = data(n=6, m=3, seed=3)
    prior = BurrXII(t(2.0), t(1.0))
    model = ScaleMixtureRegression(X, y, prior, rbf, noise=0.05)
    with torch.no_grad():
        lik = model.likelihood()
        quad = model.scale_posterior(lik)
        torch.manual_seed(0)
        M = 40000
        imp = scale_posterior_importance(lik, prior, M)
        ll = lik(imp.scales)  # log p(y | s_j)
        c = ll.max()
        w = (ll - c).exp()  # p(y|s_j) / e^c
        # marginal likelihood: unbiased mean, Monte-Carlo standard error from the draws
        est, se = w.mean(), w.std() / math.sqrt(M)
        target = (quad.log_marginal - c).exp()
        assert abs(float(est - target)) < 4 * float(se)
        assert float(se / est) < 0.02  # the check is not vacuous
        # predictive density at each test point: ratio estimator, delta-method SE
        Ks, kss = rbf(X, Xs), torch.ones(3, dtype=D)
        mean, var = lik.predictive_components(Ks, kss, imp.scales)
        dens = torch.distributions.Normal(mean, var.sqrt()).log_prob(ys[:, None]).exp()
        num = w * dens  # (m, M)
        R = num.mean(-1) / w.mean()
        se_R = (num - R[:, None] * w).std(-1) / math.sqrt(M) / w.mean()
        R_quad = model.predict(Xs).log_prob(ys).exp()
        assert ((R - R_quad).abs() < 4 * se_R).all(), (R, R_quad, se_R)


def test_quadrature_posterior_batched_equals_unbatched():
    Ks = spd(2, n=6)
    ys = torch.randn(2, 6, dtype=D)
    prior = dist.HalfCauchy(t(1.0))
    lik = GaussianScaleLikelihood(Ks, ys, 0.1)
    post = scale_posterior_quadrature(lik, prior)
    assert post.log_marginal.shape == (2,) and post.scales.shape == (2, 128)
    for i in range(2):
        one = scale_posterior_quadrature(GaussianScaleLikelihood(Ks[i], ys[i], 0.1), prior)
        assert float(one.log_marginal) == pytest.approx(float(post.log_marginal[i]), abs=1e-12)
    assert torch.allclose(post.weights.sum(-1), torch.ones(2, dtype=D))


def test_predictive_samples_have_stated_moments():
    # generative check of the posterior predictive: s ~ p(s | y) (here InvGamma(a', b')),
    # y* | s ~ N(mean, s v); the Student-t predictive must have the same moments.
    torch.manual_seed(4)
    X, y, Xs, _ = data(n=10, m=2)
    tp = StudentTProcessRegression(X, y, rbf, concentration=3.0, rate=1.0, noise=0.05)
    with torch.no_grad():
        pred = tp.predict(Xs)
        a2, b2 = tp.posterior()
        N = 100000
        s = dist.InverseGamma(a2, b2).sample((N,))
        gp_mean = pred.loc
        v = pred.scale.pow(2) * a2 / b2  # latent + noise variance of the Gaussian part
        ystar = gp_mean + (s[:, None] * v).sqrt() * torch.randn(N, 2, dtype=D)
        se_m = ystar.std(0) / math.sqrt(N)
        assert ((ystar.mean(0) - pred.mean).abs() < 5 * se_m).all()
        sq = (ystar - pred.mean).pow(2)
        assert ((sq.mean(0) - pred.variance).abs() < 5 * sq.std(0) / math.sqrt(N)).all()
        # and samples of the mixture predictive of a non-conjugate prior
        mix = ScaleMixtureRegression(X, y, dist.Gamma(t(2.0), t(2.0)), rbf, noise=0.05)
        pm = mix.predict(Xs)
        z = pm.sample((N,))
        assert ((z.mean(0) - pm.mean).abs() < 5 * z.std(0) / math.sqrt(N)).all()
        sq = (z - pm.mean).pow(2)
        assert ((sq.mean(0) - pm.variance).abs() < 5 * sq.std(0) / math.sqrt(N)).all()


def test_bad_input_to_likelihood_and_quadrature():
    K = spd()
    y = torch.randn(5, dtype=D)
    with pytest.raises(ValueError, match="noise"):
        GaussianScaleLikelihood(K, y, -0.1)
    with pytest.raises(ValueError, match="n = len"):
        GaussianScaleLikelihood(K, y[:4], 0.1)
    bad = y.clone()
    bad[1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GaussianScaleLikelihood(K, bad, 0.1)
    with pytest.raises(ValueError, match="semi-definite"):
        GaussianScaleLikelihood(torch.diag(t([1.0, -1.0, 1.0, 1.0, 1.0])), y, 0.1,
                                noise_scaled=False)
    with pytest.raises(ValueError, match="num_samples"):
        scale_posterior_importance(GaussianScaleLikelihood(K, y, 0.1), dist.Gamma(t(1.), t(1.)),
                                   0)
    with pytest.raises(ValueError, match="positive support"):
        scale_posterior_quadrature(GaussianScaleLikelihood(K, y, 0.1), dist.Normal(t(0.), t(1.)))
    with pytest.raises(ValueError, match="positive support"):
        ScaleMixtureRegression(torch.randn(5, 1, dtype=D), y, dist.Normal(t(0.), t(1.)), rbf)
    prior = dist.Gamma(t(2.0), t(1.0))
    with pytest.raises(ValueError, match="loc must have last dimension"):
        ScaleMixture(prior, K, loc=torch.zeros(3, dtype=D))
    Kn = K.clone()
    Kn[2, 3] = Kn[3, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ScaleMixture(prior, Kn)
    from pyro_dkm.linalg import NotPositiveDefiniteError
    with pytest.raises(NotPositiveDefiniteError):
        ScaleMixture(prior, torch.diag(t([1.0, -1.0, 1.0])))
    with pytest.raises(ValueError, match="2 dimension"):
        ScaleMixtureRegression(torch.randn(5, dtype=D), y, prior, rbf)
