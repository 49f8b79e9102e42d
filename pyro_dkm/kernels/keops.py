r"""NNGP / NTK kernels as KeOps lazy reductions (O(N) memory kernel matrix products).

Every layer of a :func:`~pyro_dkm.kernels.nngp.serial` network acts elementwise on
(cross covariance, variance at x, variance at x'), so the whole depth-L kernel
:math:`K_{ij}` is a single symbolic KeOps formula in :math:`x_i \cdot x'_j`
plus per-point variances.  The per-point variances of every layer are cheap
(O(N)) and are computed in torch; only the cross terms go to KeOps::

    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(1.0, 0.0))
    Kv = keops_matmul(kfn, X, X, v)                  # K(X, X) @ v, never building K
    op = NNGPOperator(kfn, X, noise=0.1)             # linear_operator LinearOperator
    alpha = op.solve(y)                              # CG (linear_operator settings)

Numerical notes (see ``docs/keops.md``): non-integer powers are written as
products/sqrt (``x ** float`` lowers to float32 ``powf`` in KeOps); hyper-parameters
enter as a 1-D parameter vector (no rebuild when they change, gradients flow);
the ReLU form is the atan2 form of :func:`~pyro_dkm.kernels.nngp.relu_expectations`
with the same floor :math:`s^2 \ge \epsilon k_{11}k_{22}`; exact on-diagonal
closed forms are not written by the lazy path, which costs at most
:math:`\sqrt\epsilon/2\pi` relative error on coincident points (2e-9 in float64).

Without pykeops, for batched inputs/hyper-parameters, or when KeOps fails to
compile, everything falls back to the dense torch path with a warning.
"""

from __future__ import annotations

import math
import os
import warnings
from typing import Sequence

import torch
from torch import Tensor

from ..linalg import check_tensor
from .nngp import Dense, Erf, NNGPKernelFn, Relu

__all__ = [
    "keops_available",
    "set_keops_cache_dir",
    "keops_kernel",
    "keops_matmul",
    "NNGPOperator",
    "KeOpsFallbackWarning",
    "DEFAULT_KEOPS_THRESHOLD",
]

#: Below this many rows (of x1 and x2) the dense path is used by ``use_keops="auto"``.
#: On CPU KeOps and dense torch cost about the same per matvec; the lazy path wins
#: by memory (and by time once the dense matrix no longer fits in cache/RAM).
DEFAULT_KEOPS_THRESHOLD = 5000


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


# --------------------------------------------------------------------------
# Network description -> (program, hyper-parameter vector, per-point variances)
# --------------------------------------------------------------------------
def _program(kfn: NNGPKernelFn):
    """Layer codes: ('dense', k) / ('relu', a) / ('erf', a); raises TypeError otherwise."""
    prog, n_dense, n_act = [], 0, 0
    for layer in kfn.layers:
        if isinstance(layer, Dense):
            prog.append(("dense", n_dense))
            n_dense += 1
        elif isinstance(layer, Relu):
            prog.append(("relu", n_act))
            n_act += 1
        elif isinstance(layer, Erf):
            prog.append(("erf", n_act))
            n_act += 1
        else:
            raise TypeError(f"the KeOps path supports Dense, Relu and Erf layers, got "
                            f"{type(layer).__name__}")
    return tuple(prog), n_dense, n_act


def _scalar_hyper(value) -> bool:
    return not isinstance(value, Tensor) or value.dim() == 0 or value.numel() == 1


def _hypers(kfn: NNGPKernelFn, like: Tensor) -> Tensor:
    """(2 * n_dense,) tensor [w_0, b_0, w_1, b_1, ...] (keeps autograd)."""
    vals = []
    for layer in kfn.layers:
        if isinstance(layer, Dense):
            for v in (layer.weight_var, layer.bias_var):
                vals.append(v.reshape(()).to(like) if isinstance(v, Tensor)
                            else like.new_tensor(float(v)))
    if not vals:
        return like.new_zeros(1)
    return torch.stack(vals)


