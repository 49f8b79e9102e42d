"""KeOps lazy NNGP/NTK kernels against the dense closed forms of pyro_dkm.kernels.nngp.

Every distinct KeOps formula is a g++ build (10-40 s on a loaded 2-core CPU, cached on
disk), so the default run uses few formulas, all with d = 3 and one right-hand side:
depth 3 (ReLU, erf, ReLU) NNGP and NTK, depth 2 ReLU NNGP (shared with the CG test and
the GPyTorch test), depth 1 ReLU NTK; each one forward and one gradient build. The full
depth x activation x kernel grid is marked slow.
"""

import os
import warnings

import pytest
import torch

os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

from pyro_dkm.kernels import keops as K  # noqa: E402
from pyro_dkm.kernels import solvers as S  # noqa: E402
from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial  # noqa: E402

pytestmark = pytest.mark.skipif(not K.keops_available(), reason="pykeops not installed")

D = 3
F64 = torch.float64


def _net(depth, acts=("relu", "erf", "relu"), w=None, b=None):
    """Dense(w, b), act, Dense, act, ..., Dense; ``w``/``b`` (tensors) replace the first
    layer's hyper-parameters so gradients w.r.t. them can be taken."""
    layers = []
    for i in range(depth):
        layers += [Dense(w if (w is not None and i == 0) else 2.0 - 0.1 * i,
                         b if (b is not None and i == 0) else 0.1 + 0.05 * i),
                   Relu() if acts[i % len(acts)] == "relu" else Erf()]
    layers.append(Dense(1.3, 0.05))
    return serial(*layers)


def _data(n1=120, n2=90, seed=0, coincident=True):
    g = torch.Generator().manual_seed(seed)
    x1 = torch.randn(n1, D, generator=g, dtype=F64)
    x2 = torch.randn(n2, D, generator=g, dtype=F64)
    if coincident:  # near-coincident (1e-7 apart) and exactly coincident pairs
        x2[:5] = x1[:5] + 1e-7 * torch.randn(5, D, generator=g, dtype=F64)
        x2[5:8] = x1[5:8]
    return x1, x2


def _rel(a, b):
    return ((a - b).abs().max() / b.abs().max()).item()


def _values_and_grads(kfn_of, x1, x2, v, get, use):
    """K(x1, x2) v (x2=None: K(x1, x1)) and the gradients of a nonlinear scalar of it
    w.r.t. x1, x2, v and the first layer's weight and bias variances."""
    w = torch.tensor(1.7, dtype=F64, requires_grad=True)
    b = torch.tensor(0.12, dtype=F64, requires_grad=True)
    a1 = x1.clone().requires_grad_()
    a2 = None if x2 is None else x2.clone().requires_grad_()
    vv = v.clone().requires_grad_()
    out = K.keops_matmul(kfn_of(w, b), a1, a2, vv, get=get, use_keops=use)
    wrt = [a1, vv, w, b] + ([] if a2 is None else [a2])
    return [out.detach(), *torch.autograd.grad((out * torch.cos(out)).sum(), wrt)]


def _check(depth, acts, get, seed=0):
    # Reference: the dense closed forms and torch autograd (pyro_dkm.kernels.nngp).
    # Tolerance 1e-6 relative (float64); the two paths differ by rounding only.
    # NTK input-gradients are singular at coincident inputs (d/dk12 of arccos), where
    # rounding of k11 k22 - k12^2 decides them, so the NTK uses well-separated inputs.
    x1, x2 = _data(seed=seed, coincident=get == "nngp")
    g = torch.Generator().manual_seed(seed + 1)
    v = torch.randn(x2.shape[0], 1, dtype=F64, generator=g)
    u = torch.randn(x1.shape[0], 1, dtype=F64, generator=g)

    def kfn_of(w, b):
        return _net(depth, acts, w, b)

    with warnings.catch_warnings():
        warnings.simplefilter("error", K.KeOpsFallbackWarning)  # no silent dense fallback
        for xa, xb, rhs in ((x1, x2, v), (x1, None, u)):  # cross K(x1, x2), symmetric K(x1, x1)
            got = _values_and_grads(kfn_of, xa, xb, rhs, get, True)
            want = _values_and_grads(kfn_of, xa, xb, rhs, get, False)
            for name, a, b in zip(["value", "x1", "v", "w", "b", "x2"], got, want):
                assert _rel(a, b) < 1e-6, (name, _rel(a, b))


