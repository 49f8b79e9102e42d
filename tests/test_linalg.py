import pickle

import pytest
import torch
from torch.distributions import MultivariateNormal, kl_divergence

from pyro_dkm.linalg import (
    NotPositiveDefiniteError,
    cholesky,
    gaussian_log_marginal,
    kl_zero_mean_gaussians,
    kl_zero_mean_gaussians_taylor,
)


def random_spd(*shape, n, dtype=torch.float64):
    A = torch.randn(*shape, n, 2 * n, dtype=dtype)
    return A @ A.mT / (2 * n) + 0.1 * torch.eye(n, dtype=dtype)


def test_kl_matches_torch_distributions_batched():
    G = random_spd(3, n=6)
    K = random_spd(3, n=6)
    ours = kl_zero_mean_gaussians(G, K)
    zero = torch.zeros(3, 6, dtype=torch.float64)
    # reference: torch.distributions' closed form for two MultivariateNormals
    ref = kl_divergence(MultivariateNormal(zero, G), MultivariateNormal(zero, K))
    assert ours.shape == (3,)
    torch.testing.assert_close(ours, ref, rtol=0, atol=1e-8)


def test_kl_broadcasts_and_accepts_factors():
    G = random_spd(2, 1, n=4)
    K = random_spd(5, n=4)
    kl = kl_zero_mean_gaussians(G, K)
    assert kl.shape == (2, 5)
    kl2 = kl_zero_mean_gaussians(None, None, G_tril=torch.linalg.cholesky(G),
                                 K_tril=torch.linalg.cholesky(K))
    torch.testing.assert_close(kl, kl2, rtol=0, atol=1e-12)
    # KL(N(0,K) || N(0,K)) = 0
    torch.testing.assert_close(kl_zero_mean_gaussians(K, K), torch.zeros(5, dtype=K.dtype),
                               rtol=0, atol=1e-10)


def test_taylor_kl_is_second_order_accurate():
    K = random_spd(n=5)
    D = random_spd(n=5) - random_spd(n=5)  # symmetric direction
    errs = []
    for t in (1e-1, 5e-2, 2.5e-2):
        G = K + t * D
        errs.append((kl_zero_mean_gaussians(G, K) - kl_zero_mean_gaussians_taylor(G, K)).abs())
    # The Taylor form matches KL to second order, so the error is O(t^3): halving t
    # divides it by ~8 (between 6 and 10 allows for the O(t^4) term).
    for e1, e2 in zip(errs, errs[1:]):
        assert 6 < (e1 / e2).item() < 10


def test_taylor_kl_equals_frobenius_form_when_commuting():
    # For commuting (here diagonal) G and K, tr[(G^-1 K - I)^2] = ||G^-1 K - I||_F^2.
    g = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    k = torch.tensor([1.5, 1.0, 0.7], dtype=torch.float64)
    expected = 0.25 * ((k / g - 1) ** 2).sum()
    got = kl_zero_mean_gaussians_taylor(torch.diag(g), torch.diag(k))
    torch.testing.assert_close(got, expected, rtol=1e-14, atol=0)


def test_cholesky_rank_deficient_psd_succeeds():
    X = torch.randn(8, 2, dtype=torch.float64)
    A = X @ X.T  # rank 2, PSD
    L = cholesky(A)
    assert torch.isfinite(L).all()
    # the jitter is relative and small: the factor reproduces A closely
    assert (L @ L.T - A).abs().max() < 1e-6 * A.diagonal().mean()


def test_cholesky_leaves_pd_matrices_untouched_and_jitters_only_failures():
    A = random_spd(n=4)
    X = torch.randn(4, 1, dtype=torch.float64)
    batch = torch.stack([A, X @ X.T])
    L = cholesky(batch)
    torch.testing.assert_close(L[0], torch.linalg.cholesky(A), rtol=0, atol=0)
    assert torch.isfinite(L[1]).all()


