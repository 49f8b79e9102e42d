"""NNGP/NTK closed forms against Monte Carlo over wide finite networks."""

import math

import pytest
import torch

from pyro_dkm.kernels.nngp import Dense, Erf, Relu, serial

WIDTH = 2048
ACTS = {"relu": (Relu, torch.relu), "erf": (Erf, torch.erf)}
WEIGHT_VAR, BIAS_VAR = 1.6, 0.2


def inputs(dtype=torch.float64):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, generator=g, dtype=dtype)
    x[3] = -0.5 * x[0]  # an anti-correlated pair exercises theta near pi
    return x


def network(depth, act):
    layers = []
    for _ in range(depth):
        layers += [Dense(WEIGHT_VAR, BIAS_VAR), ACTS[act][0]()]
    return serial(*layers, Dense(WEIGHT_VAR, BIAS_VAR))


def finite_net_outputs(x, depth, act, width, n_out, gen):
    """One random network in NTK parameterisation; returns its (n, n_out) outputs."""
    phi = ACTS[act][1]
    h, fan_in = x, x.shape[-1]
    for layer in range(depth + 1):
        out = n_out if layer == depth else width
        W = torch.randn(fan_in, out, generator=gen, dtype=x.dtype)
        b = torch.randn(out, generator=gen, dtype=x.dtype)
        z = math.sqrt(WEIGHT_VAR / fan_in) * h @ W + math.sqrt(BIAS_VAR) * b
        h, fan_in = (phi(z) if layer < depth else z), out
    return h


def finite_net_ntk(x, depth, act, width, gen):
    """Empirical NTK of one random scalar-output network: J J^T over all parameters."""
    phi = ACTS[act][1]
    params, fan_in = [], x.shape[-1]
    for layer in range(depth + 1):
        out = 1 if layer == depth else width
        W = torch.randn(fan_in, out, generator=gen, dtype=x.dtype).requires_grad_()
        b = torch.randn(out, generator=gen, dtype=x.dtype).requires_grad_()
        params.append((W, b, fan_in))
        fan_in = out
    h = x
    for layer, (W, b, fi) in enumerate(params):
        z = math.sqrt(WEIGHT_VAR / fi) * h @ W + math.sqrt(BIAS_VAR) * b
        h = phi(z) if layer < depth else z
    f = h[:, 0]
    flat = [p for W, b, _ in params for p in (W, b)]
    J = torch.stack([torch.cat([g.reshape(-1) for g in torch.autograd.grad(f[i], flat,
                                                                           retain_graph=True)])
                     for i in range(len(f))])
    return J @ J.T


def assert_within_mc_error(samples, exact, n_se=4.0, max_rel_se=0.02):
    """samples: (M, n, n) independent estimates; exact: (n, n)."""
    mean = samples.mean(0)
    se = samples.std(0) / math.sqrt(samples.shape[0])
    z = ((mean - exact) / se).abs()
    assert z.max() < n_se, f"max |MC - exact| / SE = {z.max():.2f}\nMC={mean}\nexact={exact}"
    # the comparison has teeth: the MC error is small relative to the kernel
    assert (se / exact.abs().max()).max() < max_rel_se


