r"""Fused, memory-lean evaluation of the activation closed forms.

The ReLU (arc-cosine) and erf expectations of :mod:`pyro_dkm.kernels.nngp` are
elementwise in (cross covariance, variance at x, variance at x'). Written as plain
tensor expressions they allocate ~10 temporaries the size of the kernel matrix and,
under autograd, keep most of them for the backward pass. Here:

* :class:`_ArcCosine` is one autograd node returning the ReLU ``cov`` (and ``dot``)
  with a hand-derived backward; it saves ``s``, ``dot`` and a boolean mask only;
  :class:`_ErfCovDot` likewise for erf (saves ``u``, ``dot`` and the clamp mask);
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

from ._closed_forms import erf_expectations, relu_expectations

_TWO_PI = 2 * math.pi


def broadcast_shape(*shapes) -> torch.Size:
    """``torch.broadcast_shapes`` in plain Python (torch's imports ``torch.fx`` on first
    use, ~0.6 s, and costs ~0.1 ms a call)."""
    n = max(len(s) for s in shapes)
    out = [1] * n
    for shape in shapes:
        for i, d in enumerate(shape, n - len(shape)):
            if d != 1:
                if out[i] not in (1, d):
                    raise ValueError(f"shapes {[tuple(s) for s in shapes]} do not broadcast")
                out[i] = d
    return torch.Size(out)


def _full(t: Tensor, shape: torch.Size) -> Tensor:
    return t if t.shape == shape else t.expand(shape).contiguous()


def _relu_forward(k12: Tensor, k11: Tensor, k22: Tensor, *, inplace: bool, keep_s: bool,
                  need_mask: bool):
    """``(cov, dot, s, floored)`` of the ReLU expectations in two N x N work buffers.

    ``inplace`` overwrites ``k12`` (which must have the broadcast shape) with ``cov``;
    ``keep_s`` keeps ``s`` intact (else its buffer is reused); ``floored`` (where
    ``s^2`` sits on its floor) is computed only with ``need_mask``."""
    shape = broadcast_shape(k12.shape, k11.shape, k22.shape)
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


def _erf_elementwise(eps):
    return lambda k12, k11, k22: erf_expectations(k12, k11, k22, eps=eps)


def graph_input_grads(outs, grads, ins, needs) -> list:
    """For a custom backward under ``create_graph=True``: the gradients of ``outs`` (with
    output gradients ``grads``, ``None`` entries skipped) w.r.t. those ``ins`` whose
    ``needs`` is true, with the graph recorded (so they can be differentiated again);
    ``None`` for the others, zeros where an input is unused."""
    pairs = [(o, g) for o, g in zip(outs, grads) if g is not None]
    wrt = [t for t, n in zip(ins, needs) if n]
    got = iter(torch.autograd.grad([o for o, _ in pairs], wrt, [g for _, g in pairs],
                                   create_graph=True, allow_unused=True))
    res = []
    for t, n in zip(ins, needs):
        g = next(got) if n else None
        res.append(torch.zeros_like(t) if n and g is None else g)
    return res


def _graph_grads(ctx, elementwise, grads) -> tuple:
    """The input gradients of a fused node under ``create_graph=True``: autograd of the
    node's elementwise form ``elementwise(k12, k11, k22) -> (cov, dot)`` on the saved inputs,
    recorded, so higher derivatives exist (the hand-derived backward is not itself
    differentiable). The same first derivatives as the hand-derived backward."""
    ins = ctx.saved_tensors[:3]
    return (*graph_input_grads(elementwise(*ins), grads, ins, ctx.needs_input_grad[:3]), None)


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
    def backward(ctx, *grads):
        if all(g is None for g in grads):
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return _graph_grads(ctx, relu_expectations, grads)
        return _ArcCosine._backward(ctx, *grads)

    @staticmethod
    def _backward(ctx, *grads):
        k12, k11, k22, s, dot, floored = ctx.saved_tensors
        gc = grads[0]
        gd = grads[1] if ctx.with_dot else None
        need12, need11, need22 = ctx.needs_input_grad[:3]
        # the unfloored formulas everywhere, in place in two kernel-sized buffers ...
        d12 = a = None
        if need12:
            d12 = gc * dot if gc is not None else None
            if gd is not None:
                h = torch.div(gd, s).div_(_TWO_PI)  # 1 / (2 pi s)
                d12 = h if d12 is None else d12.add_(h)
        if need11 or need22:
            r = torch.mul(s, s).addcmul_(k12, k12)  # s^2 + k12^2
            a = gc * s if gc is not None else None
            if gd is not None:
                q = torch.mul(gd, k12).div_(s)
                a = q.neg_() if a is None else a.sub_(q)
            a = a.div_(r).div_(2 * _TWO_PI)  # (gc s - gd k12 / s) / (4 pi r)
            del r
        # ... then the few floored entries (duplicated points, the diagonal) fixed up
        if bool(floored.any()):
            idx = floored.nonzero(as_tuple=True)
            shape = s.shape
            sf, kf = s[idx], k12.expand(shape)[idx]
            rf = sf * sf + kf * kf
            gcf = None if gc is None else gc.expand(shape)[idx]
            gdf = None if gd is None else gd.expand(shape)[idx]
            if need12:
                v = 0
                if gcf is not None:
                    v = gcf * (dot[idx] + kf * sf / rf / _TWO_PI)
                if gdf is not None:
                    v = v + gdf * sf / rf / _TWO_PI
                d12[idx] = v
            if a is not None:
                finfo = torch.finfo(k12.dtype)
                prod = k11.expand(shape)[idx] * k22.expand(shape)[idx]
                c_fl = torch.where(prod * finfo.eps > finfo.tiny, finfo.eps, 0.0)
                v = 0
                if gcf is not None:
                    v = gcf * sf
                if gdf is not None:
                    v = v - gdf * kf / sf
                a[idx] = c_fl * v / rf / (2 * _TWO_PI)
        d11 = d22 = None
        if need12:
            d12 = d12.sum_to_size(k12.shape)
        if need11:
            d11 = _reduce_times(a, k22, k11.shape)
        if need22:
            d22 = _reduce_times(a, k11, k22.shape)
        return d12, d11, d22, None


def _reduce_times(a: Tensor, v: Tensor, shape) -> Tensor:
    """``(a * v).sum_to_size(shape)``, as a matrix product when ``v`` is a row ``(..., 1, M)``
    and ``shape`` a column ``(..., T, 1)`` or the other way round (the kernel layout)."""
    if a.dim() >= 2 and v.dim() == a.dim() and len(shape) == a.dim():
        if v.shape[-2] == 1 and shape[-1] == 1 and shape[-2] == a.shape[-2]:
            return (a @ v.mT).sum_to_size(shape)
        if v.shape[-1] == 1 and shape[-2] == 1 and shape[-1] == a.shape[-1]:
            return (v.mT @ a).sum_to_size(shape)
    return (a * v).sum_to_size(shape)


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
    to any order: under ``create_graph=True`` the backward differentiates the elementwise
    form instead (the same first derivative, recorded for the next one).
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


class _ErfCovDot(torch.autograd.Function):
    r"""Erf ``(cov, dot)`` as one autograd node (the operations of ``erf_expectations``).

    With :math:`a = (1+2k_{11})(1+2k_{22})`, :math:`q = 2k_{12}/\sqrt a`, :math:`u` = ``q``
    clamped to :math:`\pm(1-\epsilon)` (mask :math:`m` where it is not), ``cov`` =
    :math:`\frac2\pi\arcsin u`, ``dot`` = :math:`\frac4\pi(a(1-u^2))^{-1/2}`:
    :math:`G_u = g_c \frac{2/\pi}{\sqrt{1-u^2}} + g_d\,\frac{dot\,u}{1-u^2}`,
    :math:`\partial/\partial k_{12} = 2 m G_u/\sqrt a`,
    :math:`G_a = -(g_d\,dot + m G_u u)/(2a)`, :math:`\partial/\partial k_{11} =
    2(1+2k_{22}) G_a`.
    """

    @staticmethod
    def forward(ctx, k12, k11, k22, eps):
        a = (1 + 2 * k11) * (1 + 2 * k22)
        sa = a.sqrt()
        q = 2 * k12 / sa
        inside = (q >= -1 + eps) & (q <= 1 - eps)
        u = q.clamp_(-1 + eps, 1 - eps)
        cov = (2 / math.pi) * torch.asin(u)
        dot = (4 / math.pi) / (a * (1 - u * u)).sqrt()
        ctx.set_materialize_grads(False)
        ctx.eps = eps
        ctx.save_for_backward(k12, k11, k22, u, dot, inside)
        return cov, dot

    @staticmethod
    def backward(ctx, gc, gd):
        if gc is None and gd is None:
            return None, None, None, None
        if torch.is_grad_enabled():  # create_graph=True
            return _graph_grads(ctx, _erf_elementwise(ctx.eps), (gc, gd))
        k12, k11, k22, u, dot, inside = ctx.saved_tensors
        need12, need11, need22 = ctx.needs_input_grad[:3]
        one_m = torch.mul(u, u).neg_().add_(1)  # 1 - u^2
        gu = None
        if gc is not None:
            gu = one_m.sqrt().reciprocal_().mul_(2 / math.pi).mul_(gc)
        if gd is not None:
            h = torch.mul(dot, u).div_(one_m).mul_(gd)
            gu = h if gu is None else gu.add_(h)
        del one_m
        gu = gu.mul_(inside)  # the clamp passes gradients only inside its range
        c11, c22 = 1 + 2 * k11, 1 + 2 * k22
        a = c11 * c22
        d12 = d11 = d22 = None
        if need12:
            d12 = (2 * gu / a.sqrt()).sum_to_size(k12.shape)
        if need11 or need22:
            ga = gu.mul_(u)  # m G_u u (gu is not needed any more)
            if gd is not None:
                ga = ga.addcmul_(gd, dot)
            ga = ga.div_(a).mul_(-0.5)
            if need11:
                d11 = _reduce_times(ga, 2 * c22, k11.shape)
            if need22:
                d22 = _reduce_times(ga, 2 * c11, k22.shape)
        return d12, d11, d22, None


def erf_cov_dot(k12: Tensor, k11: Tensor, k22: Tensor, eps: float) -> tuple[Tensor, Tensor]:
    """``erf_expectations(k12, k11, k22)`` (bitwise the same ``(cov, dot)``) as one autograd
    node with a hand-derived backward; ``eps`` is the clamp margin (``clamp_eps``)."""
    return _ErfCovDot.apply(k12, _as_like(k11, k12), _as_like(k22, k12), eps)
