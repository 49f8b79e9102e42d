"""StudentTProcess and the closed-form inverse-gamma (Student-t) maths."""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_dkm.kernels.nngp import Dense, Relu, serial
from pyro_dkm.linalg import NotPositiveDefiniteError
from pyro_dkm.processes import (
    StudentTProcess,
    inverse_gamma_posterior,
    log_gamma_ratio,
    student_t_log_marginal,
)

D = torch.float64



def spd(*batch, n=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=D)
    return A @ A.mT / n + 0.3 * torch.eye(n, dtype=D)


def test_log_prob_equals_pyro_multivariate_student_t():
    K = spd(3)
    loc = torch.randn(3, 5, dtype=D)
    df = torch.tensor([1.5, 4.0, 30.0], dtype=D)
    tp = StudentTProcess(df, K, loc=loc)
    ref = dist.MultivariateStudentT(df, loc, torch.linalg.cholesky(K))
    f = ref.sample((7,))
    assert tp.batch_shape == (3,) and tp.event_shape == (5,)
    # same density, computed by pyro's formula
    assert torch.allclose(tp.log_prob(f), ref.log_prob(f), atol=1e-11, rtol=0)


def test_inverse_gamma_form_is_df_2a_scale_b_over_a():
    K = spd()
    a, b = torch.tensor(2.5, dtype=D), torch.tensor(0.7, dtype=D)
    tp = StudentTProcess(concentration=a, rate=b, covariance_matrix=K)
    ref = dist.MultivariateStudentT(2 * a, torch.zeros(5, dtype=D),
                                    torch.linalg.cholesky(b / a * K))
    f = ref.sample((6,))
    assert torch.allclose(tp.log_prob(f), ref.log_prob(f), atol=1e-11, rtol=0)
    # the closed-form marginal likelihood of the scale mixture is the same density
    assert torch.allclose(student_t_log_marginal(f, K, a, b), ref.log_prob(f), atol=1e-11,
                          rtol=0)


def test_tends_to_gp_as_df_grows():
    K = spd()
    f = torch.randn(4, 5, dtype=D)
    gp = dist.MultivariateNormal(torch.zeros(5, dtype=D), K).log_prob(f)
    q = (f.unsqueeze(-2) @ torch.linalg.solve(K, f.unsqueeze(-1))).reshape(-1)
    n = 5
    for df in (1e4, 1e6, 1e8):
        diff = StudentTProcess(df, K).log_prob(f) - gp
        # first-order expansion: log MVT - log MVN = ((q - n)^2 - 2n) / (4 df) + O(df^-2)
        first = ((q - n) ** 2 - 2 * n) / (4 * df)
        assert torch.allclose(diff, first, rtol=1e-2 if df == 1e4 else 1e-3, atol=1e-12)
    # at df = 1e13 the difference (~1e-12) is below the test's tolerance: the GP
    assert torch.allclose(StudentTProcess(1e13, K).log_prob(f), gp, atol=1e-9, rtol=0)


def test_log_gamma_ratio_matches_lgamma_where_both_are_accurate():
    x = torch.tensor([0.3, 5.0, 99.0, 100.0, 101.0, 500.0, 2e3], dtype=D)
    for h in (0.5, 2.5, 40.0):
        direct = torch.lgamma(x + h) - torch.lgamma(x) - h * torch.log(x)
        assert torch.allclose(log_gamma_ratio(x, h), direct, atol=1e-11, rtol=0)
    # and it tends to 0 like h(h-1)/(2x)
    big = torch.tensor(1e12, dtype=D)
    assert float(log_gamma_ratio(big, 3.0)) == pytest.approx(3.0 / 1e12, rel=1e-6)


def test_kernel_front_end_equals_covariance_matrix():
    X = torch.randn(6, 3, dtype=D)
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1))
    K = kfn(X) + 1e-6 * torch.eye(6, dtype=D)

    def kern(x1, x2):
        return kfn(x1, x2) + 1e-6 * torch.eye(6, dtype=D)

    a = StudentTProcess(3.0, kernel=kern, inputs=X, loc=lambda x: x[:, 0])
    b = StudentTProcess(3.0, K, loc=X[:, 0])
    f = b.sample((3,))
    assert torch.allclose(a.log_prob(f), b.log_prob(f), atol=1e-12, rtol=0)


