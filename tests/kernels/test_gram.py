"""Gram-space kernels against their defining expectations and explicit features."""

import math

import pytest
import torch

from pyro_dkm.kernels.gram import (
    ErfGram,
    NormalisedGaussianGram,
    ReluGram,
    SqExpGram,
    SumGram,
)


def features(P=5, N=7, seed=0):
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(P, N, generator=g, dtype=torch.float64)
    F[1] = -0.8 * F[0] + 0.1 * F[1]  # a strongly anti-correlated pair
    return F


def gram(F):
    return F @ F.T / F.shape[1]


@pytest.mark.parametrize("kernel, phi", [(ReluGram(variance=1.0), torch.relu),
                                         (ErfGram(variance=1.0), torch.erf)])
def test_activation_gram_kernels_match_monte_carlo(kernel, phi):
    G = gram(features())
    gen = torch.Generator().manual_seed(3)
    n = 400_000
    f = torch.randn(n, G.shape[0], generator=gen, dtype=G.dtype) @ torch.linalg.cholesky(G).T
    prod = phi(f)[:, :, None] * phi(f)[:, None, :]  # (n, P, P): phi(f_i) phi(f_j)
    mc, se = prod.mean(0), prod.std(0) / math.sqrt(n)
    K = kernel(G)
    # E[phi(f_i) phi(f_j)], f ~ N(0, G), by Monte Carlo: within 4 standard errors
    z = ((K - mc) / se).abs()
    assert z.max() < 4, z


def test_relu_gram_variance_two_preserves_diagonal():
    G = gram(features())
    torch.testing.assert_close(ReluGram()(G).diagonal(), G.diagonal(), rtol=1e-14, atol=0)


def test_sqexp_gram_equals_feature_space_rbf():
    F = features()
    N = F.shape[1]
    ell = 1.7
    sq = torch.cdist(F, F).pow(2)
    # exp(-||f_i - f_j||^2 / (2 N ell^2)): R_ij = g_i/2 + g_j/2 - G_ij = ||f_i - f_j||^2 / (2N)
    ref = 0.8 * torch.exp(-sq / (2 * N * ell**2))
    torch.testing.assert_close(SqExpGram(ell, 0.8)(gram(F)), ref, rtol=1e-12, atol=1e-12)


def test_normalised_gaussian_equals_rbf_on_unit_features():
    F = features()
    U = F / F.norm(dim=1, keepdim=True)
    ell = 0.9
    ref = torch.exp(-torch.cdist(U, U).pow(2) / (2 * ell**2))
    torch.testing.assert_close(NormalisedGaussianGram(ell)(gram(F)), ref, rtol=1e-12, atol=1e-12)
    # invariant to rescaling each point's features
    S = torch.diag(torch.tensor([1.0, 3.0, 0.2, 5.0, 1.1], dtype=torch.float64))
    torch.testing.assert_close(NormalisedGaussianGram(ell)(S @ gram(F) @ S), ref,
                               rtol=1e-12, atol=1e-12)


KERNELS = [ReluGram(), ErfGram(), SqExpGram(1.3), NormalisedGaussianGram(0.7),
           SumGram([ReluGram(), SqExpGram(0.5)], [0.3, 0.7]), ReluGram() + ErfGram(0.5)]


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_inducing_form_equals_full_blocks(kernel):
    G = gram(features(P=9, N=12)).expand(2, 9, 9)  # a batch of 2
    Pi = 4
    K = kernel(G)
    K_ii, K_ti, k_t = kernel.blocks(G[..., :Pi, :Pi], G[..., Pi:, :Pi],
                                    G[..., Pi:, Pi:].diagonal(dim1=-2, dim2=-1))
    torch.testing.assert_close(K_ii, K[..., :Pi, :Pi], rtol=0, atol=1e-10)
    torch.testing.assert_close(K_ti, K[..., Pi:, :Pi], rtol=0, atol=1e-10)
    torch.testing.assert_close(k_t, K[..., Pi:, Pi:].diagonal(dim1=-2, dim2=-1), rtol=0,
                               atol=1e-10)


@pytest.mark.parametrize("kernel", KERNELS, ids=repr)
def test_gram_kernels_are_psd(kernel):
    K = kernel(gram(features(P=8, N=3)))  # rank-deficient input Gram
    torch.testing.assert_close(K, K.mT, rtol=0, atol=1e-14)
    assert torch.linalg.eigvalsh(K).min() > -1e-10


