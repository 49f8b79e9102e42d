r"""No-grad dense NNGP/NTK evaluation in place, in row blocks.

Every layer is elementwise in (cross covariance, variance at x, variance at x'), so a
row block of ``K(X, X')`` goes through the whole network on its own once the per-point
variances of every layer (O(n) each) are known. :func:`blocked_kernel` writes
:math:`K_0 = X X'^T / d` into the output (one matrix product, as the layer path does),
then runs each block of rows through the layers in place (``Dense._block_``,
``_Activation._block_cross_``), with two block-sized work buffers per activation.
Peak memory is the output(s) plus a few blocks, instead of ~10 kernel-sized
temporaries per activation, and the blocks stay in cache. The operations are those of
the layer path, in the same order, so the values are bitwise the same.

:func:`elementwise_kernel` is the plain composition of
:func:`~pyro_dkm.kernels.nngp.relu_expectations` /
:func:`~pyro_dkm.kernels.nngp.erf_expectations` (the dense path before the fused forms);
tests and ``benchmarks/nngp_kernel.py`` compare against it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from ._fused import broadcast_shape, graph_input_grads
from .nngp import Dense, KernelState, NNGPKernelFn, _Activation

#: entries per row block on CPU (1 MiB in float64; measured best among 2^13..2^18 on one
#: core); on a GPU blocks are larger, so kernel launches stay few
BLOCK_ENTRIES = 1 << 17
BLOCK_ENTRIES_GPU = 1 << 24


def _layer_variances(layers, var: Tensor) -> list:
    """The variance vector entering each activation (``None`` for other layers) and the
    last layer's output variance."""
    state = KernelState(cov=var, var1=var, var2=var, ntk=None, diag=True, coincident=True)
    into = []
    for layer in layers:
        into.append(state.var1 if isinstance(layer, _Activation) else None)
        state = layer.apply(state)
    return into + [state.var1]


