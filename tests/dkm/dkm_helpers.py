"""Shared helpers of the DKM tests."""

import torch

from pyro_dkm.kernels import Dense, Relu, serial


def toy_regression(n=30, d=3, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=dtype)
    y = torch.sin(2 * X[:, 0]) + 0.5 * X[:, 1] * X[:, 2] + 0.1 * torch.randn(n, generator=g,
                                                                              dtype=dtype)
    return X, y


@torch.no_grad()
def perturb_grams(model, scale=0.2, seed=1):
    """Move every learned Gram away from the NNGP initial value (random, reproducible)."""
    g = torch.Generator().manual_seed(seed)
    for layer in model.gram_layers:
        off = layer.gram_tril_offdiag
        off.add_(scale * torch.randn(off.shape, generator=g, dtype=off.dtype).tril(-1))
        layer.gram_log_diag.add_(scale * torch.randn(layer.gram_log_diag.shape, generator=g,
                                                     dtype=off.dtype))


def relu_nngp(depth):
    """The input-space NNGP of a DKM with ``depth`` Gram layers and ReLU kernels: its kernel
    layers are ReluGram(variance=2) = 2 E[relu relu] on G_0 = X X^T / d, i.e.
    serial(Relu, Dense(2), ...) with depth + 1 ReLU layers."""
    layers = []
    for _ in range(depth + 1):
        layers += [Relu(), Dense(weight_var=2.0, bias_var=0.0)]
    return serial(*layers)