@pytest.mark.keops
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_depth3_values_and_gradients_match_dense(get):
    _check(3, ("relu", "erf", "relu"), get)


@pytest.mark.keops
@pytest.mark.parametrize("depth,acts,get", [(1, ("relu",), "ntk"), (2, ("relu",), "nngp")])
def test_shallow_values_and_gradients_match_dense(depth, acts, get):
    _check(depth, acts, get, seed=depth)


@pytest.mark.keops
def test_cg_solve_matches_cholesky_n2000():
    # Exact GP solve (K + s2 I)^-1 y by preconditioned CG through KeOps matvecs, against a
    # dense Cholesky solve; CG run to a 1e-10 relative residual (cond(K + s2 I) ~ 1e4, so
    # the solution error is <= ~1e-6).
    g = torch.Generator().manual_seed(3)
    n = 2000
    x = torch.randn(n, D, generator=g, dtype=F64)
    y = torch.sin(x.sum(-1, keepdim=True)) + 0.1 * torch.randn(n, 1, generator=g, dtype=F64)
    kfn = _net(2, ("relu",))
    op = K.NNGPOperator(kfn, x, noise=0.1, use_keops=True)
    info = {}
    alpha = S.cg_solve(op, y, tol=1e-10, max_iter=500, precond_rank=50, info=info)
    Kd = kfn(x) + 0.1 * torch.eye(n, dtype=F64)
    want = torch.cholesky_solve(y, torch.linalg.cholesky(Kd))
    assert _rel(alpha, want) < 1e-6
    assert info["iterations"] < 200  # the pivoted-Cholesky preconditioner works
    # the operator's diagonal is the exact dense one
    assert torch.allclose(op.diagonal(), Kd.diagonal(), rtol=1e-12, atol=0)
    # the Student-t / GP quadratic form y^T (K + s2 I)^-1 y from the same kind of solve
    quad = S.inv_quad(op, y, tol=1e-10, precond_rank=50)
    assert abs(quad.item() - (y * want).sum().item()) < 1e-6 * (y * want).sum().item()


def test_pivoted_cholesky_is_exact_at_full_rank_and_greedy_below():
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(1.0, 0.05))
    x = torch.randn(40, 3, dtype=torch.float64)
    Kd = kfn(x)
    L = S._pivoted_cholesky(kfn, x, "nngp", 40)
    assert torch.allclose(L.mT @ L, Kd, atol=1e-10)
    # rank r: the residual K - L^T L is PSD, and its trace shrinks as r grows
    traces = []
    for r in (5, 10, 20):
        Lr = S._pivoted_cholesky(kfn, x, "nngp", r)
        assert Lr.shape == (r, 40)
        resid = Kd - Lr.mT @ Lr
        assert torch.linalg.eigvalsh(resid).min() > -1e-10
        traces.append(float(resid.diagonal().sum()))
    assert traces[0] > traces[1] > traces[2]


@pytest.mark.keops
# linear_operator's CG stalls near 1e-5 (below): its NumericalWarning is the expected outcome
@pytest.mark.filterwarnings("ignore::linear_operator.utils.warnings.NumericalWarning")
def test_linear_operator_solve_and_exact_predict():
    # linear_operator's own CG (op.solve, as GPyTorch uses it) on the lazy operator, and
    # the exact_predict helper, against dense Cholesky (n = 300; same KeOps formula as
    # above). linear_operator's CG stalls near 1e-5 relative error even on dense float64
    # matrices, hence its looser tolerance here.
    import linear_operator

    g = torch.Generator().manual_seed(4)
    x = torch.randn(300, D, generator=g, dtype=F64)
    xs = torch.randn(20, D, generator=g, dtype=F64)
    y = torch.sin(x.sum(-1)) + 0.1 * torch.randn(300, generator=g, dtype=F64)
    kfn = _net(2, ("relu",))
    Kd = kfn(x) + 0.1 * torch.eye(300, dtype=F64)
    want = torch.cholesky_solve(y[:, None], torch.linalg.cholesky(Kd))[:, 0]
    op = K.NNGPOperator(kfn, x, noise=0.1, use_keops=True)
    with linear_operator.settings.max_cholesky_size(0), \
            linear_operator.settings.cg_tolerance(1e-8), \
            linear_operator.settings.max_cg_iterations(300):
        got = op.solve(y[:, None])[:, 0]
    assert _rel(got, want) < 1e-4
    mean, var, quad = S.exact_predict(kfn, x, y, xs, noise=0.1, variance=True, block=1,
                                      tol=1e-10, precond_rank=20)
    Ks = kfn(xs, x)
    torch.testing.assert_close(mean, Ks @ want, rtol=1e-7, atol=1e-7)
    var_want = kfn(xs, diag=True) - (Ks * torch.linalg.solve(Kd, Ks.mT).mT).sum(-1)
    torch.testing.assert_close(var, var_want, rtol=1e-6, atol=1e-7)
    assert abs(quad.item() - (y @ want).item()) < 1e-7 * (y @ want).item()


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


