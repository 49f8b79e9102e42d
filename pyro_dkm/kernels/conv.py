r"""NNGP and NTK kernels of convolutional networks (the infinite-channel limit), 1-D and 2-D.

A network on sequences ``x`` of shape ``(C, L)`` (channels, positions), or images
``(C, H, W)`` (:class:`Conv2d`, :class:`AvgPool2d`: positions ``H W``), built from

* :class:`Conv1d` ``(q, w, b)``: ``f'_c(s) = sum_{a, c'} W_{c c' a} f_{c'}(s + a - q//2)
  / sqrt(q C) + b_c``, zero ("same") padding, ``W ~ N(0, w)``, ``b ~ N(0, b)``;
* :class:`ConvRelu` / :class:`ConvErf`: the activation at every position;
* :class:`AvgPool1d` ``(p)``: the mean of non-overlapping windows of ``p`` positions;
* :class:`GlobalAvgPool`: the mean over positions, ending the spatial part;
* :class:`~pyro_dkm.kernels.nngp.Dense` (and ``Relu`` / ``Erf``) layers after it,

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
connected kernel on the flattened input.) The NTK follows the same recursion (Arora et al.
2019, the CNTK): an activation multiplies it by :math:`\dot K = E[\phi'(u)\phi'(v)]`, a
convolution maps it like the covariance and adds the new covariance, pooling and the head
as for fully connected layers.
Use :func:`conv_serial` (or :func:`~pyro_dkm.kernels.nngp.serial`, which hands networks
with convolutional layers to it), e.g.
``conv_serial(Conv1d(5, 2.0, 0.1), ConvRelu(), AvgPool1d(2), Conv1d(3, 2.0, 0.1), ConvRelu(),
GlobalAvgPool(), Dense(1.0, 0.0))``; it follows the kernel protocol
``k(X, Z=None, *, get="nngp", diag=False)`` (``get="ntk"`` or ``("nngp", "ntk")`` as for
fully connected kernels) with ``X`` ``(N, C, L)`` or ``(N, C, H, W)``. Cost
``O(N1 N2 L^2 q^D)`` per layer.
"""

from __future__ import annotations

import itertools
import math

import torch
from torch import Tensor

from ..linalg import check_tensor
from ._closed_forms import erf_expectations, relu_expectations
from .nngp import KernelState, Layer, _as_variance

__all__ = ["Conv1d", "Conv2d", "ConvRelu", "ConvErf", "AvgPool1d", "AvgPool2d",
           "GlobalAvgPool", "ConvNNGPKernelFn", "conv_serial", "shift_sum"]


def shift_sum(K: Tensor, shape: tuple, q: int) -> Tensor:
    """``sum_a K(s + a - h, s' + a - h)`` over the ``q^D`` filter taps ``a`` (``h = q // 2``,
    zero padding) of position-pair covariances ``K`` ``(..., L, L)``, ``L = prod(shape)``:
    the covariance map of a convolution (without its ``w / q^D`` factor and bias)."""
    lead, D, h = K.shape[:-2], len(shape), q // 2
    T = K.reshape(*lead, *shape, *shape)
    Tp = torch.nn.functional.pad(T, (h, h) * (2 * D))
    acc = 0
    n_lead = len(lead)
    for a in itertools.product(range(q), repeat=D):
        sl = tuple(slice(o, o + n) for o, n in zip(a, shape))
        acc = acc + Tp[(slice(None),) * n_lead + sl + sl]
    L = math.prod(shape)
    return acc.reshape(*lead, L, L)


