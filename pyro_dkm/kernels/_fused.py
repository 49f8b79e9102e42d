r"""Fused, memory-lean evaluation of the activation closed forms.

The ReLU (arc-cosine) and erf expectations of :mod:`pyro_dkm.kernels.nngp` are
elementwise in (cross covariance, variance at x, variance at x'). Written as plain
tensor expressions they allocate ~10 temporaries the size of the kernel matrix and,
under autograd, keep most of them for the backward pass. Here:

* :class:`_ArcCosine` is one autograd node returning the ReLU ``cov`` (and ``dot``)
  with a hand-derived backward; it saves ``s``, ``dot`` and a boolean mask only;
* :func:`relu_block_` / :func:`erf_block_` overwrite their ``k12`` argument with the
  covariance, in two work buffers, for the no-grad blocked evaluation.

Every forward applies the same floating-point operations, in the same order, as
:func:`~pyro_dkm.kernels.nngp.relu_expectations` /
:func:`~pyro_dkm.kernels.nngp.erf_expectations`, so the values are bitwise the same
(which matters at near-coincident inputs, where ``s = sqrt(k11 k22 - k12^2)`` turns
rounding differences of the inputs into ~1e-8 relative ones).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_TWO_PI = 2 * math.pi


def _full(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.expand(shape).contiguous()


def _relu_forward(k12: Tensor, k11: Tensor, k22: Tensor, *, inplace: bool, keep_s: bool,
                  need_mask: bool):
    """``(cov, dot, s, floored)`` of the ReLU expectations in two N x N work buffers.

    ``inplace`` overwrites ``k12`` (which must have the broadcast shape) with ``cov``;
    ``keep_s`` keeps ``s`` intact (else its buffer is reused); ``floored`` (where
    ``s^2`` sits on its floor) is computed only with ``need_mask``."""
    shape = torch.broadcast_shapes(k12.shape, k11.shape, k22.shape)
    finfo = torch.finfo(k12.dtype)
    P = _full(k11 * k22, shape)  # k11 k22
    S = k12 * k12
    S = torch.sub(P, S, out=S) if S.shape == shape else P - S  # s^2 = k11 k22 - k12^2
    P.mul_(finfo.eps).clamp_min_(finfo.tiny)  # floor of s^2
    floored = S < P if need_mask else None
    s = torch.maximum(S, P, out=S).sqrt_()
    dot = torch.atan2(s, k12, out=P).neg_().add_(math.pi).div_(_TWO_PI)  # (pi - theta) / 2pi
    if inplace:
        cov = k12.mul_(dot)
    else:
        cov = dot * k12
    cov.add_(s / _TWO_PI if keep_s else s.div_(_TWO_PI))  # s / 2pi + dot k12
    return cov, dot, (s if keep_s else None), floored


class _ArcCosine(torch.autograd.Function):
    r"""ReLU ``cov`` (and ``dot`` when ``with_dot``) as one autograd node.

    With :math:`r = s^2 + k_{12}^2`, unfloored (:math:`s^2 = k_{11}k_{22} - k_{12}^2`):
    :math:`\partial\,cov/\partial k_{12} = dot`, :math:`\partial\,cov/\partial k_{11} =
    s k_{22}/(4\pi r)`, :math:`\partial\,dot/\partial k_{12} = 1/(2\pi s)`,
    :math:`\partial\,dot/\partial k_{11} = -k_{12}k_{22}/(4\pi s r)`. Floored
    (:math:`s^2 = \epsilon k_{11}k_{22}`, no :math:`k_{12}` term):
    :math:`\partial\,cov/\partial k_{12} = dot + k_{12}s/(2\pi r)`,
    :math:`\partial\,dot/\partial k_{12} = s/(2\pi r)`, and the :math:`k_{11}` terms
    carry a factor :math:`\epsilon` (0 where the floor is the constant ``tiny``).
    These are the derivatives autograd takes of the elementwise expressions.
    """

    @staticmethod
    def forward(ctx, k12, k11, k22, with_dot):
        cov, dot, s, floored = _relu_forward(k12, k11, k22, inplace=False, keep_s=True,
                                             need_mask=True)
        ctx.with_dot = with_dot
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(k12, k11, k22, s, dot, floored)
        if with_dot:
            return cov, dot
        return cov

    @staticmethod
    @once_differentiable
    def backward(ctx, *grads):
        k12, k11, k22, s, dot, floored = ctx.saved_tensors
        gc = grads[0]
        gd = grads[1] if ctx.with_dot else None
        need12, need11, need22 = ctx.needs_input_grad[:3]
        d12 = d11 = d22 = None
        if gc is None and gd is None:
            return None, None, None, None
        any_floored = bool(floored.any())
        r = s * s + k12 * k12 if (need11 or need22 or any_floored) else None
        if need12:
            g = gc * dot if gc is not None else None
            if gd is not None:
                h = gd / s
                if any_floored:
                    h = torch.where(floored, gd * s / r, h)
                h = h / _TWO_PI
                g = h if g is None else g + h
            if gc is not None and any_floored:
                g = g + torch.where(floored, gc * k12 * s / r / _TWO_PI, 0.0)
            d12 = g.sum_to_size(k12.shape)
        if need11 or need22:
            q = gc * s if gc is not None else None
            if gd is not None:
                q2 = gd * k12 / s
                q = -q2 if q is None else q - q2
            a = q / r / (2 * _TWO_PI)
            if any_floored:
                finfo = torch.finfo(k12.dtype)
                c_fl = torch.where(k11 * k22 * finfo.eps > finfo.tiny, finfo.eps, 0.0)
                a = torch.where(floored, a * c_fl, a)
            if need11:
                d11 = (a * k22).sum_to_size(k11.shape)
            if need22:
                d22 = (a * k11).sum_to_size(k22.shape)
        return d12, d11, d22, None


def _as_like(t, k12: Tensor) -> Tensor:
    return torch.as_tensor(t, dtype=k12.dtype, device=k12.device)


def arccos_cov(k12: Tensor, k11: Tensor, k22: Tensor) -> Tensor:
    r""":math:`E[\mathrm{relu}(u)\mathrm{relu}(v)]` for :math:`(u, v) \sim \mathcal N(0, K)`,
    :math:`\frac{1}{2\pi}(s + (\pi - \theta) k_{12})`, :math:`s = \sqrt{k_{11}k_{22} -
    k_{12}^2}`, :math:`\theta = \operatorname{atan2}(s, k_{12})`.

    Same values (bitwise) and, where it is differentiable, the same gradients as
    ``pyro_dkm.kernels.nngp.relu_expectations(k12, k11, k22)[0]``, including the floor
    :math:`s^2 \ge \epsilon k_{11}k_{22}`, but as one autograd node with a hand-derived
    backward (:math:`\partial/\partial k_{12} = (\pi - \theta)/2\pi`,
    :math:`\partial/\partial k_{11} = s k_{22}/(4\pi r)`, :math:`r = s^2 + k_{12}^2`), which
    is several times cheaper than differentiating the elementwise graph. ``k11`` and
    ``k22`` broadcast against ``k12`` (e.g. ``(T, 1)`` and ``(1, M)``). Differentiable
    once (a second derivative raises).
    """
    return _ArcCosine.apply(k12, _as_like(k11, k12), _as_like(k22, k12), False)


def relu_cov_dot(k12: Tensor, k11: Tensor, k22: Tensor) -> tuple[Tensor, Tensor]:
    """``relu_expectations(k12, k11, k22)`` (bitwise the same ``(cov, dot)``) as one
    autograd node with the hand-derived backward of :class:`_ArcCosine`."""
    return _ArcCosine.apply(k12, _as_like(k11, k12), _as_like(k22, k12), True)


def relu_block_(k12: Tensor, k11: Tensor, k22: Tensor, need_dot: bool) -> Tensor | None:
    """No-grad ReLU layer in place: ``k12`` (already of the broadcast shape) becomes
    ``cov``; returns ``dot`` (a new tensor) when ``need_dot``."""
    _, dot, _, _ = _relu_forward(k12, k11, k22, inplace=True, keep_s=False, need_mask=False)
    return dot if need_dot else None


def erf_block_(k12: Tensor, k11: Tensor, k22: Tensor, need_dot: bool, eps: float
               ) -> Tensor | None:
    """No-grad erf layer in place (the operations of ``erf_expectations``, in its order):
    ``k12`` (of the broadcast shape) becomes ``cov``; returns ``dot`` when ``need_dot``."""
    shape = k12.shape
    a = _full((1 + 2 * k11) * (1 + 2 * k22), shape)  # (1 + 2 k11)(1 + 2 k22)
    s = k12.mul_(2).div_(a.sqrt()).clamp_(-1 + eps, 1 - eps)  # 2 k12 / sqrt(a), clamped
    dot = None
    if need_dot:
        w = torch.mul(s, s).neg_().add_(1)  # 1 - s^2
        w = a.mul_(w).sqrt_()
        dot = w.reciprocal_().mul_(4 / math.pi)  # torch's (4 / pi) / w
    s.asin_().mul_(2 / math.pi)
    return dot