def test_inverse_gamma_posterior_is_bayes_rule():
    # log p(y|s) + log p(s) - log p(y) = log InvGamma(s | a', b') for every s
    K = spd()
    y = torch.randn(5, dtype=D)
    a, b = torch.tensor(1.5, dtype=D), torch.tensor(2.0, dtype=D)
    a2, b2 = inverse_gamma_posterior(y, K, a, b)
    logpy = student_t_log_marginal(y, K, a, b)
    for s in (0.1, 0.7, 3.0):
        lhs = (dist.MultivariateNormal(torch.zeros(5, dtype=D), s * K).log_prob(y)
               + dist.InverseGamma(a, b).log_prob(torch.tensor(s, dtype=D)) - logpy)
        rhs = dist.InverseGamma(a2, b2).log_prob(torch.tensor(s, dtype=D))
        assert float(lhs) == pytest.approx(float(rhs), abs=1e-11)


def test_sample_covariance_is_df_over_df_minus_2_times_scale():
    torch.manual_seed(1)
    K = spd(n=3)
    df = 7.0
    f = StudentTProcess(df, K).sample((40000,))  # (N, 3)
    prod = f.unsqueeze(-1) * f.unsqueeze(-2)  # (N, 3, 3)
    emp, se = prod.mean(0), prod.std(0) / math.sqrt(len(f))
    theory = df / (df - 2) * K
    assert ((emp - theory).abs() < 5 * se).all(), (emp, theory, se)


def test_broadcasting_batch_dims_and_expand():
    K = spd(3)  # batch (3,)
    df = torch.tensor([[2.5], [9.0]], dtype=D)  # (2, 1)
    loc = torch.randn(5, dtype=D)
    tp = StudentTProcess(df, K, loc=loc)
    assert tp.batch_shape == (2, 3)
    f = torch.randn(4, 1, 1, 5, dtype=D)
    lp = tp.log_prob(f)
    assert lp.shape == (4, 2, 3)
    for i in range(2):
        for j in range(3):
            ref = dist.MultivariateStudentT(df[i, 0], loc, torch.linalg.cholesky(K[j]))
            assert torch.allclose(lp[:, i, j], ref.log_prob(f[:, 0, 0]), atol=1e-11)
    assert tp.sample((6,)).shape == (6, 2, 3, 5)
    e = StudentTProcess(3.0, K[0]).expand((4, 2))
    assert e.batch_shape == (4, 2) and e.log_prob(f[0, 0, 0]).shape == (4, 2)


def test_usable_in_pyro_sample_with_rsample_gradients():
    K = spd(n=4)
    df = torch.tensor(5.0, dtype=D, requires_grad=True)

    def model():
        return pyro.sample("f", StudentTProcess(df, K))

    tr = pyro.poutine.trace(model).get_trace()
    assert tr.nodes["f"]["value"].shape == (4,)
    tr.log_prob_sum().backward()
    assert df.grad is not None and torch.isfinite(df.grad)


@pytest.mark.parametrize("kwargs, err, match", [
    (dict(df=0.0), ValueError, "df must be positive"),
    (dict(df=-1.0), ValueError, "df must be positive"),
    (dict(df=float("nan")), ValueError, "df contains NaN"),
    (dict(concentration=0.0, rate=1.0), ValueError, "concentration"),
    (dict(concentration=1.0, rate=-2.0), ValueError, "rate"),
    (dict(concentration=1.0), ValueError, "both concentration and rate"),
    (dict(df=2.0, concentration=1.0, rate=1.0), ValueError, "not both"),
    (dict(df="3"), TypeError, "df must be"),
])
def test_bad_scale_parameters(kwargs, err, match):
    with pytest.raises(err, match=match):
        StudentTProcess(covariance_matrix=spd(), **kwargs)


def test_bad_covariances_and_shapes():
    with pytest.raises(NotPositiveDefiniteError, match="not positive definite"):
        StudentTProcess(3.0, torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=D)))
    with pytest.raises(ValueError, match="symmetric"):
        StudentTProcess(3.0, spd() + torch.triu(torch.ones(5, 5, dtype=D), 1))
    K = spd()
    K[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        StudentTProcess(3.0, K)
    with pytest.raises(ValueError, match="square"):
        StudentTProcess(3.0, torch.ones(3, 4, dtype=D))
    with pytest.raises(ValueError, match="loc must have last dimension"):
        StudentTProcess(3.0, spd(), loc=torch.zeros(4, dtype=D))
    with pytest.raises(ValueError, match="exactly one"):
        StudentTProcess(3.0)
    with pytest.raises(ValueError, match="needs inputs"):
        StudentTProcess(3.0, kernel=lambda a, b: a @ b.mT)
    with pytest.raises(TypeError, match="floating-point"):
        StudentTProcess(3.0, torch.eye(3, dtype=torch.int64))
    with pytest.raises(ValueError, match="y has 4 points"):
        student_t_log_marginal(torch.zeros(4, dtype=D), spd(), 1.0, 1.0)
