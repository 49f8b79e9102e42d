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

import functools
import math
import os
import warnings
from typing import Sequence

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..linalg import check_tensor
from .nngp import Dense, Erf, NNGPKernelFn, Relu, clamp_eps

__all__ = [
    "keops_available",
    "cg_solve",
    "inv_quad",
    "exact_predict",
    "set_keops_cache_dir",
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
    """Per-point factors each activation needs: ReLU k and sqrt(eps) k (the floor of s^2 is
    their product), erf k and 1/sqrt(1 + 2k). Shape (n, 2 * max(n_act, 1))."""
    eps = torch.finfo(var.dtype).eps
    cols = []
    for op, a in prog:
        if op == "relu":
            cols += [var[:, a], math.sqrt(eps) * var[:, a]]
        elif op == "erf":
            cols += [var[:, a], torch.rsqrt(1 + 2 * var[:, a])]
    if not cols:
        cols = [var[:, 0], var[:, 0]]
    return torch.stack(cols, -1)


def _points(prog, theta: Tensor, x: Tensor, index: Tensor) -> Tensor:
    """Per-point KeOps variable [x, index, features], (n, d + 1 + n_features)."""
    f = _act_features(prog, _variances(prog, theta, x))
    return torch.cat([x, index[:, None].to(x), f], -1).contiguous()


def _constants(d: int, like: Tensor) -> Tensor:
    eps = clamp_eps(like.dtype)
    return like.new_tensor([1 / d, math.pi, 1 / (2 * math.pi), 1 / (4 * math.pi), 2 / math.pi,
                            -1 + eps, 1 - eps])


# --------------------------------------------------------------------------
# Formula text: one pair (i, j) of the kernel, with explicit let-bindings
# --------------------------------------------------------------------------
# KeOps formulas are trees: a sub-formula used twice is computed twice, and KeOps'
# symbolic gradient of a depth-3 network grows to tens of MB of C++. We therefore write
# the formula text ourselves: every shared intermediate is bound once to a KeOps
# temporary (``Factorize_Impl``, see :class:`_Text`), so the
# generated code is linear in depth, and the gradients are hand-derived formulas
# (reverse mode through the layer recursion) of the same compact form.
#
# Variables: A = Vi(0, D) and B = Vj(1, D) hold per point [x (d), index (1), features];
# T = Pm(2, P) the Dense hyper-parameters [w_0, b_0, w_1, b_1, ...]; C = Pm(3, 7) constants
# (floats cannot appear in KeOps formula text). Features per activation k (two columns):
# ReLU (k, sqrt(eps) k), erf (k, (1 + 2k)^-1/2), k the pre-activation variance.
_C_INVD, _C_PI, _C_1_2PI, _C_1_4PI, _C_2_PI, _C_LO, _C_HI = range(7)


class _Text:
    """Formula text with let-bindings: ``let(expr)`` returns a name bound to ``expr``.

    ``build(body)`` binds each name to a placeholder temporary variable and wraps ``body``
    in nested ``_PyroDkmLet(f, g, v)`` = KeOps' ``Factorize_Impl`` ("f with v = g"; g is
    evaluated once). We build these directly: KeOps' public ``Factorize(f, g)`` searches
    ``f`` for copies of ``g`` with a tree walk that is exponential in the nesting depth
    (minutes of Python for a depth-3 NTK gradient).
    """

    def __init__(self):
        self.binds: list[tuple[str, str]] = []

    def let(self, expr: str) -> str:
        if expr.isidentifier() or expr.startswith("IntCst("):
            return expr  # nothing to share
        name = f"_t{len(self.binds)}"
        self.binds.append((name, expr))
        return name

    def build(self, body: str) -> str:
        # All bound values are scalars: placeholders Var(-k-1, 1, 3) (category 3 = temporary).
        for name, expr in reversed(self.binds):  # the first binding is evaluated first
            body = f"_PyroDkmLet({body},{expr},{name})"
        holders = "".join(f"({n}:=Var({-k - 1},1,3))," for k, (n, _) in enumerate(self.binds))
        return f"[{holders}{body}][-1]" if self.binds else body


def _install_let():
    """Make ``_PyroDkmLet`` (KeOps' ``Factorize_Impl``) visible to KeOps' formula parser."""
    import sys  # noqa: PLC0415

    import keopscore.formulas  # noqa: PLC0415
    import keopscore.formulas.GetReduction  # noqa: F401, PLC0415
    from keopscore.formulas.factorization.Factorize import Factorize_Impl  # noqa: PLC0415

    vars(sys.modules["keopscore.formulas.GetReduction"])["_PyroDkmLet"] = Factorize_Impl
    keopscore.formulas._PyroDkmLet = Factorize_Impl  # known to KeOps' formula checker


def _el(var: str, k: int) -> str:
    return f"Elem({var},{k})"


def _c(k: int) -> str:
    return f"Elem(C,{k})"


def _add(*terms):
    terms = [t for t in terms if t is not None]
    return None if not terms else "(" + "+".join(terms) + ")"


def _pair_forward(tx: _Text, prog, get: str, d: int):
    """Bind the forward recursion for one pair; returns (value, tape)."""
    c = tx.let(f"((Extract(A,0,{d})|Extract(B,0,{d}))*{_c(_C_INVD)})")
    t, tape, off = None, [], d + 1
    track = get == "ntk"
    for op, k in prog:
        if op == "dense":
            w, b = _el("T", 2 * k), _el("T", 2 * k + 1)
            c_new = tx.let(f"({b}+{w}*{c})")
            t_new = None
            if track:
                t_new = c_new if t is None else tx.let(f"({c_new}+{w}*{t})")
            tape.append(("dense", k, c, t, {}))
        elif op == "relu":
            e1, e2 = _el("A", off + 2 * k + 1), _el("B", off + 2 * k + 1)
            k11, k22 = _el("A", off + 2 * k), _el("B", off + 2 * k)
            fl = tx.let(f"({e1}*{e2})")  # eps k11 k22: floor of s^2
            a = tx.let(f"({k11}*{k22}-Square({c})-{fl})")
            s = tx.let(f"Sqrt({fl}+ReLU({a}))")
            dot = tx.let(f"(({_c(_C_PI)}-Atan2({s},{c}))*{_c(_C_1_2PI)})")
            c_new = tx.let(f"({s}*{_c(_C_1_2PI)}+{dot}*{c})")
            t_new = tx.let(f"({dot}*{t})") if track and t is not None else None
            tape.append(("relu", k, c, t, dict(a=a, s=s, dot=dot, k22=k22, e2=e2)))
        else:  # erf
            r = tx.let(f"({_el('A', off + 2 * k + 1)}*{_el('B', off + 2 * k + 1)})")
            z = tx.let(f"(2*{c}*{r})")
            u = tx.let(f"Clamp({z},{_c(_C_LO)},{_c(_C_HI)})")
            g1 = tx.let(f"({_c(_C_2_PI)}*Rsqrt(1-Square({u})))")  # d c_new / d u
            c_new = tx.let(f"({_c(_C_2_PI)}*Asin({u}))")
            t_new = dot = None
            if track and t is not None:
                dot = tx.let(f"(2*{r}*{g1})")
                t_new = tx.let(f"({dot}*{t})")
            tape.append(("erf", k, c, t, dict(r=r, z=z, u=u, g1=g1, dot=dot,
                                              r2=_el("B", off + 2 * k + 1))))
        c, t = c_new, t_new
    return (t if track else c), tape


def _pair_backward(tx: _Text, tape, get: str, d: int, nf: int, n_theta: int) -> str:
    """Bind the reverse sweep; returns the per-pair gradient vector
    [dF/dc0 * y / d (d), dF/dfeatures_i (nf), dF/dtheta (n_theta)]."""
    cb, tb = ("IntCst(1)", None) if get == "nngp" else (None, "IntCst(1)")  # adjoints of (cov, ntk)
    fbar: list = [None] * nf
    thbar: list = [None] * n_theta
    for op, k, c, t, v in reversed(tape):
        if op == "dense":
            w = _el("T", 2 * k)
            if tb is not None:  # ntk_out = cov_out + w ntk_in (or cov_out on the first Dense)
                cb = _add(cb, tb)
                if t is not None:
                    thbar[2 * k] = _add(thbar[2 * k], f"({tb}*{t})")
                    tb = tx.let(f"({w}*{tb})")
                else:
                    tb = None
            if cb is not None:  # cov_out = b + w cov_in
                cb = tx.let(cb)
                thbar[2 * k + 1] = _add(thbar[2 * k + 1], cb)
                thbar[2 * k] = _add(thbar[2 * k], f"({cb}*{c})")
                cb = tx.let(f"({w}*{cb})")
        elif op == "relu":
            s, dot, a = v["s"], v["dot"], v["a"]
            st = tx.let(f"(1-Step(-{a}))")  # 1 where s^2 = k11 k22 - c^2 is above its floor
            den = tx.let(f"(Square({s})+Square({c}))")
            p = tx.let(f"({s}/{den})")
            # x: the common factor of the derivatives w.r.t. k11 and eps k11
            terms_c, x = [], None
            if cb is not None:
                terms_c.append(f"({cb}*({dot}+(1-{st})*{c}*{p}*{_c(_C_1_2PI)}))")
                x = f"({cb}*{p})"
            if tb is not None and t is not None:
                rr = tx.let(f"Inv({s}*{den})")
                tt = tx.let(f"({tb}*{t})")
                terms_c.append(f"({tt}*(Square({s})+{st}*Square({c}))*{rr}*{_c(_C_1_2PI)})")
                x = _add(x, f"(-{tt}*{c}*{rr})")
                tb = tx.let(f"({tb}*{dot})")
            else:
                tb = None
            if x is not None:
                x = tx.let(f"({x}*{_c(_C_1_4PI)})")
                fbar[2 * k] = _add(fbar[2 * k], f"({st}*{v['k22']}*{x})")
                fbar[2 * k + 1] = _add(fbar[2 * k + 1], f"((1-{st})*{v['e2']}*{x})")
            cb = tx.let(_add(*terms_c)) if terms_c else None
        else:  # erf
            r, z, u, g1, dot = v["r"], v["z"], v["u"], v["g1"], v["dot"]
            inr = tx.let(f"Step({_c(_C_HI)}-Abs({z}))")  # clamp inactive
            ub, rb = [], []
            if cb is not None:
                ub.append(f"({cb}*{g1})")
            if tb is not None and t is not None:
                tt = tx.let(f"({tb}*{t})")
                ub.append(f"({tt}*{dot}*{u}/(1-Square({u})))")
                rb.append(f"(2*{tt}*{g1})")
                tb = tx.let(f"({tb}*{dot})")
            else:
                tb = None
            if ub:
                ubar = tx.let(f"({_add(*ub)}*{inr})")
                rb.append(f"(2*{ubar}*{c})")
                cb = tx.let(f"(2*{ubar}*{r})")
            else:
                cb = None
            if rb:
                fbar[2 * k + 1] = _add(fbar[2 * k + 1], f"({_add(*rb)}*{v['r2']})")
    parts = [f"({cb}*{_c(_C_INVD)})*Extract(B,0,{d})" if cb is not None else f"Zero({d})"]
    parts += [f if f is not None else "Zero(1)" for f in fbar]
    parts += [f if f is not None else "Zero(1)" for f in thbar]
    vec = parts[0]
    for p_ in parts[1:]:
        vec = f"Concat({vec},{p_})"
    return vec


@functools.lru_cache(maxsize=64)
def _formulas(prog, get: str, d: int, backward: bool) -> str:
    tx = _Text()
    value, tape = _pair_forward(tx, prog, get, d)
    mask = f"NotEqual(Elem(A,{d}),Elem(B,{d}))"  # 0 on the diagonal of K(X, X)
    if not backward:
        return tx.build(f"(({mask}*{value})*V)")
    n_theta = max(2 * sum(op == "dense" for op, _ in prog), 1)
    nf = 2 * max(sum(op != "dense" for op, _ in prog), 1)
    vec = _pair_backward(tx, tape, get, d, nf, n_theta)
    return tx.build(f"(({mask}*(G|V))*{vec})")


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


def _pair_torch(spec, A: Tensor, B: Tensor, T: Tensor, C: Tensor) -> Tensor:
    """The same pair formula as the KeOps one, in torch, for (na, 1, D) x (1, nb, D)."""
    prog, get, d = spec
    off = d + 1
    c = (A[..., :d] * B[..., :d]).sum(-1) * C[_C_INVD]
    t = None
    for op, k in prog:
        if op == "dense":
            w, b = T[2 * k], T[2 * k + 1]
            c = b + w * c
            if get == "ntk":
                t = c if t is None else c + w * t
        elif op == "relu":
            fl = A[..., off + 2 * k + 1] * B[..., off + 2 * k + 1]
            a = A[..., off + 2 * k] * B[..., off + 2 * k] - c * c - fl
            s = (fl + a.relu()).sqrt()
            dot = (C[_C_PI] - torch.atan2(s, c)) * C[_C_1_2PI]
            c, t = s * C[_C_1_2PI] + dot * c, None if t is None else dot * t
        else:
            r = A[..., off + 2 * k + 1] * B[..., off + 2 * k + 1]
            u = (2 * c * r).clamp(-1 + clamp_eps(c.dtype), 1 - clamp_eps(c.dtype))
            g1 = C[_C_2_PI] * torch.rsqrt(1 - u * u)
            c, t = C[_C_2_PI] * torch.asin(u), None if t is None else 2 * r * g1 * t
    out = t if get == "ntk" else c
    return out * (A[..., d] != B[..., d]).to(out)


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


def _dense_matmul(kfn, x1, x2, v, get, sym):
    return kfn(x1, None if sym else x2, get=get) @ v


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


def keops_matmul(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None, v: Tensor, *,
                 get: str = "nngp", use_keops="auto",
                 threshold: int = DEFAULT_KEOPS_THRESHOLD) -> Tensor:
    """``K(x1, x2) @ v`` for ``v`` of shape ``(n2,)`` or ``(n2, m)``, differentiable
    w.r.t. ``x1``, ``x2``, ``v`` and tensor hyper-parameters.

    ``use_keops``: ``True`` (KeOps, warn and fall back to dense if impossible),
    ``False`` (dense), or ``"auto"`` (KeOps when both sizes ``>= threshold``).
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
    vec = v.dim() == 1
    if use_keops == "auto":
        use = min(x1.shape[-2], x2.shape[-2]) >= threshold
    elif isinstance(use_keops, bool):
        use = use_keops
    else:
        raise ValueError(f"use_keops must be True, False or 'auto', got {use_keops!r}")
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


# --------------------------------------------------------------------------
# Solves: exact GP and Student-t process regression without materialising K
# --------------------------------------------------------------------------
def _pivoted_cholesky(kfn, x: Tensor, get: str, rank: int) -> Tensor:
    """Rank-``rank`` pivoted Cholesky factor ``L`` (rank, n) with ``K ~ L^T L``, from
    ``rank`` kernel rows (O(n rank) memory and time)."""
    d = kfn(x, diag=True, get=get).clone()
    rows = []
    for _ in range(min(rank, x.shape[0])):
        i = int(torch.argmax(d))
        if d[i] <= 1e-12 * d.abs().max():
            break
        r = kfn(x[i:i + 1], x, get=get)[0]
        if rows:
            Lm = torch.stack(rows)
            r = r - Lm[:, i] @ Lm
        rows.append(r / d[i].sqrt())
        d = d - rows[-1] ** 2
    return torch.stack(rows) if rows else x.new_zeros(0, x.shape[0])


def cg_solve(op: LinearOperator, rhs: Tensor, *, tol: float = 1e-6, max_iter: int = 1000,
             precond_rank: int = 0, info: dict | None = None) -> Tensor:
    """``op^{-1} rhs`` by conjugate gradients (never Cholesky), ``rhs`` ``(n,)`` or ``(n, m)``.

    For a square :class:`NNGPOperator` with ``noise > 0`` (``K + s I``) this is our own
    float64-exact preconditioned CG, run until every column's residual is below ``tol``
    times its right-hand side's norm; ``precond_rank > 0`` preconditions with
    ``L^T L + s I``, ``L`` a rank-``precond_rank`` pivoted Cholesky factor of K (rows of K
    in torch, O(n rank) memory). ``info`` (a dict) receives ``iterations`` and
    ``residual``. Any other ``LinearOperator`` is solved by ``op.solve`` under
    linear_operator's CG settings (its CG stops near 1e-5 relative error in float64).
    """
    vec = rhs.dim() == 1
    b = rhs[:, None] if vec else rhs
    if not (isinstance(op, NNGPOperator) and op.sym and bool(op.noise > 0)):
        import linear_operator  # noqa: PLC0415

        with linear_operator.settings.max_cg_iterations(max_iter), \
                linear_operator.settings.cg_tolerance(tol), \
                linear_operator.settings.max_cholesky_size(0), \
                linear_operator.settings.max_preconditioner_size(precond_rank), \
                linear_operator.settings.min_preconditioning_size(
                    0 if precond_rank else 10 ** 12):
            out = op.solve(b)
        return out[:, 0] if vec else out
    s = op.noise.reshape(())
    if precond_rank > 0:
        L = _pivoted_cholesky(op.kernel_fn, op.x1, op.get, precond_rank)  # (k, n)
        C = torch.linalg.cholesky(s * torch.eye(L.shape[0], dtype=L.dtype, device=L.device)
                                  + L @ L.mT)

        def precond(r):  # (L^T L + s I)^-1 r by Woodbury
            return (r - L.mT @ torch.cholesky_solve(L @ r, C)) / s
    else:
        def precond(r):
            return r
    x = torch.zeros_like(b)
    r = b.clone()
    z = precond(r)
    p = z
    rz = (r * z).sum(0)
    bnorm = b.norm(dim=0).clamp_min(torch.finfo(b.dtype).tiny)
    it, res = 0, 1.0
    while it < max_iter:
        it += 1
        Ap = op._matmul(p)
        alpha = rz / (p * Ap).sum(0)
        x = x + alpha * p
        r = r - alpha * Ap
        res = float((r.norm(dim=0) / bnorm).max())
        if res <= tol:
            break
        z = precond(r)
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz) * p
        rz = rz_new
    if info is not None:
        info.update(iterations=it, residual=res)
    if res > tol:
        warnings.warn(f"CG stopped after {max_iter} iterations with relative residual "
                      f"{res:.2e} > tol {tol:.1e}", RuntimeWarning, stacklevel=2)
    return x[:, 0] if vec else x


def inv_quad(op: LinearOperator, y: Tensor, **cg) -> Tensor:
    """``y^T op^{-1} y`` per column of ``y`` (``(n,)`` or ``(n, m)``) from one CG solve
    (``cg``: the keyword arguments of :func:`cg_solve`). This is the only data term the
    Student-t process posterior needs: ``b' = b + y^T K_y^{-1} y / 2``."""
    return (y * cg_solve(op, y, **cg)).sum(0)


def exact_predict(kfn: NNGPKernelFn, x: Tensor, y: Tensor, x_test: Tensor, *, noise: float,
                  get: str = "nngp", variance: bool = False, block: int = 16, **cg):
    r"""Exact GP regression with the lazy kernel: only matrix products with K, O(N) memory.

    Returns ``(mean, var, quad)``: the posterior mean :math:`K_*^T K_y^{-1} y`
    ``(n_test,)``; with ``variance=True`` the latent variance
    :math:`k_{**} - k_*^T K_y^{-1} k_*` ``(n_test,)`` (one block CG solve per ``block`` test
    points; else ``None``); and :math:`y^T K_y^{-1} y` (scalar), with
    :math:`K_y = K(x, x) + \text{noise}\, I`. ``cg``: keyword arguments of
    :func:`cg_solve`.

    The Student-t process with an InvGamma(a, b) scale prior has the same mean, and
    predictive ``StudentT(df=2a + n, mean, scale^2 = (b + quad/2) / (a + n/2) * var)``
    (noise included in the kernel, DESIGN.md §3): every data term is a solve.
    """
    check_tensor(y, "y", ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one entry per row of x ({x.shape[0]}), got {y.shape[0]}")
    op = NNGPOperator(kfn, x, get=get, noise=noise, use_keops=True)
    alpha = cg_solve(op, y, **cg)
    quad = (y * alpha).sum()
    mean = keops_matmul(kfn, x_test, x, alpha, get=get, use_keops=True)
    var = None
    if variance:
        parts = []
        for i in range(0, x_test.shape[0], block):
            xb = x_test[i:i + block]
            # K(x, xb): n x block, by the transpose product K(xb, x) @ I (one KeOps build)
            kb = keops_matmul(kfn, x, xb, torch.eye(len(xb), block, dtype=x.dtype,
                                                     device=x.device), get=get, use_keops=True)
            sol = cg_solve(op, kb, **cg)
            kss = kfn(xb, diag=True, get=get)
            parts.append(kss - (kb * sol).sum(0)[:len(xb)])
        var = torch.cat(parts).clamp_min(0)
    return mean, var, quad