def pool_pairs(K: Tensor, shape: tuple, p: int) -> tuple[Tensor, tuple]:
    """Average pooling over non-overlapping windows of ``p`` (per spatial dimension) on
    both position axes of ``K`` ``(..., L, L)``; returns the pooled ``K`` and shape."""
    if any(n % p for n in shape):
        raise ValueError(f"average pooling by {p} needs spatial sizes divisible by {p}, got "
                         f"{tuple(shape)}")
    new = tuple(n // p for n in shape)
    lead, D = K.shape[:-2], len(shape)
    split = sum(((n, p) for n in new), ())
    win = tuple(len(lead) + 1 + 2 * i for i in range(D))
    out = K.reshape(*lead, *split, *split).mean(win + tuple(w + 2 * D for w in win))
    L = math.prod(new)
    return out.reshape(*lead, L, L), new


class _SpatialLayer:
    """A layer acting on the position-pair state (see :class:`ConvNNGPKernelFn`)."""

    ndim: int | None = None  # spatial dimensions it accepts (None: any)


class _Conv(_SpatialLayer):
    def __init__(self, q: int, weight_var=1.0, bias_var=0.0):
        if not isinstance(q, int) or isinstance(q, bool) or q < 1 or q % 2 == 0:
            raise ValueError(f"q (the filter width) must be a positive odd int, got {q!r}")
        self.q = q
        self.weight_var = _as_variance(weight_var, "weight_var", allow_zero=False)
        self.bias_var = _as_variance(bias_var, "bias_var", allow_zero=True)

    def spatial(self, K: Tensor, shape: tuple) -> Tensor:
        w, b = (torch.as_tensor(v, dtype=K.dtype, device=K.device)
                for v in (self.weight_var, self.bias_var))
        return w / self.q ** len(shape) * shift_sum(K, shape, self.q) + b

    def ntk(self, ntk: Tensor, new_cov: Tensor, shape: tuple) -> Tensor:
        w = torch.as_tensor(self.weight_var, dtype=ntk.dtype, device=ntk.device)
        return w / self.q ** len(shape) * shift_sum(ntk, shape, self.q) + new_cov

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.q}, {self.weight_var}, {self.bias_var})"


class Conv1d(_Conv):
    """Convolution of odd filter width ``q``, weight variance ``w`` (per input channel and
    filter tap), bias variance ``b``, zero "same" padding (sequences)."""

    ndim = 1


class Conv2d(_Conv):
    """``q x q`` convolution (odd ``q``) of images, weight variance ``w`` per input channel
    and tap (``w / (q^2 C)`` per weight), bias variance ``b``, zero "same" padding."""

    ndim = 2


class _ConvActivation(_SpatialLayer):
    expectations = None

    def apply3(self, cross, s1, s2):
        d1 = s1.diagonal(dim1=-2, dim2=-1)  # (N1, L) variances at each position
        d2 = s2.diagonal(dim1=-2, dim2=-1)
        new_cross, dot = type(self).expectations(cross, d1[:, None, :, None],
                                                 d2[None, :, None, :])
        new_s1 = type(self).expectations(s1, d1[:, :, None], d1[:, None, :])[0]
        new_s2 = type(self).expectations(s2, d2[:, :, None], d2[:, None, :])[0]
        return new_cross, new_s1, new_s2, dot

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class ConvRelu(_ConvActivation):
    """ReLU at every position (arc-cosine expectations)."""

    expectations = staticmethod(relu_expectations)


class ConvErf(_ConvActivation):
    """Erf at every position (Williams' expectations)."""

    expectations = staticmethod(erf_expectations)


class _AvgPool(_SpatialLayer):
    def __init__(self, p: int):
        if not isinstance(p, int) or isinstance(p, bool) or p < 1:
            raise ValueError(f"p (the pooling window) must be a positive int, got {p!r}")
        self.p = p

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.p})"


class AvgPool1d(_AvgPool):
    """Mean over non-overlapping windows of ``p`` positions (``L`` divisible by ``p``)."""

    ndim = 1


class AvgPool2d(_AvgPool):
    """Mean over non-overlapping ``p x p`` windows (``H`` and ``W`` divisible by ``p``)."""

    ndim = 2


class GlobalAvgPool:
    """Mean over positions: ends the spatial part (then the fully connected head)."""

    def __repr__(self) -> str:
        return "GlobalAvgPool()"


