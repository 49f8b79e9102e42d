r"""NNGP kernels of 1-D convolutional networks (the infinite-channel limit).

A network on sequences ``x`` of shape ``(C, L)`` (channels, positions) built from

* :class:`Conv1d` ``(q, w, b)``: ``f'_c(s) = sum_{a, c'} W_{c c' a} f_{c'}(s + a - q//2)
  / sqrt(q C) + b_c``, zero ("same") padding, ``W ~ N(0, w)``, ``b ~ N(0, b)``;
* :class:`ConvRelu` / :class:`ConvErf`: the activation at every position;
* :class:`AvgPool1d` ``(p)``: the mean of non-overlapping windows of ``p`` positions;
* :class:`GlobalAvgPool`: the mean over positions, ending the spatial part;
* :class:`~pyro_dkm.kernels.nngp.Dense` layers after it,

has, as the channel counts grow, Gaussian-process outputs whose covariance is computed
here by propagating the covariance between every pair of positions,
:math:`K_{xz}(s, s')` ``(N1, N2, L, L)``, with the self-covariances of each input (the
activations need them):

.. math::
    \mathrm{Conv:}\ K'(s,s') = \frac{w}{q}\sum_{a} K(s+a, s'+a) + b,\qquad
    \mathrm{Pool:}\ K'(t,t') = \frac{1}{p^2}\sum_{a,a'<p} K(pt+a, pt'+a'),\qquad
    \mathrm{GAP:}\ k = \frac{1}{L^2}\sum_{s,s'} K(s, s').

(Without pooling, a convolutional NNGP only couples positions ``s, s'`` at equal offsets,
and the global average of the diagonal-shifted sums is what distinguishes it from a fully
connected kernel on the flattened input.) Use :func:`conv_serial`, e.g.
``conv_serial(Conv1d(5, 2.0, 0.1), ConvRelu(), AvgPool1d(2), Conv1d(3, 2.0, 0.1), ConvRelu(),
GlobalAvgPool(), Dense(1.0, 0.0))``; it follows the kernel protocol ``k(X, Z=None,
diag=False)`` with ``X`` ``(N, C, L)``. Cost ``O(N1 N2 L^2 q)`` per layer.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..linalg import check_tensor
from ._closed_forms import erf_expectations, relu_expectations
from .nngp import Dense, _as_variance

__all__ = ["Conv1d", "ConvRelu", "ConvErf", "AvgPool1d", "GlobalAvgPool", "ConvNNGPKernelFn",
           "conv_serial"]


class _SpatialLayer:
    """A layer acting on ``(cross (N1, N2, L, L), self1 (N1, L, L), self2 (N2, L, L))``."""

    def spatial(self, K: Tensor) -> Tensor:  # pragma: no cover - interface
        raise NotImplementedError


class Conv1d(_SpatialLayer):
    """Convolution of odd filter width ``q``, weight variance ``w`` (per input channel and
    filter tap), bias variance ``b``, zero "same" padding."""

    def __init__(self, q: int, weight_var=1.0, bias_var=0.0):
        if not isinstance(q, int) or isinstance(q, bool) or q < 1 or q % 2 == 0:
            raise ValueError(f"q (the filter width) must be a positive odd int, got {q!r}")
        self.q = q
        self.weight_var = _as_variance(weight_var, "weight_var", allow_zero=False)
        self.bias_var = _as_variance(bias_var, "bias_var", allow_zero=True)

    def spatial(self, K: Tensor) -> Tensor:
        h, L = self.q // 2, K.shape[-1]
        Kp = torch.nn.functional.pad(K, (h, h, h, h))  # zero padding on both position axes
        acc = sum(Kp[..., a:a + L, a:a + L] for a in range(self.q))
        w, b = (torch.as_tensor(v, dtype=K.dtype, device=K.device)
                for v in (self.weight_var, self.bias_var))
        return w / self.q * acc + b


class _ConvActivation(_SpatialLayer):
    expectations = None

    def apply3(self, cross, s1, s2):
        d1 = s1.diagonal(dim1=-2, dim2=-1)  # (N1, L) variances at each position
        d2 = s2.diagonal(dim1=-2, dim2=-1)
        new_cross = type(self).expectations(cross, d1[:, None, :, None], d2[None, :, None, :])[0]
        new_s1 = type(self).expectations(s1, d1[:, :, None], d1[:, None, :])[0]
        new_s2 = type(self).expectations(s2, d2[:, :, None], d2[:, None, :])[0]
        return new_cross, new_s1, new_s2


class ConvRelu(_ConvActivation):
    """ReLU at every position (arc-cosine expectations)."""

    expectations = staticmethod(relu_expectations)


class ConvErf(_ConvActivation):
    """Erf at every position (Williams' expectations)."""

    expectations = staticmethod(erf_expectations)


class AvgPool1d(_SpatialLayer):
    """Mean over non-overlapping windows of ``p`` positions (``L`` divisible by ``p``)."""

    def __init__(self, p: int):
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"p (the pooling window) must be a positive int, got {p!r}")
        self.p = p

    def spatial(self, K: Tensor) -> Tensor:
        L = K.shape[-1]
        if L % self.p:
            raise ValueError(f"AvgPool1d({self.p}) needs a length divisible by {self.p}, got {L}")
        T = L // self.p
        return K.reshape(*K.shape[:-2], T, self.p, T, self.p).mean((-3, -1))


