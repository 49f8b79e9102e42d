"""KeOps lazy NNGP/NTK kernels against the dense closed forms of pyro_dkm.kernels.nngp.

Every distinct KeOps formula (and each gradient) is a g++ build of ~7-20 s on a cold
cache, so the default run uses only a handful of formulas (d = 3, one right-hand side):
a depth-3 ReLU/erf network for NNGP and NTK (values and gradients), depth 1 and 2 values,
and the CG test reusing the depth-3 NNGP formula. The exhaustive grid is marked slow.
"""

import os
import warnings

import pytest
import torch

os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

from pyro_dkm.kernels import keops as K  # noqa: E402
from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial  # noqa: E402

pytestmark = pytest.mark.skipif(not K.keops_available(), reason="pykeops not installed")

D = 3
F64 = torch.float64


def _net(depth, acts=("relu", "erf", "relu"), w=None):
    layers = []
    for i in range(depth):
        layers += [Dense(2.0 if w is None or i else w, 0.1 + 0.05 * i),
                   Relu() if acts[i % len(acts)] == "relu" else Erf()]
    layers.append(Dense(1.3, 0.05))
    return serial(*layers)


def _data(n1=120, n2=90, seed=0):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, D, generator=g, dtype=F64)
    x2 = torch.randn(n2, D, generator=g, dtype=F64)
    # near-coincident points: a copy of x1's first rows, perturbed by 1e-7 and exactly
    x2[:5] = x1[:5] + 1e-7 * torch.randn(5, D, generator=g, dtype=F64)
    x2[5:8] = x1[5:8]
    return x1, x2


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_depth3_values_and_gradients_match_dense(get):
    # Reference: the dense closed forms (pyro_dkm.kernels.nngp). Tolerance 1e-6 relative
    # (float64); the lazy path differs only by rounding and by the s^2 floor at coincident
    # points (<= sqrt(eps)/2pi ~ 2e-9 relative per ReLU layer).
    x1, x2 = _data()
    v = torch.randn(x2.shape[0], 1, dtype=F64, generator=torch.Generator().manual_seed(1))
    w = torch.tensor(1.7, dtype=F64, requires_grad=True)
    kfn = _net(3, w=w)
    outs = {}
    for use in (True, False):
        # gradients w.r.t. x1 and a hyper-parameter (x2 is the same kind of variable as x1
        # up to transposition; its gradient formula is one more g++ build, tested in slow)
        a = x1.clone().requires_grad_()
        out = K.keops_matmul(kfn, a, x2, v, get=get, use_keops=use)
        grads = torch.autograd.grad((out * torch.cos(out)).sum(), (a, w))
        outs[use] = (out.detach(), *grads)
    for got, want in zip(outs[True], outs[False]):
        assert _rel(got, want) < 1e-6
    # the symmetric K(X, X) v against the dense path with exact closed-form diagonal
    u = torch.randn(x1.shape[0], 1, dtype=F64, generator=torch.Generator().manual_seed(2))
    s_keops = K.keops_matmul(kfn, x1, None, u, get=get, use_keops=True)
    s_dense = kfn(x1, get=get) @ u
    assert _rel(s_keops, s_dense) < 1e-6


@pytest.mark.parametrize("depth,acts,get", [(1, ("relu",), "ntk"), (2, ("erf",), "nngp")])
def test_shallow_values_match_dense(depth, acts, get):
    x1, x2 = _data(seed=2)
    v = torch.randn(x2.shape[0], 1, dtype=F64)
    kfn = _net(depth, acts)
    got = K.keops_matmul(kfn, x1, x2, v, get=get, use_keops=True)
    want = kfn(x1, x2, get=get) @ v
    assert _rel(got, want) < 1e-6