def _variances(prog, theta: Tensor, x: Tensor) -> Tensor:
    """Pre-activation variances at x for each activation, (n, max(n_act, 1))."""
    v = x.pow(2).sum(-1) / x.shape[-1]
    out = []
    for op, k in prog:
        if op == "dense":
            v = theta[2 * k + 1] + theta[2 * k] * v
        elif op == "relu":
            out.append(v)
            v = 0.5 * v
        else:  # erf, exact diagonal form
            out.append(v)
            v = (2 / math.pi) * torch.asin(2 * v / (1 + 2 * v))
    if not out:
        out.append(torch.zeros_like(v))
    return torch.stack(out, -1)


def _act_features(prog, var: Tensor) -> Tensor:
    """Per-point factors each activation needs: ReLU sqrt(eps) k (floor of s^2 is their
    product) and k; erf 1/sqrt(1 + 2k). Shape (n, 2 * n_act)."""
    eps = torch.finfo(var.dtype).eps
    cols = []
    for op, a in prog:
        if op == "relu":
            cols += [var[:, a], math.sqrt(eps) * var[:, a]]
        elif op == "erf":
            cols += [var[:, a], torch.rsqrt(1 + 2 * var[:, a])]
    if not cols:
        cols = [var[:, 0], var[:, 0]]
    return torch.stack(cols, -1).contiguous()


def _formula(prog, get: str, xi, yj, fi, fj, th, d: int, eps_clamp: float):
    """The symbolic kernel K_ij (a KeOps LazyTensor)."""
    cov = (xi | yj) / d
    ntk = None
    track = get == "ntk"
    for op, k in prog:
        if op == "dense":
            w, b = th[2 * k], th[2 * k + 1]
            cov = b + w * cov
            if track:
                ntk = cov if ntk is None else cov + w * ntk
        elif op == "relu":
            k11, k22 = fi[2 * k], fj[2 * k]
            floor = fi[2 * k + 1] * fj[2 * k + 1]  # eps * k11 * k22
            s = (floor + (k11 * k22 - cov * cov - floor).relu()).sqrt()
            dot = (math.pi - s.atan2(cov)) / (2 * math.pi)
            cov = s / (2 * math.pi) + dot * cov
            if track and ntk is not None:
                ntk = dot * ntk
        else:  # erf
            r = fi[2 * k + 1] * fj[2 * k + 1]  # 1 / sqrt((1+2k11)(1+2k22))
            s = (2 * cov * r).clamp(-1 + eps_clamp, 1 - eps_clamp)
            cov = (2 / math.pi) * s.asin()
            if track and ntk is not None:
                ntk = (4 / math.pi) * r * (1 - s * s).rsqrt() * ntk
    if track:
        if ntk is None:
            return 0 * cov
        return ntk
    return cov


def _check_get(get):
    if get not in ("nngp", "ntk"):
        raise ValueError(f"get must be 'nngp' or 'ntk' (one kernel per lazy operator), got "
                         f"{get!r}")


def _keops_supported(kfn, x1, x2) -> str | None:
    """Why the KeOps path cannot be used, or None."""
    if x1.dim() != 2 or x2.dim() != 2:
        return "batched inputs"
    for layer in kfn.layers:
        if isinstance(layer, Dense) and not (_scalar_hyper(layer.weight_var)
                                             and _scalar_hyper(layer.bias_var)):
            return "batched hyper-parameters"
    if x1.dtype not in (torch.float32, torch.float64):
        return f"dtype {x1.dtype}"
    return None


def keops_kernel(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None = None, *,
                 get: str = "nngp"):
    """The symbolic kernel matrix ``K(x1, x2)`` as a pykeops ``LazyTensor`` of shape
    ``(n1, n2)`` (2-D inputs, scalar hyper-parameters). Reduce it yourself, e.g.
    ``(K * LazyTensor(v[None, :, :])).sum(1)``. Raises ``RuntimeError`` without pykeops.
    """
    LT = _lazy_tensor_cls()
    if not LT:
        raise RuntimeError("pykeops is not available")
    _check_get(get)
    x2 = x1 if x2 is None else x2
    why = _keops_supported(kfn, x1, x2)
    if why:
        raise ValueError(f"the KeOps path does not support {why}")
    prog, _, _ = _program(kfn)
    theta = _hypers(kfn, x1)
    return _lazy_from(LT, prog, get, x1, x2, theta)