def test_compile_failure_falls_back_to_dense(monkeypatch):
    # A failing KeOps build (e.g. a truncated .so raising ImportError) must give a warning
    # and the dense result, never an exception.
    def broken(*args, **kwargs):
        raise ImportError("simulated broken KeOps build")

    monkeypatch.setattr(K, "_reduce", broken)
    monkeypatch.setattr(K, "_FAILED", set())
    x1, x2 = _data(20, 10)
    v = torch.randn(10, 2, dtype=F64)
    kfn = _net(1)
    with pytest.warns(K.KeOpsFallbackWarning, match="ImportError"):
        got = K.keops_matmul(kfn, x1, x2, v, use_keops=True)
    torch.testing.assert_close(got, kfn(x1, x2) @ v)


def test_gradient_build_failure_falls_back_to_chunked_torch(monkeypatch):
    # The forward reduction runs (here: replaced by the dense product); the gradient build
    # fails, so the exact chunked torch gradients are used, with a warning.
    def fake_reduce(spec, backward, *args):
        if backward:
            raise ImportError("simulated broken gradient build")
        a1, a2, theta, consts, v = args
        return K._pair_torch(spec, a1[:, None], a2[None], theta, consts) @ v

    monkeypatch.setattr(K, "_reduce", fake_reduce)
    monkeypatch.setattr(K, "_FAILED", set())
    x1, x2 = _data(40, 30)
    v = torch.randn(30, 2, dtype=F64)
    res = {}
    for use in (True, False):
        w = torch.tensor(1.7, dtype=F64, requires_grad=True)
        a1, a2 = x1.clone().requires_grad_(), x2.clone().requires_grad_()
        out = K.keops_matmul(_net(2, w=w), a1, a2, v, use_keops=use)
        with warnings.catch_warnings(record=True) as rec:
            warnings.simplefilter("always")
            res[use] = torch.autograd.grad(out.square().sum(), (a1, a2, w))
        if use:
            assert any("chunked torch" in str(r.message) for r in rec)
    for got, want in zip(res[True], res[False]):
        assert _rel(got, want) < 1e-10


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
    ones = torch.ones(30, 1, dtype=F64)
    torch.testing.assert_close(op.mT @ ones, Kd.mT @ ones)
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


def test_formula_text_is_linear_in_depth():
    # Shared intermediates are let-bound (Factorize), so the formula text, and with it the
    # generated C++, grows linearly with depth instead of exponentially.
    sizes = [len(K._formulas(K._program(_net(n, ("relu", "erf")))[0], "ntk", D, True))
             for n in (2, 4, 8)]
    assert sizes[2] - sizes[1] < 1.2 * 2 * (sizes[1] - sizes[0])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_matches_cpu():
    x1, x2 = _data()
    v = torch.randn(x2.shape[0], 1, dtype=F64)
    kfn = _net(3)
    got = K.keops_matmul(kfn, x1.cuda(), x2.cuda(), v.cuda(), use_keops=True).cpu()
    assert _rel(got, kfn(x1, x2) @ v) < 1e-6


@pytest.mark.keops
@pytest.mark.slow
@pytest.mark.parametrize("depth", [1, 2, 3])
@pytest.mark.parametrize("acts", [("relu",), ("erf",), ("erf", "relu")])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_exhaustive_grid_values_and_gradients(depth, acts, get):
    _check(depth, acts, get, seed=depth)
