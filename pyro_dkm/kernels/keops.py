r"""NNGP / NTK kernels as KeOps lazy reductions (O(N) memory kernel matrix products).

Every layer of a :func:`~pyro_dkm.kernels.nngp.serial` network acts elementwise on
(cross covariance, variance at x, variance at x'), so the whole depth-L kernel
:math:`K_{ij}` is one KeOps formula in :math:`x_i \cdot x'_j` plus per-point variances.
The per-point variances of every layer are cheap (O(N)) and are computed in torch; only
the cross terms go to KeOps::

    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(1.0, 0.0))
    Kv = keops_matmul(kfn, X, None, v)               # K(X, X) @ v, never building K
    op = NNGPOperator(kfn, X, noise=0.1)             # linear_operator LinearOperator
    alpha = cg_solve(op, y)                          # CG (linear_operator)
    mean, var, quad = exact_predict(kfn, X, y, X_test, noise=0.1)

Formulas: we write the KeOps formula text ourselves, binding every shared intermediate
once (a KeOps ``Factorize``), so the generated C++ is linear in depth (KeOps' own formula
trees recompute shared sub-formulas: exponential in depth). Gradients w.r.t. the inputs,
the right-hand side and the Dense weight/bias variances are hand-derived reverse-mode
formulas of the same compact form, run by a custom ``torch.autograd.Function``: one KeOps
build for the product and one for its gradient, each under a minute. If a gradient build
fails, the exact gradient is computed in torch in row chunks (O(N * chunk) memory).

Numerical notes (see ``docs/keops.md``): no non-integer powers (``x ** float`` lowers to
float32 ``powf`` in KeOps); hyper-parameters and constants enter as 1-D parameter vectors
(no rebuild when they change); the ReLU form is the atan2 form of
:func:`~pyro_dkm.kernels.nngp.relu_expectations` with the same floor
:math:`s^2 \ge \epsilon k_{11}k_{22}`; for ``K(X, X)`` the lazy sum skips ``j = i`` and the
exact closed-form diagonal is added in torch, as in the dense path.

Without pykeops, for batched inputs/hyper-parameters, or when KeOps fails to compile,
everything falls back to the dense torch path with a :class:`KeOpsFallbackWarning`.
"""

from __future__ import annotations

import os
import warnings
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..linalg import check_tensor
from ._keops_formula import (
    _constants,
    _formulas,
    _hypers,
    _install_let,
    _pair_torch,
    _points,
    _program,
    _scalar_hyper,
)
from .nngp import Dense, Erf, NNGPKernelFn, Relu

__all__ = [
    "keops_available",
    "set_keops_cache_dir",
    "keops_matmul",
    "NNGPOperator",
    "KeOpsFallbackWarning",
    "DEFAULT_KEOPS_THRESHOLD",
]

#: ``use_keops="auto"`` uses KeOps on a CUDA device when both sizes are at least this many
#: rows. On CPU "auto" never does: there the tiled torch product (``use_keops=False``)
#: is 1.7-4.3x faster per product than KeOps (docs/keops.md) and, like KeOps, never holds K
#: whole. The CUDA value is a guess pending GPU measurements (no GPU was lent so far).
DEFAULT_KEOPS_THRESHOLD = 20000


class KeOpsFallbackWarning(RuntimeWarning):
    """Raised (as a warning) when the KeOps path is unavailable and dense torch is used."""


_KEOPS = None  # None: not probed yet; False: unavailable; else the LazyTensor class


def _quiet_env():
    os.environ.setdefault("PYKEOPS_VERBOSE", "0")
    os.environ.setdefault("KEOPS_VERBOSE", "0")


def _lazy_tensor_cls():
    global _KEOPS
    if _KEOPS is None:
        _quiet_env()
        try:
            from pykeops.torch import LazyTensor  # noqa: PLC0415

            _KEOPS = LazyTensor
        except Exception as err:  # ImportError, or a broken toolchain at import
            warnings.warn(f"pykeops is not usable ({type(err).__name__}: {err}); using the "
                          f"dense torch path", KeOpsFallbackWarning, stacklevel=3)
            _KEOPS = False
    return _KEOPS


def keops_available() -> bool:
    """Whether ``pykeops`` imports (compilation is only tried on first use)."""
    return bool(_lazy_tensor_cls())


