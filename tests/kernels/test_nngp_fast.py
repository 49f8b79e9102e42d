"""The fused / blocked dense NNGP path against the plain elementwise composition.

The reference is ``elementwise_kernel``: the layers applied through
``relu_expectations`` / ``erf_expectations`` and autograd over them (the dense path
before the fused forms). The fused ReLU node and the in-place blocks apply the same
floating-point operations in the same order, so values agree to rounding (here: bitwise);
gradients come from a hand-derived backward and agree to rounding.
"""

import pytest
import torch

from pyro_dkm.kernels._blocked import blocked_kernel, elementwise_kernel
from pyro_dkm.kernels._fused import arccos_cov, relu_cov_dot
from pyro_dkm.kernels.nngp import (
    Dense,
    Erf,
    Layer,
    Relu,
    erf_expectations,
    relu_expectations,
    serial,
)

F64 = torch.float64


def points(n=9, d=3, seed=0):
    """Generic points plus the hard cases: a duplicate, a near-coincident pair
    (|x - x'| ~ 1e-7, where s^2 = k11 k22 - k12^2 is at its rounding level), an
    anti-parallel pair (theta = pi) and a zero point."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g, dtype=F64)
    x[1] = x[0]
    x[2] = x[0] + 1e-7 * torch.randn(d, generator=g, dtype=F64)
    x[3] = -1.5 * x[4]
    x[5] = 0.0
    return x


def networks(w=1.7, b=0.1):
    return {
        "relu2": serial(Dense(w, b), Relu(), Dense(w, b), Relu(), Dense(1.0, 0.05)),
        "erf1": serial(Dense(w, b), Erf(), Dense(1.0, 0.0)),
        "mixed3": serial(Dense(w, b), Relu(), Dense(1.5, 0.3), Erf(), Dense(w, b), Relu(),
                         Dense(1.0, 0.0)),
    }


def as_tuple(t):
    return t if isinstance(t, tuple) else (t,)


GETS = ["nngp", "ntk", ("nngp", "ntk"), ("ntk", "nngp")]


@pytest.mark.parametrize("name", ["relu2", "erf1", "mixed3"])
@pytest.mark.parametrize("cross", [False, True])
def test_values_equal_elementwise_composition(name, cross):
    # no-grad calls take the blocked in-place path, grad calls the fused-node path; both
    # equal the elementwise composition (bitwise here: same operations in the same order;
    # asserted to 1e-13 so a platform with other vector widths is not flagged)
    kfn = networks()[name]
    x = points()
    x2 = points(7, seed=1) if cross else None
    for get in GETS:
        ref = as_tuple(elementwise_kernel(kfn, x, x2, get=get))
        with torch.no_grad():
            blocked = as_tuple(kfn(x, x2, get=get))
        fused = as_tuple(kfn(x.clone().requires_grad_(), x2, get=get))
        for r, b, f in zip(ref, blocked, fused):
            torch.testing.assert_close(b, r, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(f.detach(), r, rtol=1e-13, atol=1e-13)


def test_blocked_equals_unblocked_over_many_blocks():
    # tiny blocks (64 entries asked: 8 rows of 40 for K(x, x), so the exact diagonal spans
    # five blocks; 32 rows of 6 for K(x, y)), against the whole-matrix layer path
    kfn = networks()["mixed3"]
    x, y = points(40, seed=2), points(6, seed=3)
    for x2 in (None, y):
        for names in (("nngp",), ("ntk",), ("nngp", "ntk")):
            outs = blocked_kernel(kfn.layers, x, x2, names, block_entries=64)
            state = kfn.apply(kfn.initial_state(x, x2, ntk=True))
            for g in names:
                whole = state.cov if g == "nngp" else state.ntk
                torch.testing.assert_close(outs[g], whole, rtol=1e-13, atol=1e-13)


def test_batched_hyperparameters_and_inputs():
    # batch (3,) hyper-parameters against (4, 1, n, d)-batched inputs and unbatched ones,
    # no-grad (blocked) and grad (fused) paths, against the elementwise composition
    w = torch.tensor([1.0, 2.0, 0.5], dtype=F64)
    b = torch.tensor([0.1, 0.0, 0.3], dtype=F64)
    kfn = serial(Dense(w, b), Relu(), Dense(w, 0.2), Erf(), Dense(1.0, b))
    xb = torch.stack([points(6, seed=s) for s in range(4)])[:, None]  # (4, 1, 6, 3)
    # (x1 unbatched, x2 batched) uses seed 11: with seed 0, x1 would equal x2's first batch,
    # and at coincident pairs passed as two tensors the angle arccos(1 - rounding) is only
    # known to sqrt(machine eps), so the ReLU NTK's Kdot differs by ~3e-9 between the fused
    # and elementwise forms (the symmetric x2=None path uses the exact diagonal instead).
    for x1, x2 in ((points(6), None), (xb, None), (xb, points(7, seed=9)),
                   (points(6, seed=11), xb)):
        ref = elementwise_kernel(kfn, x1, x2, get=("nngp", "ntk"))
        with torch.no_grad():
            got = kfn(x1, x2, get=("nngp", "ntk"))
        fused = kfn(x1.clone().requires_grad_(), x2, get=("nngp", "ntk"))
        for r, g, f in zip(ref, got, fused):
            assert g.shape == r.shape
            torch.testing.assert_close(g, r, rtol=1e-13, atol=1e-13)
            torch.testing.assert_close(f.detach(), r, rtol=1e-13, atol=1e-13)


def _grads(fn, kfn_of, x1, x2, w, b, get, weights):
    x1 = x1.clone().requires_grad_()
    x2 = None if x2 is None else x2.clone().requires_grad_()
    w, b = w.clone().requires_grad_(), b.clone().requires_grad_()
    out = as_tuple(fn(kfn_of(w, b), x1, x2, get))
    loss = sum((o * m).sum() for o, m in zip(out, weights))
    wrt = [t for t in (x1, x2, w, b) if t is not None]
    return torch.autograd.grad(loss, wrt)


@pytest.mark.parametrize("get", ["nngp", "ntk", ("nngp", "ntk")])
@pytest.mark.parametrize("cross", [False, True])
def test_gradients_equal_autograd_of_elementwise_composition(get, cross):
    # d/dx1, d/dx2, d/d(weight_var), d/d(bias_var) (batched, shape (2,)) of a weighted sum
    # of the kernel(s): the hand-derived backward against autograd through the
    # elementwise closed forms. Duplicated inputs only for the NNGP: their layer-2 pair is
    # near-coincident (the off-diagonal layer-1 value carries the s^2 floor, the diagonal
    # is exact), and there the NTK's gradient ~ 1/s is decided by the rounding of s^2, in
    # both paths (docs/keops.md); measured 1e-9 apart on 1e7-sized cancelling terms.
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(2, 6, 3, generator=g, dtype=F64)
    x1[:, 3] = -0.7 * x1[:, 4]  # anti-parallel
    if get == "nngp":
        x1[:, 5] = x1[:, 0]  # duplicate: floored s^2 off the diagonal
    x2 = torch.randn(2, 5, 3, generator=g, dtype=F64) if cross else None
    w = torch.tensor([1.3, 2.1], dtype=F64)
    b = torch.tensor([0.1, 0.4], dtype=F64)

    def kfn_of(w, b):
        return serial(Dense(w, b), Relu(), Dense(w, b), Relu(), Dense(1.0, b))

    n2 = 5 if cross else 6
    weights = [torch.randn(2, 6, n2, generator=g, dtype=F64) for _ in range(2)]
    new = _grads(lambda k, a, c, gt: k(a, c, get=gt), kfn_of, x1, x2, w, b, get, weights)
    old = _grads(lambda k, a, c, gt: elementwise_kernel(k, a, c, get=gt), kfn_of, x1, x2, w,
                 b, get, weights)
    for gn, go in zip(new, old):
        torch.testing.assert_close(gn, go, rtol=1e-12, atol=1e-12)


def test_gradients_at_near_coincident_inputs_nngp():
    # NNGP gradients stay finite and equal the elementwise ones at a near-coincident pair
    # (the NNGP's derivatives are bounded there, unlike the NTK's)
    kfn_of = lambda w, b: serial(Dense(w, b), Relu(), Dense(w, b), Relu(), Dense(1.0, 0.0))  # noqa: E731
    x = points()
    w, b = torch.tensor(1.6, dtype=F64), torch.tensor(0.2, dtype=F64)
    wt = [torch.randn(9, 9, generator=torch.Generator().manual_seed(5), dtype=F64)]
    new = _grads(lambda k, a, c, gt: k(a, c, get=gt), kfn_of, x, None, w, b, "nngp", wt)
    old = _grads(lambda k, a, c, gt: elementwise_kernel(k, a, c, get=gt), kfn_of, x, None, w,
                 b, "nngp", wt)
    for gn, go in zip(new, old):
        assert torch.isfinite(gn).all()
        torch.testing.assert_close(gn, go, rtol=1e-9, atol=1e-9)


def test_relu_cov_dot_gradcheck_and_values():
    # relu_cov_dot: bitwise the values of relu_expectations; gradcheck (float64, finite
    # differences) of both outputs with broadcast (T, 1) / (1, M) variances, generic points
    g = torch.Generator().manual_seed(6)
    F = torch.randn(7, 4, generator=g, dtype=F64)
    G = F @ F.T / 4
    dg = G.diagonal()
    k12, k11, k22 = G[:3, 3:].clone(), dg[:3, None].clone(), dg[None, 3:].clone()
    for a, b in zip(relu_cov_dot(k12, k11, k22), relu_expectations(k12, k11, k22)):
        assert torch.equal(a, b)
    args = tuple(t.requires_grad_() for t in (k12, k11, k22))
    assert torch.autograd.gradcheck(lambda *a: relu_cov_dot(*a), args)
    assert torch.autograd.gradcheck(lambda *a: relu_cov_dot(*a)[1], args)
    assert torch.autograd.gradcheck(arccos_cov, args)
    # second derivatives (create_graph=True differentiates the elementwise form)
    assert torch.autograd.gradgradcheck(lambda *a: relu_cov_dot(*a), args)
    assert torch.autograd.gradgradcheck(arccos_cov, args)


def test_kernel_gradcheck_inputs_and_hyperparameters():
    # the whole kernel (NNGP and NTK, ReLU and erf) by finite differences in x1, x2 and
    # the hyper-parameters
    g = torch.Generator().manual_seed(7)
    x1 = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    x2 = torch.randn(3, 3, generator=g, dtype=F64, requires_grad=True)
    w = torch.tensor(1.4, dtype=F64, requires_grad=True)
    b = torch.tensor([0.1, 0.3], dtype=F64, requires_grad=True)

    def f(x1, x2, w, b):
        kfn = serial(Dense(w, b), Relu(), Dense(w, 0.1), Erf(), Dense(w, b), Relu(),
                     Dense(1.0, 0.0))
        K, T = kfn(x1, x2, get=("nngp", "ntk"))
        Ks, Ts = kfn(x1, get=("nngp", "ntk"))
        return K, T, Ks, Ts

    assert torch.autograd.gradcheck(f, (x1, x2, w, b))


def test_erf_block_near_clamp_equals_elementwise():
    # erf arguments at the clamp (|2 k12| ~ sqrt((1 + 2k11)(1 + 2k22)), large variances)
    x = 1e4 * points()
    kfn = serial(Dense(2.0, 0.0), Erf(), Dense(1.0, 0.0))
    ref = elementwise_kernel(kfn, x, get=("nngp", "ntk"))
    with torch.no_grad():
        got = kfn(x, get=("nngp", "ntk"))
    for a, r in zip(got, ref):
        torch.testing.assert_close(a, r, rtol=1e-13, atol=1e-13)
    k12, k11 = torch.tensor([0.5, 1e3], dtype=F64), torch.tensor(1e3, dtype=F64)
    assert torch.isfinite(torch.stack(erf_expectations(k12, k11, k11))).all()


def test_dispatch_blocked_only_without_grad(monkeypatch):
    # no grad needed -> blocked path; any tensor requiring grad -> fused layer path; a
    # user-defined layer -> the layer path always
    import pyro_dkm.kernels._blocked as blocked

    calls = []
    orig = blocked.blocked_kernel
    monkeypatch.setattr(blocked, "blocked_kernel",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    x = points()
    w = torch.tensor(1.5, dtype=F64, requires_grad=True)
    kfn = serial(Dense(w, 0.1), Relu(), Dense(1.0, 0.0))
    kfn(x)
    assert calls == []
    with torch.no_grad():
        kfn(x)
    assert calls == [1]
    serial(Dense(1.5, 0.1), Relu())(x)
    assert calls == [1, 1]
    serial(Dense(1.5, 0.1), Relu())(x.clone().requires_grad_())
    assert calls == [1, 1]

    class Identity(Layer):
        def apply(self, state):
            return state

    serial(Dense(1.5, 0.1), Identity(), Relu())(x)
    assert calls == [1, 1]


def test_float32_equals_elementwise_composition():
    # float32 inputs (clamp margins and s^2 floor at float32's eps) through both paths
    kfn = networks()["mixed3"]
    x = points(20).float()
    ref = elementwise_kernel(kfn, x, get=("nngp", "ntk"))
    with torch.no_grad():
        got = kfn(x, get=("nngp", "ntk"))
    fused = kfn(x.clone().requires_grad_(), get=("nngp", "ntk"))
    for r, g, f in zip(ref, got, fused):
        assert g.dtype == torch.float32
        torch.testing.assert_close(g, r, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(f.detach(), r, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("cross", [False, True])
def test_checkpointed_gradients_equal_layer_path(cross, monkeypatch):
    # large kernels with gradients: blocked forward, blocks recomputed in the backward
    # (forced here by a tiny threshold and 200-entry blocks); values bitwise those of the
    # layer path, gradients (x1, x2, batched weight variance, bias variance) to rounding
    import pyro_dkm.kernels._blocked as blocked
    import pyro_dkm.kernels.nngp as nngp

    g = torch.Generator().manual_seed(8)
    x1 = torch.randn(2, 30, 3, generator=g, dtype=F64)
    x1[:, 7] = -0.5 * x1[:, 2]
    x2 = torch.randn(25, 3, generator=g, dtype=F64) if cross else None
    w, b = torch.tensor([1.3, 2.0], dtype=F64), torch.tensor(0.2, dtype=F64)
    n2 = 25 if cross else 30
    weights = [torch.randn(2, 30, n2, generator=g, dtype=F64) for _ in range(2)]

    def kfn_of(w, b):
        return serial(Dense(w, b), Relu(), Dense(w, 0.1), Erf(), Dense(1.0, b), Relu(),
                      Dense(w, 0.05))

    calls = []
    orig = blocked.checkpointed_kernel
    monkeypatch.setattr(blocked, "checkpointed_kernel",
                        lambda *a, **k: calls.append(1) or orig(*a, **k))
    monkeypatch.setattr(blocked, "GRAD_BLOCK_ENTRIES", 200)
    for get in ("nngp", "ntk", ("nngp", "ntk")):
        call = lambda k, a, c, gt: k(a, c, get=gt)  # noqa: E731
        monkeypatch.setattr(nngp, "CHECKPOINT_MIN_ENTRIES", 1)
        ck = _grads(call, kfn_of, x1, x2, w, b, get, weights)
        monkeypatch.setattr(nngp, "CHECKPOINT_MIN_ENTRIES", 10**12)
        layer = _grads(call, kfn_of, x1, x2, w, b, get, weights)
        for a, r in zip(ck, layer):
            torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12 * r.abs().max())
    assert len(calls) == 3


def test_checkpointed_gradcheck(monkeypatch):
    import pyro_dkm.kernels._blocked as blocked

    monkeypatch.setattr(blocked, "GRAD_BLOCK_ENTRIES", 8)
    g = torch.Generator().manual_seed(9)
    x1 = torch.randn(5, 3, generator=g, dtype=F64, requires_grad=True)
    x2 = torch.randn(4, 3, generator=g, dtype=F64, requires_grad=True)
    w = torch.tensor(1.4, dtype=F64, requires_grad=True)

    def f(x1, x2, w):
        layers = serial(Dense(w, 0.1), Relu(), Dense(w, w), Erf(), Dense(1.0, 0.0)).layers
        return (*blocked.checkpointed_kernel(layers, x1, x2, ("nngp", "ntk")),
                *blocked.checkpointed_kernel(layers, x1, None, ("nngp", "ntk")))

    assert torch.autograd.gradcheck(f, (x1, x2, w))


@pytest.mark.parametrize("checkpointed", [False, True])
@pytest.mark.parametrize("get", ["nngp", "ntk"])
def test_fused_paths_have_the_elementwise_second_derivatives(monkeypatch, checkpointed, get):
    # create_graph=True through the fused nodes (and the blocked/checkpointed kernel) records
    # the elementwise form, so Hessian-vector products equal those of Relu(fused=False) /
    # Erf(fused=False); w is shared by two layers (each layer's share must be counted once)
    import pyro_dkm.kernels.nngp as nngp

    if checkpointed:
        monkeypatch.setattr(nngp, "CHECKPOINT_MIN_ENTRIES", 1)
    g = torch.Generator().manual_seed(4)
    x1 = torch.randn(12, 3, generator=g, dtype=F64)
    res = []
    for fused in (False, True):
        x = x1.clone().requires_grad_()
        w = torch.tensor(1.5, dtype=F64, requires_grad=True)
        kfn = serial(Dense(w, 0.1), Relu(fused=fused), Dense(w, 0.1), Erf(fused=fused))
        K = kfn(x, get=get)
        if fused:
            assert ("Checkpointed" in type(K.grad_fn).__name__) == checkpointed
        gx, gw = torch.autograd.grad((K * K.detach().cos()).sum(), (x, w), create_graph=True)
        res.append((gx, gw, *torch.autograd.grad(gx.sin().sum() + gw ** 2, (x, w))))
    for a, b in zip(*res):
        torch.testing.assert_close(b.detach(), a.detach(), rtol=1e-12,
                                   atol=1e-12 * float(a.detach().abs().max()))
    assert repr(Relu(fused=False)) == "Relu(fused=False)" and repr(Erf()) == "Erf()"
    with pytest.raises(TypeError, match="fused must be a bool"):
        Relu(fused=1)


def test_broadcast_shape_matches_torch():
    from pyro_dkm.kernels._fused import broadcast_shape

    for shapes in [((2, 1, 3), (4, 3)), ((), (5,)), ((1,), (3, 1)), ((0, 1), (1, 4)),
                   ((3, 1, 1), (7, 1), (1, 5))]:
        assert broadcast_shape(*shapes) == torch.broadcast_shapes(*shapes)
    with pytest.raises(ValueError, match="do not broadcast"):
        broadcast_shape((2, 3), (4, 3))


def test_erf_cov_dot_values_gradients_and_gradcheck():
    # erf_cov_dot: bitwise the values of erf_expectations; gradients equal autograd through
    # erf_expectations at generic points and where the arcsin argument is clamped (huge
    # variances, a duplicated point); gradcheck with broadcast (T, 1) / (1, M) variances
    from pyro_dkm.kernels._fused import erf_cov_dot
    from pyro_dkm.kernels.nngp import clamp_eps

    g = torch.Generator().manual_seed(10)
    for scale in (1.0, 1e7):
        F = scale * torch.randn(7, 4, generator=g, dtype=F64)
        F[5] = F[1]
        G = F @ F.T / 4
        dg = G.diagonal()
        wts = [torch.randn(7, 7, generator=g, dtype=F64) for _ in range(2)]
        grads, vals = [], []
        for fn in (lambda a, b, c: erf_cov_dot(a, b, c, clamp_eps(F64)), erf_expectations):
            k12, k11, k22 = (t.clone().requires_grad_() for t in (G, dg[:, None], dg[None, :]))
            out = fn(k12, k11, k22)
            vals.append([o.detach() for o in out])
            grads.append(torch.autograd.grad(sum((o * w).sum() for o, w in zip(out, wts)),
                                             (k12, k11, k22)))
        for a, b in zip(*vals):
            assert torch.equal(a, b)
        for a, b in zip(*grads):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12 * b.abs().max())
    G = (F @ F.T / 4) / scale**2
    dg = G.diagonal()
    args = tuple(t.clone().requires_grad_() for t in (G[:3, 3:], dg[:3, None], dg[None, 3:]))
    assert torch.autograd.gradcheck(lambda *a: erf_cov_dot(*a, 1e-12), args)
    assert torch.autograd.gradgradcheck(lambda *a: erf_cov_dot(*a, 1e-12), args)