def test_cholesky_indefinite_raises_named_error():
    A = torch.diag(torch.tensor([1.0, -1.0, 2.0], dtype=torch.float64))
    with pytest.raises(NotPositiveDefiniteError, match=r"K_ii \(3 x 3\).*jitter"):
        cholesky(A, name="K_ii")
    # it is also a torch LinAlgError, so existing handlers keep working
    with pytest.raises(torch.linalg.LinAlgError):
        cholesky(A)
    # and it survives pickling (multiprocessing workers re-raise it in the parent)
    try:
        cholesky(A, name="K_ii")
    except NotPositiveDefiniteError as e:
        e2 = pickle.loads(pickle.dumps(e))
        assert str(e2) == str(e) and e2.size == 3


@pytest.mark.parametrize(
    "bad, err, match",
    [
        (torch.ones(3), ValueError, "at least 2"),
        (torch.ones(2, 3, dtype=torch.float64), ValueError, "square"),
        (torch.eye(3, dtype=torch.int64), TypeError, "floating"),
        (torch.full((2, 2), float("nan"), dtype=torch.float64), ValueError, "NaN"),
        ([[1.0]], TypeError, "torch.Tensor"),
    ],
)
def test_cholesky_bad_input(bad, err, match):
    with pytest.raises(err, match=match):
        cholesky(bad, name="A")


def test_gaussian_log_marginal_matches_torch():
    K = random_spd(2, n=5)
    y = torch.randn(2, 5, dtype=torch.float64)
    ref = MultivariateNormal(torch.zeros_like(y), K).log_prob(y)
    torch.testing.assert_close(gaussian_log_marginal(torch.linalg.cholesky(K), y), ref,
                               rtol=0, atol=1e-10)


def test_jittered_cholesky_has_finite_gradients_on_duplicate_rows():
    # A Gram of duplicate rows is singular, so the jitter path runs. Its forward value
    # was always finite, but gradients used to be NaN (routed through the failed plain
    # factorisation); now L L^T = A + eps I exactly and the gradient is that of a
    # plain Cholesky of the jittered matrix.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(5, 3, generator=g, dtype=torch.float64)
    X = torch.cat([X, X[:2]])  # 7 rows, rank 3
    A = (X @ X.mT).requires_grad_()
    L = cholesky(A, jitter=1e-6)  # first jitter: 1e-6 times the mean diagonal
    w = torch.randn(7, 7, generator=g, dtype=torch.float64)
    (L * w).sum().backward()
    assert torch.isfinite(A.grad).all()
    eps = 1e-6 * A.detach().diagonal().mean()
    torch.testing.assert_close(L @ L.mT, A + eps * torch.eye(7, dtype=torch.float64),
                               rtol=1e-12, atol=1e-12)
    A2 = (A.detach() + eps * torch.eye(7, dtype=torch.float64)).requires_grad_()
    (torch.linalg.cholesky(A2) * w).sum().backward()
    torch.testing.assert_close(A.grad, A2.grad, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_jittered_cholesky_of_a_kernel_with_duplicate_inputs_has_finite_input_gradients(dtype):
    # The DKM's K_ii at duplicate inducing inputs (real data has duplicate rows): the
    # arc-cosine kernel of G = X X^T / d is singular, cholesky adds jitter, and the
    # gradient w.r.t. X must be finite. The old code was NaN for 18 of these 40 cases.
    from pyro_dkm.kernels import ReluGram

    for seed in range(10):
        g = torch.Generator().manual_seed(seed)
        X = torch.randn(40, 8, generator=g, dtype=dtype)
        X = torch.cat([X, X[:10]]).requires_grad_()
        L = cholesky(ReluGram()(X @ X.mT / 8))
        (L * torch.randn(L.shape, generator=g, dtype=dtype)).sum().backward()
        assert torch.isfinite(X.grad).all(), seed