def set_keops_cache_dir(path: str | None = None, *, per_process: bool = False) -> str:
    """Point KeOps' build cache at ``path`` (default: its own location).

    With ``per_process=True`` a sub-folder ``pid-<os.getpid()>`` is used, so
    parallel workers (e.g. pytest-xdist) never race on the same build files
    (each then compiles its own formulas once). Works before or after pykeops is
    imported. Returns the folder used.
    """
    if path is None:
        path = os.environ.get("KEOPS_CACHE_FOLDER") or os.path.join(
            os.path.expanduser("~"), ".cache", "pyro_dkm_keops")
    if per_process:
        path = os.path.join(path, f"pid-{os.getpid()}")
    os.makedirs(path, exist_ok=True)
    os.environ["KEOPS_CACHE_FOLDER"] = path
    _quiet_env()
    import sys  # noqa: PLC0415

    if "pykeops" in sys.modules:
        import pykeops  # noqa: PLC0415

        pykeops.set_build_folder(path)
    return path


_ROUTINES: dict = {}


def _reduce(spec, backward: bool, *args: Tensor) -> Tensor:
    """Run the forward (sum_j K_ij V_j) or backward reduction through KeOps."""
    prog, get, d = spec
    dim, m, p = args[0].shape[-1], args[-1].shape[-1], args[2].shape[-1]
    key = (prog, get, d, dim, m, p, backward)
    routine = _ROUTINES.get(key)
    if routine is None:
        from pykeops.torch import Genred  # noqa: PLC0415

        _install_let()
        aliases = [f"A=Vi(0,{dim})", f"B=Vj(1,{dim})", f"T=Pm(2,{p})", "C=Pm(3,7)"]
        aliases += ([f"G=Vi(4,{m})", f"V=Vj(5,{m})"] if backward else [f"V=Vj(4,{m})"])
        routine = Genred(_formulas(prog, get, d, backward), aliases, reduction_op="Sum",
                         axis=1)
        _ROUTINES[key] = routine
    return routine(*args)


class _KeOpsMatmul(torch.autograd.Function):
    """``sum_j K(a_i, b_j) v_j`` with hand-derived KeOps gradients (chunked torch fallback)."""

    @staticmethod
    def forward(ctx, a1, a2, theta, consts, v, spec):
        ctx.save_for_backward(a1, a2, theta, consts, v)
        ctx.spec = spec
        return _reduce(spec, False, a1, a2, theta, consts, v)

    @staticmethod
    @once_differentiable
    def backward(ctx, g):
        a1, a2, theta, consts, v = ctx.saved_tensors
        spec, g = ctx.spec, g.contiguous()
        need_a1, need_a2, need_th, _, need_v = ctx.needs_input_grad[:5]
        try:
            return _keops_backward(spec, a1, a2, theta, consts, v, g, need_a1 or need_th,
                                   need_a2, need_v) + (None,)
        except Exception as err:  # compilation/runtime failure: exact torch, O(N chunk)
            warnings.warn(f"KeOps gradient failed ({type(err).__name__}: {str(err)[:300]}); "
                          f"using chunked torch gradients", KeOpsFallbackWarning, stacklevel=2)
            return _chunked_backward(spec, a1, a2, theta, consts, v, g, need_a2, need_v) + (
                None,)


def _keops_backward(spec, a1, a2, theta, consts, v, g, need_1, need_2, need_v):
    d = spec[2]
    grad_a1 = grad_a2 = grad_th = grad_v = None
    if need_v:  # K^T g: the kernel is symmetric in its two points
        grad_v = _reduce(spec, False, a2, a1, theta, consts, g)

    def side(ai, aj, gi, vj):
        r = _reduce(spec, True, ai, aj, theta, consts, gi, vj)
        nf = ai.shape[-1] - d - 1
        grad = torch.cat([r[:, :d], torch.zeros_like(r[:, :1]), r[:, d:d + nf]], -1)
        return grad, r[:, d + nf:].sum(0)

    if need_1:
        grad_a1, grad_th = side(a1, a2, g, v)
    if need_2:
        grad_a2, _ = side(a2, a1, v, g)
    return grad_a1, grad_a2, grad_th, None, grad_v


