"""KeOps formula text for the NNGP/NTK kernels of serial networks, and its gradient.

Private helper of :mod:`pyro_dkm.kernels.keops`: a network description becomes a
program of layer codes, per-point KeOps variables ``[x, index, features]``, and the
formula text of one kernel entry K_ij (and of its hand-derived gradient) with every
shared intermediate let-bound once, plus the same pair formula in torch (the reference
for the chunked-gradient fallback).
"""

from __future__ import annotations

import functools
import math

import torch
from torch import Tensor

from .nngp import Dense, Erf, NNGPKernelFn, Relu, clamp_eps


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