def _lazy_from(LT, prog, get, x1, x2, theta):
    f1 = _act_features(prog, _variances(prog, theta, x1))
    f2 = f1 if x2 is x1 else _act_features(prog, _variances(prog, theta, x2))
    # One i-variable and one j-variable ([x, features]): fewer variables means fewer
    # gradient formulas to compile (KeOps builds one per differentiated variable).
    d = x1.shape[-1]
    a1 = torch.cat([x1, f1], -1).contiguous()
    a2 = a1 if x2 is x1 else torch.cat([x2, f2], -1).contiguous()
    ai, aj = LT(a1[:, None, :]), LT(a2[None, :, :])
    xi, yj = ai[:d], aj[:d]
    fi, fj = ai[d:], aj[d:]
    th = LT(theta.contiguous())  # 1-D: a runtime parameter vector
    from .nngp import clamp_eps  # noqa: PLC0415

    return _formula(prog, get, xi, yj, fi, fj, th, x1.shape[-1], clamp_eps(x1.dtype))


def _dense_matmul(kfn, x1, x2, v, get, sym):
    return kfn(x1, None if sym else x2, get=get) @ v


_FAILED: set = set()


def keops_matmul(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None, v: Tensor, *,
                 get: str = "nngp", use_keops="auto",
                 threshold: int = DEFAULT_KEOPS_THRESHOLD) -> Tensor:
    """``K(x1, x2) @ v`` for ``v`` of shape ``(n2,)`` or ``(n2, m)``, differentiable
    w.r.t. ``x1``, ``x2``, ``v`` and tensor hyper-parameters.

    ``use_keops``: ``True`` (KeOps, warn and fall back to dense if impossible),
    ``False`` (dense), or ``"auto"`` (KeOps when both sizes ``>= threshold``).
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
    vec = v.dim() == 1
    if use_keops == "auto":
        use = min(x1.shape[-2], x2.shape[-2]) >= threshold
    elif isinstance(use_keops, bool):
        use = use_keops
    else:
        raise ValueError(f"use_keops must be True, False or 'auto', got {use_keops!r}")
    if use:
        why = _keops_supported(kfn, x1, x2) or (None if _lazy_tensor_cls() else "no pykeops")
        if why is None:
            prog, _, _ = _program(kfn)
            key = (prog, get, x1.shape[-1], 1 if vec else v.shape[-1], x1.dtype, x1.device.type)
            if key not in _FAILED:
                try:
                    theta = _hypers(kfn, x1)
                    K = _lazy_from(_lazy_tensor_cls(), prog, get, x1, x2 if not sym else x1,
                                   theta)
                    vv = v[:, None] if vec else v
                    out = (K * _lazy_tensor_cls()(vv.contiguous()[None, :, :])).sum(1)
                    return out[:, 0] if vec else out
                except Exception as err:  # compilation/runtime failure in KeOps
                    _FAILED.add(key)
                    warnings.warn(f"KeOps failed ({type(err).__name__}: {str(err)[:300]}); "
                                  f"using the dense torch path", KeOpsFallbackWarning,
                                  stacklevel=2)
        elif use_keops is True:
            warnings.warn(f"KeOps path unavailable ({why}); using the dense torch path",
                          KeOpsFallbackWarning, stacklevel=2)
    return _dense_matmul(kfn, x1, x2, v, get, sym)


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
    ``LinearOperator``, whose matrix products run through KeOps (O(N) memory).

    linear_operator's CG / Lanczos (``op.solve``, ``op.inv_quad_logdet``,
    ``gpytorch.settings``) then do exact GP regression without materialising K;
    gradients flow to ``x1``, ``x2`` and tensor hyper-parameters of ``kfn``.

    Args:
        kfn: a :func:`~pyro_dkm.kernels.nngp.serial` network of Dense/Relu/Erf layers with
            scalar (float or 0-d tensor) hyper-parameters.
        x1: ``(n1, d)`` inputs; ``x2``: ``(n2, d)`` (default ``x1``).
        get: ``"nngp"`` or ``"ntk"``.
        noise: observation-noise variance added to the diagonal (square operators only).
        use_keops: ``True``, ``False`` or ``"auto"`` (KeOps from ``threshold`` rows).
    """

    def __init__(self, *args, get: str = "nngp", noise=0.0, use_keops="auto",
                 threshold: int = DEFAULT_KEOPS_THRESHOLD, _prog=None, _sym=None):
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
