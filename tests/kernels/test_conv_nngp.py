"""Convolutional NNGP kernels vs the empirical kernel of wide finite conv nets."""

import math

import pytest
import torch

from pyro_dkm.kernels import Dense, Erf, Relu, serial
from pyro_dkm.kernels.conv import (
    AvgPool1d,
    Conv1d,
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
    with pytest.raises(TypeError, match="after GlobalAvgPool only Dense"):
        conv_serial(Conv1d(3), GlobalAvgPool(), ConvRelu())
    with pytest.raises(ValueError, match="positive odd int"):
        Conv1d(4)
    k = conv_serial(Conv1d(3), ConvRelu(), AvgPool1d(3), GlobalAvgPool(), Dense())
    with pytest.raises(ValueError, match="divisible by 3"):
        k(torch.randn(2, 1, 8, dtype=D))
    with pytest.raises(ValueError, match="3 dimension"):
        k(torch.randn(2, 8, dtype=D))
