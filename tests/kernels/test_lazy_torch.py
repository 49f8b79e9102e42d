"""The torch path of the lazy kernel products (keops_matmul / NNGPOperator with
use_keops=False, and "auto" on CPU): K @ v one square tile at a time (only the upper tiles
of a symmetric K), never holding K. Needs no pykeops."""

import warnings

import pytest
import torch

from pyro_dkm.kernels import keops as K
from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial

F64 = torch.float64


def _setup(w):
    kfn = serial(Dense(w, 0.1), Relu(), Dense(1.0, 0.05), Erf(), Dense(1.5, 0.2))
    g = torch.Generator().manual_seed(1)
    x1 = torch.randn(130, 4, generator=g, dtype=F64)
    x1[10:13] = x1[:3]  # duplicated rows: the exact diagonal must land on every block
    x2 = torch.randn(70, 4, generator=g, dtype=F64)
    return kfn, x1, x2


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("cols", [None, 3])
def test_tiled_product_equals_dense_values_and_gradients(monkeypatch, get, sym, cols):
    # with autograd: checkpointed tiles of 40 (130 x 130: the 10 upper of 4 x 4 tiles;
    # 130 x 70: 4 x 2 tiles), gradients w.r.t. both inputs, a hyper-parameter and v
    w = torch.tensor(2.0, dtype=F64, requires_grad=True)
    kfn, x1, x2 = _setup(w)
    x1 = x1.requires_grad_()
    x2 = x1 if sym else x2.requires_grad_()
    n2 = x2.shape[0]
    v = torch.randn((n2,) if cols is None else (n2, cols), dtype=F64, requires_grad=True)
    wrt = [x1, w, v] + ([] if sym else [x2])

    ref = kfn(x1, None if sym else x2, get=get) @ v
    g_ref = torch.autograd.grad(ref.sin().sum(), wrt)

    tiles = []
    tile_products = K._tile_products

    def spy(kfn_, xi, xj, vi, vj, get_, diagonal, both):
        tiles.append((xi.shape[0], xj.shape[0], diagonal, both))
        return tile_products(kfn_, xi, xj, vi, vj, get_, diagonal, both)

    monkeypatch.setattr(K, "MATMUL_TILE", 40)
    monkeypatch.setattr(K, "_tile_products", spy)
    got = K.keops_matmul(kfn, x1, None if sym else x2, v, get=get, use_keops=False)
    n_forward = len(tiles)
    g_got = torch.autograd.grad(got.sin().sum(), wrt)

    assert n_forward == (10 if sym else 8)
    assert len(tiles) == 2 * n_forward  # each tile recomputed once in the backward pass
    if sym:
        assert sum(d for _, _, d, _ in tiles[:n_forward]) == 4
        assert sum(b for _, _, _, b in tiles[:n_forward]) == 6
    torch.testing.assert_close(got, ref, rtol=1e-13, atol=1e-13)
    for a, b in zip(g_got, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("get", ["nngp", "ntk"])
@pytest.mark.parametrize("sym", [True, False])
def test_tiled_product_without_grad_equals_dense(monkeypatch, get, sym):
    # 130 x 130 (symmetric: 5 x 5 tiles of 32, only the 15 on or above the diagonal computed)
    # or 130 x 70 (5 x 3 tiles), ragged last tiles
    kfn, x1, x2 = _setup(torch.tensor([2.0, 0.7], dtype=F64))  # a batch of 2 kernels
    x2 = x1 if sym else x2
    v = torch.randn(x2.shape[0], 3, dtype=F64)
    calls = []

    class Counting:  # counts the kernel evaluations
        layers = kfn.layers

        def __call__(self, a, b=None, **kw):
            calls.append((a.shape[-2], None if b is None else b.shape[-2]))
            return kfn(a, b, **kw)

    monkeypatch.setattr(K, "MATMUL_TILE", 32)
    with torch.no_grad():
        got = K.keops_matmul(Counting(), x1, None if sym else x2, v, get=get, use_keops=False)
    want = kfn(x1, None if sym else x2, get=get) @ v
    assert got.shape == (2, 130, 3)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)
    assert len(calls) == 15  # symmetric: 5 * 6 / 2 tiles; else 5 * 3
    if sym:  # diagonal tiles are K(x_i, x_i) with the exact diagonal
        assert sum(b is None for _, b in calls) == 5


def test_tiled_product_through_the_operator(monkeypatch):
    kfn, x1, _ = _setup(2.0)
    v = torch.randn(130, 2, dtype=F64)
    monkeypatch.setattr(K, "MATMUL_TILE", 40)
    op = K.NNGPOperator(kfn, x1, noise=0.1, use_keops=False)
    with torch.no_grad():
        got = op @ v
    want = (kfn(x1) + 0.1 * torch.eye(130, dtype=F64)) @ v
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-13)


def test_auto_on_cpu_never_calls_keops(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("KeOps must not run for use_keops='auto' on CPU")

    monkeypatch.setattr(K, "_keops_matmul_impl", boom)
    kfn, x1, x2 = _setup(2.0)
    v = torch.randn(70, dtype=F64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        got = K.keops_matmul(kfn, x1, x2, v, use_keops="auto", threshold=1)
    torch.testing.assert_close(got, kfn(x1, x2) @ v, rtol=1e-13, atol=1e-13)