class GlobalAvgPool:
    """Mean over positions: ends the spatial part (then :class:`Dense` layers)."""


class ConvNNGPKernelFn:
    """The NNGP kernel of a 1-D convolutional network (see the module docstring)."""

    def __init__(self, layers):
        layers = list(layers)
        gap = [i for i, layer in enumerate(layers) if isinstance(layer, GlobalAvgPool)]
        if len(gap) != 1:
            raise ValueError("a convolutional NNGP needs exactly one GlobalAvgPool() between "
                             "the spatial layers and the Dense head")
        self.spatial = layers[:gap[0]]
        self.head = layers[gap[0] + 1:]
        for layer in self.spatial:
            if not isinstance(layer, _SpatialLayer):
                raise TypeError(f"before GlobalAvgPool only Conv1d, ConvRelu, ConvErf and "
                                f"AvgPool1d are allowed, got {type(layer).__name__}")
        for layer in self.head:
            if not isinstance(layer, Dense):
                raise TypeError(f"after GlobalAvgPool only Dense layers are allowed, got "
                                f"{type(layer).__name__}")

    def __call__(self, X: Tensor, Z: Tensor | None = None, diag: bool = False) -> Tensor:
        check_tensor(X, "X", ndim=3)
        if Z is not None:
            check_tensor(Z, "Z", ndim=3)
            if Z.shape[1:] != X.shape[1:]:
                raise ValueError(f"Z must have X's (channels, length) {tuple(X.shape[1:])}, "
                                 f"got {tuple(Z.shape[1:])}")
        C = X.shape[1]
        if diag:  # only the self-covariances are needed
            s = torch.einsum("ncs,nct->nst", X, X) / C
            for layer in self.spatial:
                s = layer.apply3(s[:, None], s, s)[1] if isinstance(
                    layer, _ConvActivation) else layer.spatial(s)
            k = s.mean((-2, -1))
            return self._head(k, k, k)[0]
        Zs = X if Z is None else Z
        cross = torch.einsum("ncs,mct->nmst", X, Zs) / C
        s1 = torch.einsum("ncs,nct->nst", X, X) / C
        s2 = s1 if Z is None else torch.einsum("ncs,nct->nst", Zs, Zs) / C
        for layer in self.spatial:
            if isinstance(layer, _ConvActivation):
                cross, s1, s2 = layer.apply3(cross, s1, s2)
            else:
                cross, s1, s2 = layer.spatial(cross), layer.spatial(s1), layer.spatial(s2)
        k = cross.mean((-2, -1))
        k11, k22 = s1.mean((-2, -1)), s2.mean((-2, -1))
        return self._head(k, k11[:, None], k22[None, :])[0]

    def _head(self, k, k11, k22):
        """Dense layers (with the activations between them folded in by the caller's
        network: this head is linear, Dense only)."""
        for layer in self.head:
            w, b = (torch.as_tensor(v, dtype=k.dtype, device=k.device)
                    for v in (layer.weight_var, layer.bias_var))
            k, k11, k22 = w * k + b, w * k11 + b, w * k22 + b
        return k, k11, k22


def conv_serial(*layers) -> ConvNNGPKernelFn:
    """Compose convolutional NNGP layers (see the module docstring)."""
    return ConvNNGPKernelFn(layers)
