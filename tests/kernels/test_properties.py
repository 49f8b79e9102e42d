"""Property tests over shapes and batch dimensions (hypothesis)."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pyro_dkm.kernels.gram import ErfGram, NormalisedGaussianGram, ReluGram, SqExpGram
from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial

batch_shapes = st.lists(st.integers(1, 3), min_size=0, max_size=2).map(tuple)
sizes = st.integers(1, 5)
ACTS = st.lists(st.sampled_from([Relu, Erf]), min_size=0, max_size=3)


def make_kfn(acts, w, b):
    layers = [Dense(w, b)]
    for act in acts:
        layers += [act(), Dense(w, b)]
    return serial(*layers)


@settings(max_examples=40, deadline=None)
@given(batch=batch_shapes, n1=sizes, n2=sizes, d=st.integers(1, 4), acts=ACTS,
       w=st.floats(0.1, 3.0), b=st.floats(0.0, 1.0), seed=st.integers(0, 2**16))
def test_nngp_shapes_symmetry_psd_and_diag(batch, n1, n2, d, acts, w, b, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(*batch, n1, d, generator=g, dtype=torch.float64)
    x2 = torch.randn(*batch, n2, d, generator=g, dtype=torch.float64)
    kfn = make_kfn(acts, w, b)
    K12, T12 = kfn(x1, x2, get=("nngp", "ntk"))
    assert K12.shape == T12.shape == (*batch, n1, n2)
    K11, T11 = kfn(x1, get=("nngp", "ntk"))
    for M in (K11, T11):
        torch.testing.assert_close(M, M.mT, rtol=0, atol=1e-12)
        scale = M.diagonal(dim1=-2, dim2=-1).abs().max()
        assert torch.linalg.eigvalsh(M).min() >= -1e-10 * scale
    torch.testing.assert_close(kfn(x1, diag=True), K11.diagonal(dim1=-2, dim2=-1), rtol=1e-12,
                               atol=1e-12)
    # the cross kernel agrees with the symmetric one on the shared inputs
    torch.testing.assert_close(kfn(x1, x1.clone()), K11, rtol=1e-7, atol=1e-9)


@settings(max_examples=30, deadline=None)
@given(bx=batch_shapes, n1=sizes, n2=sizes, seed=st.integers(0, 2**16))
def test_nngp_broadcasts_batch_dims(bx, n1, n2, seed):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(*bx, n1, 3, generator=g, dtype=torch.float64)
    x2 = torch.randn(n2, 3, generator=g, dtype=torch.float64)  # no batch: broadcasts
    kfn = make_kfn([Relu, Erf], 1.5, 0.1)
    K = kfn(x1, x2)
    assert K.shape == (*bx, n1, n2)
    flat = x1.reshape(-1, n1, 3)
    for i, xi in enumerate(flat):
        torch.testing.assert_close(K.reshape(-1, n1, n2)[i], kfn(xi, x2), rtol=1e-13, atol=1e-13)


@settings(max_examples=30, deadline=None)
@given(batch=batch_shapes, P=st.integers(2, 7), N=st.integers(1, 6), Pi=st.integers(1, 6),
       kernel=st.sampled_from([ReluGram(), ErfGram(), SqExpGram(0.8), NormalisedGaussianGram()]),
       seed=st.integers(0, 2**16))
def test_gram_kernel_shapes_and_blocks(batch, P, N, Pi, kernel, seed):
    Pi = min(Pi, P - 1)
    g = torch.Generator().manual_seed(seed)
    F = torch.randn(*batch, P, N, generator=g, dtype=torch.float64)
    G = F @ F.mT / N + 1e-3 * torch.eye(P, dtype=torch.float64)
    K = kernel(G)
    assert K.shape == (*batch, P, P)
    torch.testing.assert_close(K, K.mT, rtol=0, atol=1e-13)
    K_ii, K_ti, k_t = kernel.blocks(G[..., :Pi, :Pi], G[..., Pi:, :Pi],
                                    G[..., Pi:, Pi:].diagonal(dim1=-2, dim2=-1))
    assert K_ii.shape == (*batch, Pi, Pi) and K_ti.shape == (*batch, P - Pi, Pi)
    assert k_t.shape == (*batch, P - Pi)
    torch.testing.assert_close(K_ti, K[..., Pi:, :Pi], rtol=0, atol=1e-10)
