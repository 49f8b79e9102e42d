r"""NNGP and NTK kernels of fully-connected networks, composed stax-style.

A network is described by composing layers::

    kernel_fn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Erf(), Dense(1.0, 0.0))
    K = kernel_fn(x1, x2)                       # NNGP, (..., n1, n2)
    K, Theta = kernel_fn(x1, x2, get=("nngp", "ntk"))
    k_diag = kernel_fn(x1, diag=True)           # (..., n1) in O(n1 d)

Conventions (NTK parameterisation, as in neural-tangents): the input enters as
:math:`K_0(x, x') = x \cdot x' / d`. ``Dense(weight_var, bias_var)`` maps
:math:`K \mapsto \sigma_b^2 + \sigma_w^2 K` and
:math:`\Theta \mapsto K_{new} + \sigma_w^2 \Theta`; an activation :math:`\phi` maps
:math:`K \mapsto E[\phi(u)\phi(v)]` and :math:`\Theta \mapsto E[\phi'(u)\phi'(v)]\,\Theta`
with :math:`(u, v) \sim \mathcal N(0, K)`.

Every layer acts elementwise on (cross covariance, variance of x, variance of
x'), so the same closed forms serve the dense path here and the KeOps path.
The closed forms live in pure functions (:func:`relu_expectations`,
:func:`erf_expectations`) that only use arithmetic, ``sqrt``, ``clamp``/``max``,
``atan2`` and ``asin``. The dense path evaluates them with the same floating-point
operations (bitwise the same values) but fewer temporaries: each activation as one
autograd node with a hand-derived backward (:mod:`pyro_dkm.kernels._fused`); calls that
need no gradient in place, in row blocks, so a full ``K(X, X')`` needs about one
``n1 x n2`` matrix of memory; large ones with gradients blocked and recomputed block by
block in the backward pass (:mod:`pyro_dkm.kernels._blocked`, docs/kernels.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Sequence

import torch
from torch import Tensor

from ..linalg import check_positive, check_tensor
from ._closed_forms import clamp_eps, erf_diag, erf_expectations, relu_diag, relu_expectations
from ._fused import broadcast_shape, erf_block_, erf_cov_dot, relu_block_, relu_cov_dot

__all__ = [
    "KernelState",
    "Layer",
    "Dense",
    "Relu",
    "Erf",
    "serial",
    "NNGPKernelFn",
    "relu_expectations",
    "erf_expectations",
    "clamp_eps",
]


# --------------------------------------------------------------------------
# Layers
# --------------------------------------------------------------------------
@dataclass
class KernelState:
    """Kernel quantities flowing through a network description.

    Attributes:
        cov: NNGP covariance, ``(..., n1, n2)``, or ``(..., n1)`` when ``diag``.
        var1: variances at ``x1``, ``(..., n1)``.
        var2: variances at ``x2``, ``(..., n2)`` (equal to ``var1`` when ``diag``).
        ntk: NTK, same shape as ``cov``, or ``None`` when it is not tracked.
        diag: whether only paired entries ``k(x1_i, x2_i)`` are tracked (shape ``(..., n)``).
        coincident: with ``diag``, whether ``x2 is x1`` (then ``cov == var1 == var2``
            and the exact on-diagonal closed forms are used).
        symmetric: full ``K(x1, x1)``; activations then write the exact
            on-diagonal closed forms onto the diagonal.
        diag_offset: with ``symmetric``, the state may be a block of rows of
            ``K(x1, x1)`` (``var1`` for those rows, ``var2`` for all points) whose first row
            is point ``diag_offset``: the diagonal then lies at that column offset.
    """

    cov: Tensor
    var1: Tensor
    var2: Tensor
    ntk: Tensor | None
    diag: bool = False
    coincident: bool = False
    symmetric: bool = False
    diag_offset: int = 0


class Layer:
    """A layer maps a :class:`KernelState` to the next one."""

    def apply(self, state: KernelState) -> KernelState:  # pragma: no cover - interface
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


def _as_variance(value, name: str, *, allow_zero: bool):
    return check_positive(value, name, allow_zero=allow_zero)


def _batch_align(value, n_trailing: int):
    if isinstance(value, Tensor) and value.dim() > 0:
        return value.reshape(value.shape + (1,) * n_trailing)
    return value


class Dense(Layer):
    r"""Fully-connected layer in NTK parameterisation,
    :math:`z = \sigma_w W x / \sqrt{n} + \sigma_b b`, :math:`W, b \sim \mathcal N(0, 1)`.

    Args:
        weight_var: :math:`\sigma_w^2 > 0`: a float, a 0-d tensor, or a tensor of shape
            ``batch_shape`` (one network per batch element, broadcast against the
            inputs' leading dimensions).
        bias_var: :math:`\sigma_b^2 \ge 0`, same forms.
    """

    def __init__(self, weight_var=1.0, bias_var=0.0):
        self.weight_var = _as_variance(weight_var, "weight_var", allow_zero=False)
        self.bias_var = _as_variance(bias_var, "bias_var", allow_zero=True)

    def apply(self, state: KernelState) -> KernelState:
        # Tensor hyper-parameters with dimensions are batch-shaped: align them with the
        # leading (batch) dimensions of the kernel, (*batch, n1, n2) or (*batch, n1).
        wv, bv = _batch_align(self.weight_var, 1), _batch_align(self.bias_var, 1)
        if state.diag:
            wm, bm = wv, bv
        else:
            wm, bm = _batch_align(self.weight_var, 2), _batch_align(self.bias_var, 2)
        var1 = bv + wv * state.var1
        var2 = var1 if state.coincident else bv + wv * state.var2
        cov = var1 if state.coincident else bm + wm * state.cov
        ntk = None if state.ntk is None else cov + wm * state.ntk
        return replace(state, cov=cov, var1=var1, var2=var2, ntk=ntk)

    def _block_(self, cov: Tensor, ntk: Tensor | None) -> None:
        """No-grad :meth:`apply` on a full-shape row block, in place (same operations)."""
        wm, bm = _batch_align(self.weight_var, 2), _batch_align(self.bias_var, 2)
        cov.mul_(wm).add_(bm)
        if ntk is not None:
            ntk.mul_(wm).add_(cov)

    def _tensors(self) -> list[Tensor]:
        return [v for v in (self.weight_var, self.bias_var) if isinstance(v, Tensor)]

    def __repr__(self) -> str:
        return f"Dense(weight_var={self.weight_var}, bias_var={self.bias_var})"


def _times(a, ntk):
    return None if ntk is None else a * ntk


class _Activation(Layer):
    fused = True  # (a class default too, for subclasses that do not call __init__)

    def __init__(self, fused: bool = True):
        if not isinstance(fused, bool):
            raise TypeError(f"fused must be a bool, got {type(fused).__name__}")
        self.fused = fused

    def __repr__(self) -> str:
        return f"{type(self).__name__}()" if self.fused else f"{type(self).__name__}(fused=False)"

    def _cross(self, k12, k11, k22):
        """``(cov, dot)`` off the diagonal (the dense path's implementation)."""
        raise NotImplementedError

    def _cross_elementwise(self, k12, k11, k22):
        """``(cov, dot)`` by the plain closed-form expressions (the reference)."""
        raise NotImplementedError

    def _block_cross_(self, k12, k11, k22, need_dot):
        """No-grad :meth:`_cross` in place on a full-shape block (``k12`` becomes ``cov``);
        returns ``dot`` when ``need_dot``."""
        raise NotImplementedError

    def _diag(self, k):
        raise NotImplementedError

    def apply(self, state: KernelState) -> KernelState:
        return self._apply_with(state, self._cross)

    def apply_elementwise(self, state: KernelState) -> KernelState:
        """:meth:`apply` through the plain elementwise closed forms (:func:`relu_expectations`,
        :func:`erf_expectations`): same values, ~10 kernel-sized temporaries; a reference."""
        return self._apply_with(state, self._cross_elementwise)

    def _apply_with(self, state: KernelState, cross) -> KernelState:
        v1, d1 = self._diag(state.var1)
        if state.coincident:
            return replace(state, cov=v1, var1=v1, var2=v1, ntk=_times(d1, state.ntk))
        v2, _ = self._diag(state.var2)
        if state.diag:  # paired entries k(x1_i, x2_i)
            cov, dot = cross(state.cov, state.var1, state.var2)
        else:
            cov, dot = cross(state.cov, state.var1[..., :, None], state.var2[..., None, :])
            if state.symmetric:
                off = state.diag_offset
                n = max(0, min(cov.shape[-2], cov.shape[-1] - off))  # entries (r, off + r)
                cov = cov.diagonal_scatter(v1[..., :n].expand(cov.shape[:-2] + (n,)), off,
                                           dim1=-2, dim2=-1)
                dot = dot.diagonal_scatter(d1[..., :n].expand(dot.shape[:-2] + (n,)), off,
                                           dim1=-2, dim2=-1)
        return replace(state, cov=cov, var1=v1, var2=v2, ntk=_times(dot, state.ntk))


class Relu(_Activation):
    """ReLU activation (arc-cosine kernel of order 1).

    Args:
        fused: with gradients, evaluate the layer as one autograd node with a
            hand-derived backward (faster, ~3 kernel-sized tensors kept instead of ~8),
            and let large kernels be recomputed blockwise in the backward pass. Under
            ``create_graph=True`` (higher derivatives) both switch to autograd of the
            elementwise closed form, which is what ``fused=False`` always does. Values
            and derivatives are the same.
    """

    def _cross(self, k12, k11, k22):
        if not self.fused:
            return relu_expectations(k12, k11, k22)
        return relu_cov_dot(k12, k11, k22)

    def _cross_elementwise(self, k12, k11, k22):
        return relu_expectations(k12, k11, k22)

    def _block_cross_(self, k12, k11, k22, need_dot):
        return relu_block_(k12, k11, k22, need_dot)

    def _diag(self, k):
        return relu_diag(k)


class Erf(_Activation):
    """Error-function activation (Williams' closed form).

    Args:
        fused: as for :class:`Relu`: one autograd node with a hand-derived backward, and
            large kernels recomputed blockwise in the backward pass (under
            ``create_graph=True``: autograd of the closed form); ``fused=False`` keeps
            plain autograd throughout. Values and derivatives are the same.
    """

    def _cross(self, k12, k11, k22):
        if not self.fused:
            return erf_expectations(k12, k11, k22)
        return erf_cov_dot(k12, k11, k22, clamp_eps(k12.dtype))

    def _cross_elementwise(self, k12, k11, k22):
        return erf_expectations(k12, k11, k22)

    def _block_cross_(self, k12, k11, k22, need_dot):
        return erf_block_(k12, k11, k22, need_dot, clamp_eps(k12.dtype))

    def _diag(self, k):
        return erf_diag(k)


_GET = ("nngp", "ntk")

#: kernels with at least this many entries are, with gradients, evaluated blocked and
#: recomputed block by block in the backward pass (below it the fused layer path is
#: faster; measured crossover between 1e3^2 and 3e3^2 on one core)
CHECKPOINT_MIN_ENTRIES = 2000 * 2000


class NNGPKernelFn:
    """The kernel function of a network description; build it with :func:`serial`.

    Call as ``kernel_fn(x1, x2=None, *, get="nngp", diag=False)``:

    Args:
        x1: ``(..., n1, d)`` inputs (floating point, finite).
        x2: ``(..., n2, d)`` inputs, default ``x1``. Batch dimensions broadcast.
        get: ``"nngp"``, ``"ntk"`` or a tuple of both (then a tuple is returned).
        diag: return only ``k(x1_i, x2_i)`` (``k(x1_i, x1_i)`` without ``x2``), shape
            ``(..., n1)``, in O(n1 d).
    """

    def __init__(self, layers: Sequence[Layer]):
        layers = list(layers)
        for i, layer in enumerate(layers):
            if not isinstance(layer, Layer):
                raise TypeError(f"layer {i} must be a pyro_dkm.kernels.nngp.Layer "
                                f"(Dense, Relu, Erf, ...), got {type(layer).__name__}")
        self.layers = layers

    def __repr__(self) -> str:
        return f"serial({', '.join(map(repr, self.layers))})"

    def initial_state(self, x1: Tensor, x2: Tensor | None = None, *, diag: bool = False,
                      ntk: bool = True) -> KernelState:
        """The input-layer state :math:`K_0 = x\\cdot x'/d`, :math:`\\Theta_0 = 0`
        (the NTK is not tracked when ``ntk`` is false)."""
        x2, symmetric = _check_inputs(x1, x2)
        d = x1.shape[-1]
        var1 = x1.pow(2).sum(-1) / d

        def zeros(t):
            return torch.zeros_like(t) if ntk else None

        if diag and symmetric:
            return KernelState(cov=var1, var1=var1, var2=var1, ntk=zeros(var1),
                               diag=True, coincident=True)
        var2 = var1 if symmetric else x2.pow(2).sum(-1) / d
        if diag:
            if x2.shape[-2] != x1.shape[-2]:
                raise ValueError(f"diag=True pairs the rows of x1 and x2, so they must have the "
                                 f"same number of rows, got {x1.shape[-2]} and {x2.shape[-2]}")
            cov = (x1 * x2).sum(-1) / d
            return KernelState(cov=cov, var1=var1, var2=var2, ntk=zeros(cov), diag=True)
        cov = x1 @ x2.mT / d
        return KernelState(cov=cov, var1=var1, var2=var2, ntk=zeros(cov), symmetric=symmetric)

    def apply(self, state: KernelState) -> KernelState:
        for layer in self.layers:
            state = layer.apply(state)
        return state

    def __call__(self, x1: Tensor, x2: Tensor | None = None, *, get="nngp", diag: bool = False):
        names = (get,) if isinstance(get, str) else tuple(get)
        for g in names:
            if g not in _GET:
                raise ValueError(f"get must be 'nngp', 'ntk' or a tuple of them, got {get!r}")
        blockable = not diag and self._blockable
        if blockable and not self._needs_grad(x1, x2):
            from ._blocked import blocked_kernel

            x2, symmetric = _check_inputs(x1, x2)
            outs = blocked_kernel(self.layers, x1, None if symmetric else x2, names)
            out = tuple(outs[g] for g in names)
        elif blockable and self._checkpointable(x1, x2):
            from ._blocked import checkpointed_kernel

            x2, symmetric = _check_inputs(x1, x2)
            out = checkpointed_kernel(self.layers, x1, None if symmetric else x2, names)
        else:
            state = self.apply(self.initial_state(x1, x2, diag=diag, ntk="ntk" in names))
            out = tuple(state.cov if g == "nngp" else state.ntk for g in names)
        return out[0] if isinstance(get, str) else out

    @property
    def _blockable(self) -> bool:
        # the layers whose in-place block forms are known to repeat their apply()
        return all(type(layer) in (Dense, Relu, Erf) for layer in self.layers)

    def _checkpointable(self, x1: Tensor, x2: Tensor | None) -> bool:
        # large kernels with gradients: blocked forward, blocks recomputed in the backward
        if not all(layer.fused for layer in self.layers if isinstance(layer, _Activation)):
            return False
        x2 = x1 if x2 is None else x2
        if not (isinstance(x1, Tensor) and isinstance(x2, Tensor)):
            return False  # let the layer path raise its errors
        if x1.dim() < 2 or x2.dim() < 2 or x1.shape[-1] != x2.shape[-1]:
            return False
        batch = broadcast_shape(x1.shape[:-2], x2.shape[:-2])
        return math.prod(batch) * x1.shape[-2] * x2.shape[-2] >= CHECKPOINT_MIN_ENTRIES

    def _needs_grad(self, x1: Tensor, x2: Tensor | None) -> bool:
        if not torch.is_grad_enabled():
            return False
        tensors = [x1, x2] + [t for layer in self.layers if isinstance(layer, Dense)
                              for t in layer._tensors()]
        return any(isinstance(t, Tensor) and t.requires_grad for t in tensors)


def _check_inputs(x1: Tensor, x2: Tensor | None) -> tuple[Tensor, bool]:
    """Validate ``(x1, x2)``; returns ``(x2 or x1, symmetric)``."""
    check_tensor(x1, "x1", min_ndim=2)
    d = x1.shape[-1]
    if d == 0:
        raise ValueError("x1 must have at least one feature (last dimension), got 0")
    if x2 is None or x2 is x1:
        return x1, True
    check_tensor(x2, "x2", min_ndim=2)
    if x2.shape[-1] != d:
        raise ValueError(f"x1 and x2 must have the same number of features (last "
                         f"dimension), got {d} and {x2.shape[-1]}")
    if x2.dtype != x1.dtype:
        raise TypeError(f"x1 and x2 must have the same dtype, got {x1.dtype} and {x2.dtype}")
    return x2, False


def serial(*layers: Layer) -> NNGPKernelFn:
    """Compose layers into a kernel function (first layer applied first). A network with
    convolutional layers (:mod:`pyro_dkm.kernels.conv`: ``Conv1d``/``Conv2d``,
    ``ConvRelu``, ``AvgPool1d``/``AvgPool2d``, ``GlobalAvgPool``) gets the
    :class:`~pyro_dkm.kernels.conv.ConvNNGPKernelFn` of
    :func:`~pyro_dkm.kernels.conv.conv_serial`."""
    if len(layers) == 1 and isinstance(layers[0], (list, tuple)):
        layers = tuple(layers[0])
    from .conv import ConvNNGPKernelFn, GlobalAvgPool, _SpatialLayer

    if any(isinstance(layer, (_SpatialLayer, GlobalAvgPool)) for layer in layers):
        return ConvNNGPKernelFn(layers)
    return NNGPKernelFn(layers)


ACTIVATIONS = {"relu": Relu, "erf": Erf}


def fully_connected(depth: int, activation: str = "relu", weight_var=2.0, bias_var=0.1, *,
                    per_layer: bool = False) -> NNGPKernelFn:
    """The kernel function of a fully-connected net with ``depth`` hidden layers,
    ``serial(Dense(w_0, b_0), act, Dense(w_1, b_1), act, ..., Dense(w_depth, b_depth))``.

    Args:
        depth: hidden layers (``>= 0``); activation: ``"relu"`` or ``"erf"``.
        weight_var, bias_var: shared by every layer (floats or tensors), or with
            ``per_layer`` tensors whose last dimension holds the ``depth + 1`` layers'
            values (leading dimensions are hyper-parameter batch dimensions).
    """
    if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
        raise ValueError(f"depth must be a non-negative int, got {depth!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got "
                         f"{activation!r}")
    act = ACTIVATIONS[activation]
    layers = []
    for l in range(depth + 1):
        w = weight_var[..., l] if per_layer else weight_var
        b = bias_var[..., l] if per_layer else bias_var
        layers.append(Dense(w, b))
        if l < depth:
            layers.append(act())
    return serial(*layers)