def test_sum_gram_is_weighted_sum():
    G = gram(features())
    s = SumGram([ReluGram(), SqExpGram(2.0)], [0.25, 2.0])(G)
    torch.testing.assert_close(s, 0.25 * ReluGram()(G) + 2.0 * SqExpGram(2.0)(G), rtol=1e-14,
                               atol=1e-14)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda: ReluGram()(torch.ones(3, 2, dtype=torch.float64)), ValueError, "G must be square"),
        (lambda: ReluGram()(torch.eye(3, dtype=torch.int32)), TypeError, "G must be a floating"),
        (lambda: ReluGram()(torch.tensor([[float("nan")]])), ValueError, "G contains"),
        (lambda: ReluGram().blocks(torch.eye(3), torch.ones(4, 2), torch.ones(4)), ValueError,
         "G_ti must have 3 columns"),
        (lambda: ReluGram().blocks(torch.eye(3), torch.ones(4, 3), torch.ones(5)), ValueError,
         "g_t must have one entry per row"),
        (lambda: SqExpGram(lengthscale=0.0), ValueError, "lengthscale must be positive"),
        (lambda: ReluGram(variance=-1.0), ValueError, "variance must be positive"),
        (lambda: SumGram([ReluGram()], [1.0, 2.0]), ValueError, "one entry per kernel"),
        (lambda: SumGram([ReluGram(), "rbf"]), TypeError, r"kernels\[1\]"),
    ],
)
def test_bad_input(call, err, match):
    with pytest.raises(err, match=match):
        call()


def _arccos_points(T=6, M=4, seed=0, dtype=torch.float64):
    """Cross Gram (T, M) and both diagonals of random features (|cos| < 1 everywhere)."""
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(T + M, 5, generator=g, dtype=dtype)
    G = F @ F.T / 5
    d = G.diagonal()
    return G[:T, T:].clone(), d[:T, None].clone(), d[None, T:].clone()


def test_arccos_cov_gradcheck_float64():
    # the hand-derived backward of the fused arc-cosine covariance against finite
    # differences (torch.autograd.gradcheck, float64, its default tolerances), with the
    # diagonals broadcast as (T, 1) and (1, M) like the inducing form uses them
    from pyro_dkm.kernels.gram import arccos_cov

    k12, k11, k22 = (t.requires_grad_() for t in _arccos_points())
    assert torch.autograd.gradcheck(arccos_cov, (k12, k11, k22))
    # any operand may be the broadcast one: a (1, M) cross row against (T, 1) diagonals
    row = k12[:1].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(arccos_cov, (row, k11, k22))


def test_arccos_cov_equals_autograd_of_relu_expectations():
    # same values and gradients as differentiating nngp.relu_expectations elementwise
    # (1e-12), both at generic points and at coincident points where s^2 is floored
    # (G_ii's diagonal: k12 = k11 = k22) and at an anti-parallel pair (k12 = -sqrt(k11 k22))
    from pyro_dkm.kernels.gram import arccos_cov
    from pyro_dkm.kernels.nngp import relu_expectations

    F = torch.randn(7, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    F[3] = F[0]  # duplicate point
    F[4] = -2.0 * F[1]  # anti-parallel point
    G = F @ F.T / 5
    w = torch.randn(7, 7, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    grads = []
    for fn in (arccos_cov, lambda a, b, c: relu_expectations(a, b, c)[0]):
        Gr = G.clone().requires_grad_()
        g = Gr.diagonal()
        K = fn(Gr, g[:, None], g[None, :])
        (K * w).sum().backward()
        grads.append((K.detach(), Gr.grad))
    torch.testing.assert_close(grads[0][0], grads[1][0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-10, atol=1e-12)


def test_arccos_cov_float32_and_zero_diagonal_are_finite():
    # float32 and a zero-norm point (k11 = 0: the floor is the constant `tiny`) give finite
    # values and gradients
    from pyro_dkm.kernels.gram import arccos_cov

    k12, k11, k22 = (t.float() for t in _arccos_points())
    k11[0] = 0.0
    k12[0] = 0.0
    k12, k11, k22 = (t.requires_grad_() for t in (k12, k11, k22))
    K = arccos_cov(k12, k11, k22)
    K.sum().backward()
    for t in (K, k12.grad, k11.grad, k22.grad):
        assert torch.isfinite(t).all()