class ConvNNGPKernelFn:
    """The NNGP / NTK kernel function of a convolutional network (see the module
    docstring); build it with :func:`conv_serial` or :func:`~pyro_dkm.kernels.nngp.serial`.

    Call as ``kernel_fn(X, Z=None, *, get="nngp", diag=False)`` with ``X`` ``(N1, C, L)``
    or ``(N1, C, H, W)``, ``Z`` of the same channels and spatial shape; returns
    ``(N1, N2)`` (``(N1,)`` with ``diag``; ``get`` as for
    :class:`~pyro_dkm.kernels.nngp.NNGPKernelFn`)."""

    def __init__(self, layers):
        layers = list(layers)
        gap = [i for i, layer in enumerate(layers) if isinstance(layer, GlobalAvgPool)]
        if len(gap) != 1:
            raise ValueError("a convolutional NNGP needs exactly one GlobalAvgPool() between "
                             "the spatial layers and the fully connected head")
        self.spatial = layers[:gap[0]]
        self.head = layers[gap[0] + 1:]
        for layer in self.spatial:
            if not isinstance(layer, _SpatialLayer):
                raise TypeError(f"before GlobalAvgPool only Conv1d/Conv2d, ConvRelu, ConvErf "
                                f"and AvgPool1d/AvgPool2d are allowed, got "
                                f"{type(layer).__name__}")
        for layer in self.head:
            if not isinstance(layer, Layer):
                raise TypeError(f"after GlobalAvgPool only fully connected layers (Dense, "
                                f"Relu, Erf) are allowed, got {type(layer).__name__}")
        dims = {layer.ndim for layer in self.spatial if layer.ndim is not None}
        if len(dims) > 1:
            raise ValueError("the spatial layers mix 1-D and 2-D convolutions / pooling")
        self.ndim = dims.pop() if dims else None

    def __repr__(self) -> str:
        return "conv_serial(" + ", ".join(map(repr, self.spatial + [GlobalAvgPool()]
                                              + self.head)) + ")"

    def _check(self, X: Tensor, name: str) -> None:
        if self.ndim is None:
            check_tensor(X, name, min_ndim=3)
            if X.dim() > 4:
                raise ValueError(f"{name} must be (N, C, L) or (N, C, H, W), got shape "
                                 f"{tuple(X.shape)}")
        else:
            check_tensor(X, name, ndim=self.ndim + 2)

    def __call__(self, X: Tensor, Z: Tensor | None = None, *, get="nngp", diag: bool = False):
        names = (get,) if isinstance(get, str) else tuple(get)
        for g in names:
            if g not in ("nngp", "ntk"):
                raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
        want_ntk = "ntk" in names
        self._check(X, "X")
        if Z is not None:
            self._check(Z, "Z")
            if Z.shape[1:] != X.shape[1:]:
                raise ValueError(f"Z must have X's (channels, spatial shape) "
                                 f"{tuple(X.shape[1:])}, got {tuple(Z.shape[1:])}")
        C, shape = X.shape[1], tuple(X.shape[2:])
        Xf = X.reshape(X.shape[0], C, -1)
        if diag:  # only the self-covariances are needed
            s = torch.einsum("ncs,nct->nst", Xf, Xf) / C
            nt = torch.zeros_like(s) if want_ntk else None
            for layer in self.spatial:
                if isinstance(layer, _ConvActivation):
                    d = s.diagonal(dim1=-2, dim2=-1)
                    s, dot = layer.expectations(s, d[:, :, None], d[:, None, :])
                    nt = None if nt is None else nt * dot
                elif isinstance(layer, _Conv):
                    s = layer.spatial(s, shape)
                    nt = None if nt is None else layer.ntk(nt, s, shape)
                else:
                    s, new = pool_pairs(s, shape, layer.p)
                    nt = None if nt is None else pool_pairs(nt, shape, layer.p)[0]
                    shape = new
            k = s.mean((-2, -1))
            state = KernelState(cov=k, var1=k, var2=k,
                                ntk=None if nt is None else nt.mean((-2, -1)), diag=True,
                                coincident=True)
        else:
            Zf = Xf if Z is None else Z.reshape(Z.shape[0], C, -1)
            cross = torch.einsum("ncs,mct->nmst", Xf, Zf) / C
            s1 = torch.einsum("ncs,nct->nst", Xf, Xf) / C
            s2 = s1 if Z is None else torch.einsum("ncs,nct->nst", Zf, Zf) / C
            nt = torch.zeros_like(cross) if want_ntk else None
            for layer in self.spatial:
                if isinstance(layer, _ConvActivation):
                    cross, s1, s2, dot = layer.apply3(cross, s1, s2)
                    nt = None if nt is None else nt * dot
                elif isinstance(layer, _Conv):
                    cross, s1, s2 = (layer.spatial(t, shape) for t in (cross, s1, s2))
                    nt = None if nt is None else layer.ntk(nt, cross, shape)
                else:
                    (cross, new), (s1, _), (s2, _) = (pool_pairs(t, shape, layer.p)
                                                      for t in (cross, s1, s2))
                    nt = None if nt is None else pool_pairs(nt, shape, layer.p)[0]
                    shape = new
            state = KernelState(cov=cross.mean((-2, -1)), var1=s1.mean((-2, -1)),
                                var2=s2.mean((-2, -1)),
                                ntk=None if nt is None else nt.mean((-2, -1)),
                                symmetric=Z is None)
        for layer in self.head:
            state = layer.apply(state)
        out = tuple(state.cov if g == "nngp" else state.ntk for g in names)
        return out[0] if isinstance(get, str) else out


def conv_serial(*layers) -> ConvNNGPKernelFn:
    """Compose convolutional NNGP / NTK layers (see the module docstring)."""
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        layers = tuple(layers[0])
    return ConvNNGPKernelFn(layers)