def blocked_kernel(layers, x1: Tensor, x2: Tensor | None, names, *,
                   block_entries: int | None = None) -> dict[str, Tensor]:
    """``{"nngp": K, "ntk": Theta}`` (those in ``names``) of ``serial(*layers)`` at
    ``(x1, x2)`` (``x2=None``: ``K(x1, x1)`` with the exact diagonal), without autograd.

    ``layers`` must be ``Dense``/``Relu``/``Erf``; inputs are assumed validated.
    ``block_entries``: entries per row block (default :data:`BLOCK_ENTRIES` on CPU,
    :data:`BLOCK_ENTRIES_GPU` otherwise)."""
    if block_entries is None:
        block_entries = BLOCK_ENTRIES if x1.device.type == "cpu" else BLOCK_ENTRIES_GPU
    symmetric = x2 is None
    x2 = x1 if symmetric else x2
    d = x1.shape[-1]
    var1 = x1.pow(2).sum(-1) / d
    vars1 = _layer_variances(layers, var1)
    vars2 = vars1 if symmetric else _layer_variances(layers, x2.pow(2).sum(-1) / d)
    batch = broadcast_shape(vars1[-1].shape[:-1], vars2[-1].shape[:-1])
    dtype = torch.promote_types(vars1[-1].dtype, vars2[-1].dtype)
    n1, n2 = x1.shape[-2], x2.shape[-2]
    shape = batch + (n1, n2)
    first = "nngp" if "nngp" in names else "ntk"
    outs = {first: torch.empty(shape, dtype=dtype, device=x1.device)}
    for g in names:
        if g not in outs:
            outs[g] = torch.empty(shape, dtype=dtype, device=x1.device)
    # K_0 = x1 x2^T / d, computed whole (a row-blocked product may round differently)
    k0 = outs[first]
    mm_batch = broadcast_shape(x1.shape[:-2], x2.shape[:-2])
    if mm_batch == batch and x1.dtype == dtype:
        torch.matmul(x1, x2.mT, out=k0)
    else:
        k0.copy_(x1 @ x2.mT)
    k0.div_(d)
    # exact diagonal values (value, dot) of each activation, for K(x1, x1)
    diag_vals = [None if v is None or not symmetric else layer._diag(v)
                 for layer, v in zip(layers, vars1)]
    # blocks start at multiples of 64 entries of each n1 x n2 slice, so torch's vectorised
    # loops (and their scalar tails, whose atan2 may differ by an ulp) line up with those of
    # the whole-matrix layer path
    align = 64 // math.gcd(n2, 64)
    rows = max(1, block_entries // max(1, n2 * math.prod(batch)) // align) * align
    for i0 in range(0, n1, rows):
        i1 = min(n1, i0 + rows)
        if "nngp" in names:
            cov = outs["nngp"][..., i0:i1, :]
        else:
            cov = k0[..., i0:i1, :].clone()  # the NTK output holds K_0 until overwritten
        ntk = outs["ntk"][..., i0:i1, :].zero_() if "ntk" in names else None
        n_diag = max(0, min(i1, n2) - i0)  # diagonal entries (i, i) in this block
        for layer, k11, k22, dv in zip(layers, vars1, vars2, diag_vals):
            if k11 is None:
                layer._block_(cov, ntk)
                continue
            dot = layer._block_cross_(cov, k11[..., i0:i1, None], k22[..., None, :],
                                      ntk is not None)
            if dv is not None and n_diag:
                cov.diagonal(i0, -2, -1).copy_(dv[0][..., i0:i0 + n_diag])
                if dot is not None:
                    dot.diagonal(i0, -2, -1).copy_(dv[1][..., i0:i0 + n_diag])
            if ntk is not None:
                ntk.mul_(dot)
    return outs


def elementwise_kernel(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None = None, *,
                       get="nngp", diag: bool = False):
    """``kfn(x1, x2, get=get, diag=diag)`` through the plain elementwise closed forms
    (the dense path before the fused and blocked forms): the reference."""
    names = (get,) if isinstance(get, str) else tuple(get)
    state = kfn.initial_state(x1, x2, diag=diag, ntk="ntk" in names)
    for layer in kfn.layers:
        if isinstance(layer, _Activation):
            state = layer.apply_elementwise(state)
        else:
            state = layer.apply(state)
    out = tuple(state.cov if g == "nngp" else state.ntk for g in names)
    return out[0] if isinstance(get, str) else out


#: entries per row block when recomputing blocks with autograd (bigger blocks: the
#: per-block Python and graph overhead is larger there)
GRAD_BLOCK_ENTRIES = 1 << 18


def _substitute(layers, leaves):
    """Copies of ``layers`` whose tensor hyper-parameters are the next ``leaves``."""
    it = iter(leaves)
    out = []
    for layer in layers:
        if isinstance(layer, Dense):
            new = Dense.__new__(Dense)  # the values were validated when the layer was built
            new.weight_var = next(it) if isinstance(layer.weight_var, Tensor) else layer.weight_var
            new.bias_var = next(it) if isinstance(layer.bias_var, Tensor) else layer.bias_var
            layer = new
        out.append(layer)
    return out


def _block_states(layers, rows: Tensor, cols: Tensor, i0: int, symmetric: bool, ntk: bool):
    """The layer path on one row block (autograd records it)."""
    d = rows.shape[-1]
    cov = rows @ cols.mT / d
    state = KernelState(cov=cov, var1=rows.pow(2).sum(-1) / d, var2=cols.pow(2).sum(-1) / d,
                        ntk=torch.zeros_like(cov) if ntk else None, symmetric=symmetric,
                        diag_offset=i0)
    for layer in layers:
        state = layer.apply(state)
    return state


class _Checkpointed(torch.autograd.Function):
    """``blocked_kernel`` forward; the backward recomputes each row block with autograd
    (the layer path, fused ReLU) and back-propagates it, so memory stays ~ the outputs."""

    @staticmethod
    def forward(ctx, layers, names, x1, x2, *params):
        outs = blocked_kernel(layers, x1, x2, names)
        ctx.layers, ctx.names = layers, names
        ctx.set_materialize_grads(False)
        ctx.save_for_backward(x1, x2, *params)
        return tuple(outs[g] for g in names)

    @staticmethod
    def backward(ctx, *grads):
        x1, x2, *params = ctx.saved_tensors
        used = [(g, out) for g, out in zip(grads, ctx.names) if g is not None]
        if not used:
            return (None,) * (4 + len(params))
        if torch.is_grad_enabled():  # create_graph=True
            return _Checkpointed._graph_backward(ctx, used, x1, x2, params)
        return _Checkpointed._backward(ctx, used, x1, x2, params)

    @staticmethod
    def _graph_backward(ctx, used, x1, x2, params):
        """Under ``create_graph=True``: the whole kernel through the layer path on the saved
        inputs, differentiated with its graph recorded (higher derivatives; the kernel-sized
        intermediates are kept, as they must be for a second derivative)."""
        needs = ctx.needs_input_grad[2:]
        # one alias per parameter slot: a tensor shared by two layers is two inputs here,
        # each getting its own layer's share
        params = [p.view_as(p) for p in params]
        state = _block_states(_substitute(ctx.layers, params), x1, x1 if x2 is None else x2,
                              0, x2 is None, any(name == "ntk" for _, name in used))
        outs = [state.cov if name == "nngp" else state.ntk for _, name in used]
        return (None, None, *graph_input_grads(outs, [g for g, _ in used], [x1, x2, *params],
                                               needs))

    @staticmethod
    def _backward(ctx, used, x1, x2, params):
        need_x1, need_x2 = ctx.needs_input_grad[2:4]
        need_p = ctx.needs_input_grad[4:]
        symmetric = x2 is None
        leaves = [p.detach().requires_grad_(n) for p, n in zip(params, need_p)]
        layers = _substitute(ctx.layers, leaves)
        cols = (x1 if symmetric else x2).detach().requires_grad_(
            need_x1 if symmetric else need_x2)
        gx1 = torch.zeros_like(x1) if need_x1 else None
        gcols = None
        gps = [None] * len(params)
        n1, n2 = x1.shape[-2], cols.shape[-2]
        batch_numel = math.prod(used[0][0].shape[:-2])
        rows_per = max(1, GRAD_BLOCK_ENTRIES // max(1, n2 * batch_numel))
        ntk = any(name == "ntk" for _, name in used)
        for i0 in range(0, n1, rows_per):
            i1 = min(n1, i0 + rows_per)
            rows = x1[..., i0:i1, :].detach().requires_grad_(need_x1)
            with torch.enable_grad():
                state = _block_states(layers, rows, cols, i0, symmetric, ntk)
            outs = [state.cov if name == "nngp" else state.ntk for _, name in used]
            gouts = [g[..., i0:i1, :] for g, _ in used]
            wrt = [t for t in [rows, cols, *leaves] if t.requires_grad]
            got = iter(torch.autograd.grad(outs, wrt, gouts, allow_unused=True))
            if rows.requires_grad:
                g = next(got)
                if g is not None:
                    gx1[..., i0:i1, :] += g
            if cols.requires_grad:
                g = next(got)
                if g is not None:
                    gcols = g if gcols is None else gcols + g
            for k, leaf in enumerate(leaves):
                if leaf.requires_grad:
                    g = next(got)
                    if g is not None:
                        gps[k] = g if gps[k] is None else gps[k] + g
        gx2 = None
        if symmetric and need_x1 and gcols is not None:
            gx1 += gcols
        elif not symmetric and need_x2:
            gx2 = gcols if gcols is not None else torch.zeros_like(x2)
        return (None, None, gx1, gx2, *gps)


def checkpointed_kernel(layers, x1: Tensor, x2: Tensor | None, names) -> tuple[Tensor, ...]:
    """``blocked_kernel`` with gradients: the outputs are differentiable w.r.t. ``x1``,
    ``x2`` and the layers' tensor hyper-parameters; the backward recomputes row blocks
    (about one forward more) instead of keeping ~10 kernel-sized tensors per activation."""
    params = [t for layer in layers if isinstance(layer, Dense) for t in layer._tensors()]
    return _Checkpointed.apply(layers, tuple(names), x1, x2, *params)