def test_cg_solve_matches_cholesky_n2000():
    # Exact GP solve (K + s2 I)^-1 y by linear_operator's CG through KeOps matvecs,
    # against a dense Cholesky solve; CG run to 1e-10 relative residual.
    import linear_operator

    g = torch.Generator().manual_seed(3)
    n = 2000
    x = torch.randn(n, D, generator=g, dtype=F64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
    kfn = _net(3)
    op = K.NNGPOperator(kfn, x, noise=0.1, use_keops=True)
    with linear_operator.settings.max_cg_iterations(2000), \
            linear_operator.settings.cg_tolerance(1e-10), \
            linear_operator.settings.max_cholesky_size(0):
        alpha = op.solve(y)
    Kd = kfn(x) + 0.1 * torch.eye(n, dtype=F64)
    want = torch.cholesky_solve(y, torch.linalg.cholesky(Kd))
    assert _rel(alpha, want) < 1e-6
    # the operator's own dense view and diagonal are the exact dense kernel
    assert torch.allclose(op.diagonal(), Kd.diagonal(), rtol=1e-12, atol=0)


def test_fallback_without_pykeops_warns_and_is_dense(monkeypatch):
    monkeypatch.setattr(K, "_KEOPS", False)
    x1, x2 = _data(20, 10)
    v = torch.randn(10, dtype=F64)
    kfn = _net(2)
    with pytest.warns(K.KeOpsFallbackWarning, match="dense"):
        got = K.keops_matmul(kfn, x1, x2, v, use_keops=True)
    torch.testing.assert_close(got, kfn(x1, x2) @ v, rtol=0, atol=0)
    # "auto" below the threshold is silently dense
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        K.keops_matmul(kfn, x1, x2, v, use_keops="auto")


def test_batched_inputs_fall_back_with_warning():
    x = torch.randn(2, 15, D, dtype=F64)
    kfn = _net(1)
    v = torch.randn(15, 1, dtype=F64)
    with pytest.warns(K.KeOpsFallbackWarning, match="batched inputs"):
        got = K.keops_matmul(kfn, x, x, v, use_keops=True)
    torch.testing.assert_close(got, kfn(x) @ v)


def test_bad_inputs():
    x = torch.randn(10, D, dtype=F64)
    kfn = _net(1)
    with pytest.raises(ValueError, match="get"):
        K.keops_matmul(kfn, x, x, torch.ones(10), get="foo")
    with pytest.raises(ValueError, match="v must have 10 rows"):
        K.keops_matmul(kfn, x, x, torch.ones(7, dtype=F64))
    with pytest.raises(ValueError, match="use_keops"):
        K.keops_matmul(kfn, x, x, torch.ones(10, dtype=F64), use_keops="yes")
    with pytest.raises(ValueError, match="noise"):
        K.NNGPOperator(kfn, x, noise=-1.0)
    with pytest.raises(TypeError, match="kfn"):
        K.NNGPOperator(x, x)
    with pytest.raises(ValueError, match="x1"):
        K.keops_matmul(kfn, x.clone().fill_(float("nan")), x, torch.ones(10, dtype=F64))


def test_operator_dense_path_and_transpose():
    # use_keops=False: the operator is exactly the dense kernel (no KeOps build).
    x1, x2 = _data(30, 20)
    kfn = _net(2)
    op = K.NNGPOperator(kfn, x1, x2, use_keops=False)
    Kd = kfn(x1, x2)
    r = torch.randn(20, 2, dtype=F64)
    torch.testing.assert_close(op @ r, Kd @ r)
    torch.testing.assert_close(op.mT @ torch.ones(30, 1, dtype=F64), Kd.mT @ torch.ones(30, 1,
                                                                                         dtype=F64))
    torch.testing.assert_close(op.to_dense(), Kd)
    assert op.shape == (30, 20)


def test_per_process_cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("KEOPS_CACHE_FOLDER", os.environ.get("KEOPS_CACHE_FOLDER", ""))
    import pykeops

    old = pykeops.get_build_folder()
    try:
        path = K.set_keops_cache_dir(str(tmp_path), per_process=True)
        assert path == os.path.join(str(tmp_path), f"pid-{os.getpid()}")
        assert os.path.isdir(path)
        assert pykeops.get_build_folder().startswith(path)
    finally:
        pykeops.set_build_folder(old)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    x1, x2 = _data()
    v = torch.randn(x2.shape[0], 1, dtype=F64)
    kfn = _net(3)
    got = K.keops_matmul(kfn, x1.cuda(), x2.cuda(), v.cuda(), use_keops=True).cpu()
    assert _rel(got, kfn(x1, x2) @ v) < 1e-6


@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("acts", [("relu",), ("erf",), ("erf", "relu")])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_exhaustive_grid_values_and_gradients(depth, acts, get):
    x1, x2 = _data(seed=depth)
    v = torch.randn(x2.shape[0], 1, dtype=F64)
    w = torch.tensor(1.7, dtype=F64, requires_grad=True)
    kfn = _net(depth, acts, w=w)
    res = {}
    for use in (True, False):
        a = x1.clone().requires_grad_()
        out = K.keops_matmul(kfn, a, x2, v, get=get, use_keops=use)
        res[use] = (out.detach(), *torch.autograd.grad(out.square().sum(), (a, w)))
    for got, want in zip(res[True], res[False]):
        assert _rel(got, want) < 1e-6