@pytest.mark.parametrize("act", ["relu", "erf"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_nngp_matches_wide_network_monte_carlo(depth, act):
    x = inputs()
    gen = torch.Generator().manual_seed(10 + depth)
    # 16 networks, each with WIDTH readout units: the readout covariance of one
    # network is an estimate of E[f f^T]; networks are independent draws.
    est = torch.stack([
        (lambda f: f @ f.T / f.shape[1])(finite_net_outputs(x, depth, act, WIDTH, WIDTH, gen))
        for _ in range(16)
    ])
    exact = network(depth, act)(x)
    assert_within_mc_error(est, exact)


@pytest.mark.parametrize("act", ["relu", "erf"])
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_ntk_matches_wide_network_monte_carlo(depth, act):
    x = inputs()
    gen = torch.Generator().manual_seed(20 + depth)
    est = torch.stack([finite_net_ntk(x, depth, act, WIDTH, gen) for _ in range(10)])
    exact = network(depth, act)(x, get="ntk")
    # an empirical NTK fluctuates more than a readout covariance: 10 networks give
    # SEs up to ~2.5% of the kernel, so a 4-SE test still detects a 10% error
    assert_within_mc_error(est, exact, max_rel_se=0.03)


def test_diag_equals_full_diagonal_and_cross_diag():
    x, y = inputs(), inputs().flip(0) + 0.3
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(1.5, 0.3), Erf(), Dense(1.0, 0.0))
    for get in ("nngp", "ntk"):
        torch.testing.assert_close(kfn(x, diag=True, get=get), kfn(x, get=get).diagonal(),
                                   rtol=1e-14, atol=1e-14)
        torch.testing.assert_close(kfn(x, y, diag=True, get=get),
                                   kfn(x, y, get=get).diagonal(), rtol=1e-14, atol=1e-14)


def test_relu_one_layer_closed_form():
    # Cho & Saul arc-cosine kernel of order 1, written out independently.
    x = inputs()
    K0 = BIAS_VAR + WEIGHT_VAR * x @ x.T / 3
    d = K0.diagonal()
    cos = (K0 / (d[:, None] * d[None, :]).sqrt()).clamp(-1, 1)
    th = torch.acos(cos)
    ref = BIAS_VAR + WEIGHT_VAR * (d[:, None] * d[None, :]).sqrt() / (2 * math.pi) * (
        torch.sin(th) + (math.pi - th) * cos)
    torch.testing.assert_close(network(1, "relu")(x), ref, rtol=1e-10, atol=1e-10)


def test_gradients_finite_at_coincident_points():
    x = inputs().requires_grad_()
    w = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    kfn = serial(Dense(w, 0.1), Relu(), Dense(w, 0.1), Relu(), Dense(1.0, 0.0))
    K, T = kfn(x, get=("nngp", "ntk"))
    (K.sum() + T.sum()).backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad)
    # d/dw against central finite differences of the full kernel sum
    eps = 1e-6
    f = lambda v: sum(k.sum() for k in serial(Dense(v, 0.1), Relu(), Dense(v, 0.1), Relu(),
                                              Dense(1.0, 0.0))(x.detach(), get=("nngp", "ntk")))
    fd = (f(1.3 + eps) - f(1.3 - eps)) / (2 * eps)
    torch.testing.assert_close(w.grad, fd, rtol=1e-6, atol=1e-8)


def test_batched_hyperparameters_match_loop():
    x = inputs()
    w = torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64)
    batched = serial(Dense(w, 0.1), Relu(), Dense(w, 0.2))(x.expand(3, 4, 3))
    for i in range(3):
        single = serial(Dense(float(w[i]), 0.1), Relu(), Dense(float(w[i]), 0.2))(x)
        torch.testing.assert_close(batched[i], single, rtol=1e-14, atol=1e-14)


@pytest.mark.parametrize(
    "call, err, match",
    [
        (lambda k: k(torch.ones(3, dtype=torch.float64)), ValueError, "x1 must have at least 2"),
        (lambda k: k(torch.ones(3, 2, dtype=torch.float64), torch.ones(3, 4, dtype=torch.float64)),
         ValueError, "same number of features"),
        (lambda k: k(torch.tensor([[float("nan"), 1.0]])), ValueError, "x1 contains"),
        (lambda k: k(torch.ones(3, 2), torch.tensor([[float("inf"), 1.0]])), ValueError,
         "x2 contains"),
        (lambda k: k(torch.ones(3, 2, dtype=torch.int64)), TypeError, "x1 must be a floating"),
        (lambda k: k(torch.ones(3, 2), get="gradient"), ValueError, "get must be"),
    ],
)
def test_bad_inputs(call, err, match):
    with pytest.raises(err, match=match):
        call(serial(Dense(1.0, 0.0), Relu(), Dense(1.0, 0.0)))


@pytest.mark.parametrize(
    "make, err, match",
    [
        (lambda: Dense(-1.0, 0.0), ValueError, "weight_var must be positive"),
        (lambda: Dense(1.0, -0.1), ValueError, "bias_var must be non-negative"),
        (lambda: Dense(torch.tensor([1.0, -2.0]), 0.0), ValueError, "weight_var"),
        (lambda: Dense("1", 0.0), TypeError, "weight_var"),
        (lambda: serial(Dense(), "relu"), TypeError, "layer 1"),
    ],
)
def test_bad_layers(make, err, match):
    with pytest.raises(err, match=match):
        make()
