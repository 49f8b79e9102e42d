"""Solves with lazy NNGP kernel operators: the pivoted-Cholesky preconditioner, our
float64-exact preconditioned conjugate gradients, quadratic forms and exact GP prediction
at sizes where K is never held whole (products by :func:`~.keops.keops_matmul`)."""

from __future__ import annotations

import sys
import warnings

import torch
from linear_operator.operators import LinearOperator
from torch import Tensor

from ..linalg import check_tensor
from .keops import NNGPOperator, keops_matmul
from .nngp import NNGPKernelFn

__all__ = ["cg_solve", "inv_quad", "exact_predict"]


def _pivoted_cholesky(kfn, x: Tensor, get: str, rank: int) -> Tensor:
    """Rank-``rank`` pivoted Cholesky factor ``L`` (rank, n) with ``K ~ L^T L``, from
    ``rank`` kernel rows (O(n rank) memory, O(n rank^2) time)."""
    d = kfn(x, diag=True, get=get).clone()
    rank = min(rank, x.shape[0])
    L = x.new_zeros(rank, x.shape[0])
    k = 0
    while k < rank:
        i = int(torch.argmax(d))
        if d[i] <= 1e-12 * d.abs().max():
            break
        r = kfn(x[i:i + 1], x, get=get)[0]
        if k:
            r = r - L[:k, i] @ L[:k]
        L[k] = r / d[i].sqrt()
        d = d - L[k] ** 2
        k += 1
    return L[:k]


def cg_solve(op: LinearOperator, rhs: Tensor, *, tol: float | None = None, max_iter: int = 1000,
             precond_rank: int = 0, info: dict | None = None, progress: bool = False) -> Tensor:
    """``op^{-1} rhs`` by conjugate gradients (never Cholesky), ``rhs`` ``(n,)`` or ``(n, m)``.

    For a square :class:`NNGPOperator` with ``noise > 0`` (``K + s I``) this is our own
    float64-exact preconditioned CG, run until every column's residual is below ``tol``
    times its right-hand side's norm; ``precond_rank > 0`` preconditions with
    ``L^T L + s I``, ``L`` a rank-``precond_rank`` pivoted Cholesky factor of K (rows of K
    in torch, O(n rank) memory). ``info`` (a dict) receives ``iterations`` and
    ``residual``; ``progress``: a tqdm bar on stderr (one step per product with K, the
    relative residual as postfix). Any other ``LinearOperator`` is solved by ``op.solve`` under
    linear_operator's CG settings (its CG stops near 1e-5 relative error in float64).
    """
    if tol is None:
        from .._settings import settings

        tol = settings.cg_tol
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
    bar = None
    if progress:
        from tqdm.auto import tqdm  # noqa: PLC0415

        bar = tqdm(total=max_iter, file=sys.stderr, desc="CG", leave=False)
    while it < max_iter:
        it += 1
        Ap = op._matmul(p)
        alpha = rz / (p * Ap).sum(0)
        x = x + alpha * p
        r = r - alpha * Ap
        res = float((r.norm(dim=0) / bnorm).max())
        if bar is not None:
            bar.update(1)
            bar.set_postfix(residual=f"{res:.2e}")
        if res <= tol:
            break
        z = precond(r)
        rz_new = (r * z).sum(0)
        p = z + (rz_new / rz) * p
        rz = rz_new
    if bar is not None:
        bar.close()
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
                  get: str = "nngp", variance: bool = False, block: int = 16,
                  use_keops=None, **cg):
    r"""Exact GP regression with the lazy kernel: only matrix products with K, O(N) memory.

    Returns ``(mean, var, quad)``: the posterior mean :math:`K_*^T K_y^{-1} y`
    ``(n_test,)``; with ``variance=True`` the latent variance
    :math:`k_{**} - k_*^T K_y^{-1} k_*` ``(n_test,)`` (one block CG solve per ``block`` test
    points; else ``None``); and :math:`y^T K_y^{-1} y` (scalar), with
    :math:`K_y = K(x, x) + \text{noise}\, I`. ``use_keops``: as for
    :func:`keops_matmul` (``"auto"``: KeOps on CUDA, tiled torch on CPU, where it is
    faster). ``cg``: keyword arguments of :func:`cg_solve`.

    The Student-t process with an InvGamma(a, b) scale prior has the same mean, and
    predictive ``StudentT(df=2a + n, mean, scale^2 = (b + quad/2) / (a + n/2) * var)``
    (noise included in the kernel, docs/processes.md): every data term is a solve.
    """
    check_tensor(y, "y", ndim=1)
    if y.shape[0] != x.shape[0]:
        raise ValueError(f"y must have one entry per row of x ({x.shape[0]}), got {y.shape[0]}")
    op = NNGPOperator(kfn, x, get=get, noise=noise, use_keops=use_keops)
    alpha = cg_solve(op, y, **cg)
    quad = (y * alpha).sum()
    mean = keops_matmul(kfn, x_test, x, alpha, get=get, use_keops=use_keops)
    var = None
    if variance:
        parts = []
        for i in range(0, x_test.shape[0], block):
            xb = x_test[i:i + block]
            # K(x, xb): n x block, by the product K(x, xb) @ I (one KeOps build)
            kb = keops_matmul(kfn, x, xb, torch.eye(len(xb), block, dtype=x.dtype,
                                                     device=x.device), get=get, use_keops=use_keops)
            sol = cg_solve(op, kb, **cg)
            kss = kfn(xb, diag=True, get=get)
            parts.append(kss - (kb * sol).sum(0)[:len(xb)])
        var = torch.cat(parts).clamp_min(0)
    return mean, var, quad