def _chunked_backward(spec, a1, a2, theta, consts, v, g, need_a2, need_v):
    grads = [torch.zeros_like(a1), torch.zeros_like(a2), torch.zeros_like(theta)]
    grad_v = torch.zeros_like(v) if need_v else None
    chunk = max(1, 2 ** 20 // max(a2.shape[0], 1))
    for i0 in range(0, a1.shape[0], chunk):
        with torch.enable_grad():
            ins = [a1[i0:i0 + chunk].detach().requires_grad_(),
                   a2.detach().requires_grad_(need_a2), theta.detach().requires_grad_()]
            k = _pair_torch(spec, ins[0][:, None, :], ins[1][None, :, :], ins[2], consts)
            gi = g[i0:i0 + chunk]
            loss = (k * (gi @ v.mT)).sum()
            got = torch.autograd.grad(loss, [x for x in ins if x.requires_grad])
        got = iter(got)
        grads[0][i0:i0 + chunk] = next(got)
        if need_a2:
            grads[1] += next(got)
        grads[2] += next(got)
        if need_v:
            grad_v += k.detach().mT @ gi
    return grads[0], grads[1] if need_a2 else None, grads[2], None, grad_v


def _check_get(get):
    if get not in ("nngp", "ntk"):
        raise ValueError(f"get must be 'nngp' or 'ntk' (one kernel per lazy operator), got "
                         f"{get!r}")


def _keops_supported(kfn, x1, x2, v=None) -> str | None:
    """Why the KeOps path cannot be used, or None."""
    if x1.dim() != 2 or x2.dim() != 2:
        return "batched inputs"
    for layer in kfn.layers:
        if isinstance(layer, Dense) and not (_scalar_hyper(layer.weight_var)
                                             and _scalar_hyper(layer.bias_var)):
            return "batched hyper-parameters"
    if x1.dtype not in (torch.float32, torch.float64):
        return f"dtype {x1.dtype}"
    if x2.dtype != x1.dtype or (v is not None and v.dtype != x1.dtype):
        return "mixed dtypes"
    if not any(isinstance(layer, Dense) for layer in kfn.layers):
        return "a network without Dense layers"
    try:
        _program(kfn)
    except TypeError as err:
        return str(err)
    return None


#: the torch path of :func:`keops_matmul` multiplies square tiles of K of this side (8 MiB in
#: float64), so K is never held whole; for a symmetric K(x, x) only the tiles on and above
#: the diagonal are computed, each used twice. On a GPU the tiles are larger (128 MiB in
#: float64: fewer kernel launches; not measured)
MATMUL_TILE = 1024
MATMUL_TILE_GPU = 4096


def _tile_products(kfn, xi, xj, vi, vj, get, diagonal, both):
    """``(K_ij v_j,)``, or ``(K_ij v_j, K_ij^T v_i)`` when ``both``, for ``K_ij = K(xi, xj)``
    (``diagonal``: ``K(xi, xi)``, with its exact diagonal)."""
    K = kfn(xi, None if diagonal else xj, get=get)
    return (K @ vj, K.mT @ vi) if both else (K @ vj,)


def _tiled_matmul(kfn, x1, x2, v, get, sym, grad, shard=None):
    """``K(x1, x2) @ v`` (``v`` 2-D) one ``MATMUL_TILE``-square tile of K at a time. Square
    tiles keep both point sets' per-tile work (the input product, the per-point variances)
    small and give torch's threads enough entries per elementwise pass. For a symmetric K
    only tiles ``j >= i`` are computed: tile ``(i, j)`` adds ``K_ij v_j`` to rows ``i`` and
    ``K_ij^T v_i`` to rows ``j``, half the kernel evaluations. Without autograd the results
    accumulate in place in one preallocated output; with it each tile is a
    ``torch.utils.checkpoint`` (recomputed in the backward pass, so memory stays O(tile^2)).
    ``shard=(rank, size)``: only every ``size``-th tile (in loop order, from ``rank``): one
    rank's partial sums of a sharded product (:mod:`pyro_dkm.distributed` adds them up)."""
    n1, n2 = x1.shape[-2], x2.shape[-2]
    t = MATMUL_TILE if x1.device.type == "cpu" else MATMUL_TILE_GPU
    if grad:
        from torch.utils.checkpoint import checkpoint  # noqa: PLC0415
    out = None
    acc = [None] * len(range(0, n1, t))  # with autograd: per row block, a sum

    def add(i0, part):
        nonlocal out
        if not grad:
            if out is None:
                out = part.new_zeros(part.shape[:-2] + (n1, part.shape[-1]))
            out[..., i0:i0 + t, :] += part
        else:
            acc[i0 // t] = part if acc[i0 // t] is None else acc[i0 // t] + part

    count = -1
    for i0 in range(0, n1, t):
        xi, vi = x1[..., i0:i0 + t, :], v[i0:i0 + t]
        for j0 in range(i0 if sym else 0, n2, t):
            count += 1
            if shard is not None and count % shard[1] != shard[0]:
                continue
            args = (kfn, xi, x2[..., j0:j0 + t, :], vi, v[j0:j0 + t], get,
                    sym and j0 == i0, sym and j0 != i0)
            parts = checkpoint(_tile_products, *args, use_reentrant=False) if grad else \
                _tile_products(*args)
            add(i0, parts[0])
            if len(parts) > 1:
                add(j0, parts[1])
    if out is None and not grad:  # a rank with no tile of its own
        out = v.new_zeros(v.shape[:-2] + (n1, v.shape[-1]))
    return torch.cat(acc, -2) if grad else out


def _torch_matmul(kfn, x1, x2, v, get, sym):
    """``K(x1, x2) @ v`` in torch (the fused dense kernel) by square tiles of K, so K is
    never held whole (:func:`_tiled_matmul`); small products take K whole."""
    n1, n2 = x1.shape[-2], x2.shape[-2]
    vec = v.dim() == 1
    v2 = v[:, None] if vec else v
    if n1 * n2 <= MATMUL_TILE ** 2:
        out = kfn(x1, None if sym else x2, get=get) @ v2
    else:
        hypers = [t for layer in kfn.layers if isinstance(layer, Dense) for t in layer._tensors()]
        grad = torch.is_grad_enabled() and any(
            t.requires_grad for t in [x1, x2, v2, *hypers])
        out = _tiled_matmul(kfn, x1, x2, v2, get, sym, grad)
    return out[..., 0] if vec else out


_FAILED: set = set()


def _keops_matmul_impl(kfn, x1, x2, v, get, sym):
    """The KeOps path (raises on failure); ``v`` is 2-D."""
    prog, _, _ = _program(kfn)
    theta = _hypers(kfn, x1)
    d = x1.shape[-1]
    a1 = _points(prog, theta, x1, torch.arange(x1.shape[0], device=x1.device))
    a2 = a1 if sym else _points(prog, theta, x2, -1 - torch.arange(x2.shape[0],
                                                                   device=x2.device))
    out = _KeOpsMatmul.apply(a1, a2, theta, _constants(d, x1), v.contiguous(), (prog, get, d))
    if sym:  # the exact closed-form diagonal (the lazy sum skips j == i)
        out = out + kfn(x1, diag=True, get=get)[:, None] * v
    return out


def _resolve_backend(use_keops, threshold):
    """``(use_keops, threshold)`` with ``None`` taken from :data:`pyro_dkm.settings`."""
    from .._settings import settings

    return (settings.use_keops if use_keops is None else use_keops,
            settings.keops_threshold if threshold is None else threshold)


def _keops_decision(use_keops, threshold, device, n: int) -> tuple[bool, object]:
    """Whether a product over point sets of (at least) ``n`` rows on ``device`` runs
    through KeOps, and the resolved ``use_keops`` (``None`` read from the settings)."""
    use_keops, threshold = _resolve_backend(use_keops, threshold)
    if use_keops == "auto":
        return device.type == "cuda" and n >= threshold, use_keops
    if isinstance(use_keops, bool):
        return use_keops, use_keops
    raise ValueError(f"use_keops must be True, False or 'auto', got {use_keops!r}")


def keops_matmul(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None, v: Tensor, *,
                 get: str = "nngp", use_keops=None,
                 threshold: int | None = None) -> Tensor:
    """``K(x1, x2) @ v`` for ``v`` of shape ``(n2,)`` or ``(n2, m)``, differentiable
    w.r.t. ``x1``, ``x2``, ``v`` and tensor hyper-parameters.

    ``use_keops``: ``True`` (KeOps, warn and fall back to torch if impossible), ``False``
    (torch: the fused dense kernel one square tile of K at a time, so K is never held
    whole, only the upper tiles of a symmetric K; with gradients each tile is recomputed
    in the backward pass), or ``"auto"`` (KeOps on a CUDA
    device when both sizes ``>= threshold``, else torch; on CPU torch is the faster one).
    ``None`` (default): ``pyro_dkm.settings.use_keops`` / ``settings.keops_threshold``.
    With ``x2=None`` (or ``x2 is x1``) the exact closed-form diagonal is used, as in the
    dense path. Gradients are hand-derived KeOps reductions (falling back to exact
    chunked torch gradients in O(N * chunk) memory if they fail to build).
    """
    _check_get(get)
    check_tensor(x1, "x1", min_ndim=2)
    sym = x2 is None or x2 is x1
    x2 = x1 if x2 is None else x2
    check_tensor(x2, "x2", min_ndim=2)
    check_tensor(v, "v", min_ndim=1)
    if x1.shape[-1] != x2.shape[-1]:
        raise ValueError(f"x1 and x2 must have the same number of features, got "
                         f"{x1.shape[-1]} and {x2.shape[-1]}")
    if v.shape[0] != x2.shape[-2]:
        raise ValueError(f"v must have {x2.shape[-2]} rows (one per row of x2), got shape "
                         f"{tuple(v.shape)}")
    if v.dtype != x1.dtype or x2.dtype != x1.dtype:
        raise TypeError(f"x1, x2 and v must have one dtype, got {x1.dtype}, {x2.dtype} and "
                        f"{v.dtype}; convert v with v.to(x1.dtype)")
    vec = v.dim() == 1
    use, use_keops = _keops_decision(use_keops, threshold, x1.device,
                                     min(x1.shape[-2], x2.shape[-2]))
    if use:
        why = _keops_supported(kfn, x1, x2, v) or (None if _lazy_tensor_cls() else "no pykeops")
        if why is None:
            prog, _, _ = _program(kfn)
            key = (prog, get, x1.shape[-1], 1 if vec else v.shape[-1], x1.dtype, x1.device.type)
            if key not in _FAILED:
                try:
                    out = _keops_matmul_impl(kfn, x1, x2, v[:, None] if vec else v, get, sym)
                    return out[:, 0] if vec else out
                except Exception as err:  # compilation/runtime failure in KeOps
                    _FAILED.add(key)
                    warnings.warn(f"KeOps failed ({type(err).__name__}: {str(err)[:300]}); "
                                  f"using the dense torch path", KeOpsFallbackWarning,
                                  stacklevel=2)
        elif use_keops is True:
            warnings.warn(f"KeOps path unavailable ({why}); using the dense torch path",
                          KeOpsFallbackWarning, stacklevel=2)
    return _torch_matmul(kfn, x1, x2, v, get, sym)


# --------------------------------------------------------------------------
# linear_operator wrapper
# --------------------------------------------------------------------------
from linear_operator.operators import LinearOperator  # noqa: E402


def _rebuild(prog, theta: Tensor) -> NNGPKernelFn:
    """A kernel function whose Dense hyper-parameters are entries of ``theta``."""
    from .nngp import serial  # noqa: PLC0415

    layers = []
    for op, k in prog:
        if op == "dense":
            layers.append(_TensorDense(theta[2 * k], theta[2 * k + 1]))
        elif op == "relu":
            layers.append(Relu())
        else:
            layers.append(Erf())
    return serial(*layers)


class _TensorDense(Dense):
    """Dense with 0-d tensor hyper-parameters, skipping validation (already checked)."""

    def __init__(self, weight_var, bias_var):  # noqa: D107
        self.weight_var, self.bias_var = weight_var, bias_var


class NNGPOperator(LinearOperator):
    r"""The NNGP/NTK kernel matrix ``K(x1, x2) (+ noise I)`` as a linear_operator
    ``LinearOperator``, whose matrix products never materialise K (KeOps, or torch
    tiles: see :func:`keops_matmul`'s ``use_keops``).

    linear_operator's CG / Lanczos (``op.solve``, ``op.inv_quad_logdet``,
    ``gpytorch.settings``) then do exact GP regression without materialising K;
    gradients flow to ``x1``, ``x2`` and tensor hyper-parameters of ``kfn``.

    Args:
        kfn: a :func:`~pyro_dkm.kernels.nngp.serial` network of Dense/Relu/Erf layers with
            scalar (float or 0-d tensor) hyper-parameters.
        x1: ``(n1, d)`` inputs; ``x2``: ``(n2, d)`` (default ``x1``).
        get: ``"nngp"`` or ``"ntk"``.
        noise: observation-noise variance added to the diagonal (square operators only).
        use_keops: ``True``, ``False`` or ``"auto"`` (as for :func:`keops_matmul`: KeOps on
            CUDA from ``threshold`` rows, the tiled torch product otherwise).
    """

    def __init__(self, *args, get: str = "nngp", noise=0.0, use_keops=None,
                 threshold: int | None = None, _prog=None, _sym=None):
        if _prog is None:  # public form: NNGPOperator(kfn, x1, x2=None, ...)
            if not 2 <= len(args) <= 3 or not isinstance(args[0], NNGPKernelFn):
                raise TypeError("NNGPOperator(kfn, x1, x2=None, *, get, noise, use_keops): kfn "
                                "must be a serial(...) kernel function")
            kfn, x1 = args[0], args[1]
            x2 = args[2] if len(args) == 3 else None
            _check_get(get)
            check_tensor(x1, "x1", ndim=2)
            sym = x2 is None or x2 is x1
            x2 = x1 if x2 is None else x2
            check_tensor(x2, "x2", ndim=2)
            if x2.shape[-1] != x1.shape[-1]:
                raise ValueError(f"x1 and x2 must have the same number of features, got "
                                 f"{x1.shape[-1]} and {x2.shape[-1]}")
            why = _keops_supported(kfn, x1, x2)
            if why:
                raise ValueError(f"NNGPOperator does not support {why}")
            _prog, _, _ = _program(kfn)
            theta = _hypers(kfn, x1)
            noise_t = noise if isinstance(noise, Tensor) else x1.new_tensor(float(noise))
            noise_t = noise_t.reshape(1).to(x1)
            if not bool(torch.isfinite(noise_t).all()) or bool((noise_t < 0).any()):
                raise ValueError(f"noise must be non-negative and finite, got {noise}")
            if not sym and bool(noise_t != 0):
                raise ValueError("noise is only allowed for a square K(x1, x1)")
            _sym = sym
        else:  # internal form (linear_operator's representation_tree)
            x1, x2, theta, noise_t = args
        super().__init__(x1, x2, theta, noise_t, get=get, use_keops=use_keops,
                         threshold=threshold, _prog=_prog, _sym=_sym)
        self.x1, self.x2, self.theta, self.noise = x1, x2, theta, noise_t
        self.prog, self.get, self.use_keops, self.threshold = _prog, get, use_keops, threshold
        self.sym = _sym

    @property
    def kernel_fn(self) -> NNGPKernelFn:
        return _rebuild(self.prog, self.theta)

    def _size(self) -> torch.Size:
        return torch.Size([self.x1.shape[0], self.x2.shape[0]])

    def _matmul(self, rhs: Tensor) -> Tensor:
        x2 = self.x1 if self.sym else self.x2
        out = keops_matmul(self.kernel_fn, self.x1, x2, rhs, get=self.get,
                           use_keops=self.use_keops, threshold=self.threshold)
        if self.sym:
            out = out + self.noise * rhs
        return out

    def _transpose_nonbatch(self) -> LinearOperator:
        if self.sym:
            return self
        return NNGPOperator(self.x2, self.x1, self.theta, self.noise, get=self.get,
                            use_keops=self.use_keops, threshold=self.threshold,
                            _prog=self.prog, _sym=False)

    def _diagonal(self) -> Tensor:
        if self.sym:
            d = self.kernel_fn(self.x1, diag=True, get=self.get)
            return d + self.noise
        return self.kernel_fn(self.x1, self.x2, diag=True, get=self.get)

    def _get_indices(self, row_index, col_index, *batch_indices):
        x1 = self.x1[row_index]
        x2 = self.x2[col_index]
        x1, x2 = torch.broadcast_tensors(x1, x2)
        vals = self.kernel_fn(x1, x2, diag=True, get=self.get)
        if self.sym:
            eq = torch.as_tensor(row_index, device=vals.device) == torch.as_tensor(
                col_index, device=vals.device)
            vals = vals + self.noise * eq.to(vals)
        return vals

    def to_dense(self) -> Tensor:
        K = self.kernel_fn(self.x1, None if self.sym else self.x2, get=self.get)
        if self.sym:
            K = K + self.noise * torch.eye(K.shape[-1], dtype=K.dtype, device=K.device)
        return K

    def _expand_batch(self, batch_shape: Sequence[int]):  # pragma: no cover
        raise NotImplementedError("NNGPOperator has no batch dimensions")


# --------------------------------------------------------------------------
# Solves: exact GP and Student-t process regression without materialising K
# --------------------------------------------------------------------------
