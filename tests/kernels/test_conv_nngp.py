"""Convolutional NNGP kernels vs the empirical kernel of wide finite conv nets."""

import math

import pytest
import torch

from pyro_dkm.kernels import Dense, Erf, Relu, serial
from pyro_dkm.kernels.conv import (
    AvgPool1d,
    AvgPool2d,
    Conv1d,
    Conv2d,
    ConvErf,
    ConvRelu,
    GlobalAvgPool,
    conv_serial,
)

D = torch.float64


def _finite_net(X, width, seed, act, q1=5, q2=3, w=2.0, b=0.1, pool=2):
    """Last-layer empirical kernel of one random conv net (NNGP parameterisation)."""
    g = torch.Generator().manual_seed(seed)
    F = torch.nn.functional

    def conv(h, q):
        c_in = h.shape[1]
        W = torch.randn(width, c_in, q, generator=g, dtype=D) * math.sqrt(w / (q * c_in))
        bias = torch.randn(width, generator=g, dtype=D) * math.sqrt(b)
        return F.conv1d(h, W, bias, padding=q // 2)

    h = act(conv(X, q1))
    if pool > 1:
        h = F.avg_pool1d(h, pool)
    h = act(conv(h, q2))
    feat = h.mean(-1)  # global average pooling: (N, width)
    return 1.5 * feat @ feat.T / width + 0.2  # Dense(1.5, 0.2) readout's kernel


@pytest.mark.parametrize("act_name", ["relu", "erf"])
@pytest.mark.parametrize("pool", [1, 2])
def test_conv_nngp_is_the_wide_conv_net_kernel(act_name, pool):
    # 6 networks of 2000 channels: the empirical last-layer kernel concentrates at the NNGP
    # (measured relative error 0.6%, ReLU); tolerance 3% of the largest entry. The fully
    # connected NNGP of the flattened input is far from it (~90%): the test can tell.
    g = torch.Generator().manual_seed(0)
    X = torch.randn(4, 2, 8, generator=g, dtype=D)
    X[3] = X[0].roll(1, -1)  # a shifted copy: the conv kernel sees the shared structure
    act_fn = torch.relu if act_name == "relu" else torch.erf
    layer = ConvRelu() if act_name == "relu" else ConvErf()
    layers = [Conv1d(5, 2.0, 0.1), layer] + ([AvgPool1d(pool)] if pool > 1 else []) + [
        Conv1d(3, 2.0, 0.1), ConvRelu() if act_name == "relu" else ConvErf(), GlobalAvgPool(),
        Dense(1.5, 0.2)]
    kfn = conv_serial(*layers)
    K = kfn(X)
    emp = sum(_finite_net(X, 2000, s, act_fn, pool=pool) for s in range(6)) / 6
    err = float((K - emp).abs().max() / K.abs().max())
    assert err < 0.03, (err, K, emp)
    acts = [Relu() if act_name == "relu" else Erf()]
    fc = serial(Dense(2.0, 0.1), *acts, Dense(2.0, 0.1), *acts, Dense(1.5, 0.2))(X.reshape(4, -1))
    assert float((fc - emp).abs().max() / K.abs().max()) > 0.1
    # the protocol: cross-covariances and the diagonal agree with the full matrix
    torch.testing.assert_close(kfn(X[:2], X[2:]), K[:2, 2:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(kfn(X, diag=True), K.diagonal(), rtol=1e-12, atol=1e-12)


def test_conv_nngp_bad_layers_and_inputs():
    with pytest.raises(ValueError, match="exactly one GlobalAvgPool"):
        conv_serial(Conv1d(3), ConvRelu(), Dense())
    with pytest.raises(TypeError, match="after GlobalAvgPool only fully connected"):
        conv_serial(Conv1d(3), GlobalAvgPool(), ConvRelu())
    with pytest.raises(ValueError, match="positive odd int"):
        Conv1d(4)
    k = conv_serial(Conv1d(3), ConvRelu(), AvgPool1d(3), GlobalAvgPool(), Dense())
    with pytest.raises(ValueError, match="divisible by 3"):
        k(torch.randn(2, 1, 8, dtype=D))
    with pytest.raises(ValueError, match="3 dimension"):
        k(torch.randn(2, 8, dtype=D))


def _ntk_net(X, width, seed, pool=2, w=2.0, b=0.1, wh=1.5, bh=0.2):
    """A random 1-D ReLU conv net in NTK parameterisation and its empirical NTK."""
    g = torch.Generator().manual_seed(seed)
    F = torch.nn.functional
    C = X.shape[1]
    params = [torch.randn(width, C, 5, generator=g, dtype=D), torch.randn(width, generator=g,
                                                                          dtype=D),
              torch.randn(width, width, 3, generator=g, dtype=D),
              torch.randn(width, generator=g, dtype=D),
              torch.randn(width, generator=g, dtype=D), torch.randn((), dtype=D)]
    for p in params:
        p.requires_grad_(True)
    W1, b1, W2, b2, v, c = params

    def f(x):
        h = F.conv1d(x, W1 * math.sqrt(w / (5 * C)), b1 * math.sqrt(b), padding=2)
        h = F.avg_pool1d(torch.relu(h), pool)
        h = F.conv1d(h, W2 * math.sqrt(w / (3 * width)), b2 * math.sqrt(b), padding=1)
        feat = torch.relu(h).mean(-1)
        return feat @ v * math.sqrt(wh / width) + c * math.sqrt(bh)

    J = []
    for n in range(X.shape[0]):
        grads = torch.autograd.grad(f(X[n:n + 1])[0], params)
        J.append(torch.cat([gr.reshape(-1) for gr in grads]))
    J = torch.stack(J)
    return J @ J.T


def test_conv_ntk_is_the_wide_conv_net_ntk():
    # 12 networks of 1000 channels: the empirical NTK of a ReLU conv net (conv 5, ReLU,
    # pool 2, conv 3, ReLU, global average pool, dense) in NTK parameterisation, every
    # entry within 4 standard errors of the conv NTK; the NNGP of the same net is far away
    g = torch.Generator().manual_seed(1)
    X = torch.randn(4, 2, 8, generator=g, dtype=D)
    kfn = conv_serial(Conv1d(5, 2.0, 0.1), ConvRelu(), AvgPool1d(2), Conv1d(3, 2.0, 0.1),
                      ConvRelu(), GlobalAvgPool(), Dense(1.5, 0.2))
    K, T = kfn(X, get=("nngp", "ntk"))
    E = torch.stack([_ntk_net(X, 1000, s) for s in range(12)])
    se = E.std(0) / math.sqrt(E.shape[0])
    assert float(se.max() / T.abs().max()) < 0.03  # it can tell a 10% error
    assert bool(((E.mean(0) - T).abs() < 4 * se).all()), (E.mean(0) - T) / se
    assert float(((K - E.mean(0)).abs() / se).max()) > 10
    # the protocol for the NTK too: cross blocks and the diagonal
    torch.testing.assert_close(kfn(X[:2], X[2:], get="ntk"), T[:2, 2:], rtol=1e-12, atol=1e-12)
    # (the NTK's dot term is (pi - theta) / 2 pi, theta = arccos of a cosine near 1 on the
    # diagonal: sqrt-sensitive there, so the two paths' last-bit differences in the
    # covariance show at ~sqrt(eps) ~ 1e-8, not at eps)
    torch.testing.assert_close(kfn(X, get="ntk", diag=True), T.diagonal(), rtol=1e-8,
                               atol=1e-12)


def test_conv2d_nngp_is_the_wide_conv_net_kernel():
    # Monte Carlo over 16 random 2-D ReLU conv nets of 1000 channels: every entry of the
    # conv NNGP within 4 standard errors of the nets' mean kernel (the errors are common
    # to all entries of one net: measured bias -2% at 1.6% s.e., the same at 300 channels)
    g = torch.Generator().manual_seed(2)
    X = torch.randn(3, 2, 4, 4, generator=g, dtype=D)
    F = torch.nn.functional
    width, ests = 1000, []
    for s in range(16):
        gs = torch.Generator().manual_seed(10 + s)
        W1 = torch.randn(width, 2, 3, 3, generator=gs, dtype=D) * math.sqrt(2.0 / 18)
        W2 = torch.randn(width, width, 3, 3, generator=gs, dtype=D) * math.sqrt(
            2.0 / (9 * width))
        h = F.avg_pool2d(torch.relu(F.conv2d(X, W1, padding=1)), 2)
        feat = torch.relu(F.conv2d(h, W2, padding=1)).mean((-2, -1))
        ests.append(feat @ feat.T / width)
    E = torch.stack(ests)
    se = E.std(0) / math.sqrt(len(ests))
    kfn = conv_serial(Conv2d(3, 2.0), ConvRelu(), AvgPool2d(2), Conv2d(3, 2.0), ConvRelu(),
                      GlobalAvgPool(), Dense(1.0, 0.0))
    K = kfn(X)
    assert float((se / K).max()) < 0.03  # the comparison can tell a 10% error
    assert bool(((E.mean(0) - K).abs() < 4 * se).all()), ((E.mean(0) - K) / se)
    torch.testing.assert_close(kfn(X, diag=True), K.diagonal(), rtol=1e-12, atol=1e-12)
    # a 1-D kernel of the flattened rows is a different kernel
    k1 = conv_serial(Conv1d(3, 2.0), ConvRelu(), AvgPool1d(2), Conv1d(3, 2.0), ConvRelu(),
                     GlobalAvgPool(), Dense(1.0, 0.0))(X.flatten(2))
    assert float(((k1 - K).abs() / se).max()) > 10


def test_serial_hands_conv_networks_to_conv_serial_and_takes_a_nonlinear_head():
    X = torch.randn(5, 1, 6, generator=torch.Generator().manual_seed(0), dtype=D)
    a = serial(Conv1d(3, 2.0, 0.1), ConvRelu(), GlobalAvgPool(), Dense(2.0, 0.1), Relu(),
               Dense(1.0, 0.0))
    # the head is the fully connected kernel applied to the pooled covariances
    k = conv_serial(Conv1d(3, 2.0, 0.1), ConvRelu(), GlobalAvgPool(), Dense(2.0, 0.1))(X)
    d = k.diagonal()
    from pyro_dkm.kernels._closed_forms import relu_expectations

    ref = relu_expectations(k, d[:, None], d[None, :])[0]
    torch.testing.assert_close(a(X), ref, rtol=1e-6, atol=1e-12)
    torch.testing.assert_close(a(X, diag=True), a(X).diagonal(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="mix 1-D and 2-D"):
        conv_serial(Conv1d(3), ConvRelu(), AvgPool2d(2), GlobalAvgPool(), Dense())
    with pytest.raises(ValueError, match="4 dimension"):
        conv_serial(Conv2d(3), ConvRelu(), GlobalAvgPool(), Dense())(X)
