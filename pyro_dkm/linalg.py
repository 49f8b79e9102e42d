"""Numerically careful dense linear algebra for GP and DKM computations.

Everything here is batched over leading dimensions, takes its dtype and device
from its inputs, and never changes torch's global defaults.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "NotPositiveDefiniteError",
    "check_tensor",
    "check_positive",
    "cholesky",
    "solve_tril",
    "tril_solve",
    "cholesky_solve",
    "logdet_from_tril",
    "trace_inv_quad",
    "kl_zero_mean_gaussians",
    "kl_zero_mean_gaussians_taylor",
    "symmetrize",
    "sparse_gp_marginals",
    "nystrom_residual",
]


class NotPositiveDefiniteError(torch.linalg.LinAlgError):
    """A matrix stayed non-positive-definite after the largest jitter we try.

    Subclasses ``torch.linalg.LinAlgError``, so code that already catches
    torch's Cholesky failure keeps working.
    """

    def __init__(self, name: str, size: int, jitters: list[float], batch_failed: int = 1):
        self.name = name
        self.size = size
        self.jitters = list(jitters)
        tried = ", ".join(f"{j:.1e}" for j in jitters) if jitters else "none"
        msg = (
            f"{name} ({size} x {size}) is not positive definite: the Cholesky factorisation "
            f"failed for {batch_failed} matrix(es) in the batch even with jitter "
            f"(absolute, added to the diagonal) {tried}. Check it for negative eigenvalues, "
            f"NaNs or a float32 condition number beyond ~1e7."
        )
        super().__init__(msg)
        self._args = (name, size, jitters, batch_failed)

    def __reduce__(self):  # picklable across processes (DataLoader workers, DDP ranks)
        return (type(self), self._args)


def check_tensor(
    x,
    name: str,
    *,
    ndim: int | None = None,
    min_ndim: int | None = None,
    floating: bool = True,
    finite: bool = True,
) -> Tensor:
    """Validate a tensor argument and return it.

    Raises ``TypeError`` when ``x`` is not a tensor or (with ``floating``) not a
    floating-point tensor, and ``ValueError`` on a wrong number of dimensions or
    NaN/inf entries; every message names the argument.
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if floating and not x.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32 or float64), got dtype {x.dtype}; "
            f"convert it with .double()"
        )
    if ndim is not None and x.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {tuple(x.shape)}")
    if min_ndim is not None and x.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(x.shape)}"
        )
    if finite and not torch.isfinite(x).all():
        n_bad = int((~torch.isfinite(x)).sum())
        raise ValueError(f"{name} contains {n_bad} NaN or infinite value(s)")
    return x


def check_positive(value, name: str, *, allow_zero: bool = False):
    """Validate a positive (``allow_zero``: non-negative), finite hyper-parameter: a Python
    number (returned as ``float``) or a floating tensor (returned as is, every entry
    checked). ``TypeError`` for other types (``bool`` included), ``ValueError`` naming
    ``name`` for NaN, infinite or out-of-range values. The one checker of the package."""
    kind = "non-negative" if allow_zero else "positive"
    if isinstance(value, Tensor):
        if not value.is_floating_point():
            raise TypeError(f"{name} must be a {kind} float or floating-point tensor, got "
                            f"dtype {value.dtype}")
        v = value.detach()
        if bool(torch.isnan(v).any()):
            raise ValueError(f"{name} contains NaN (expected {kind}, finite values)")
        bad = (v < 0) if allow_zero else (v <= 0)
        if bool(bad.any()) or not bool(torch.isfinite(v).all()):
            shown = float(v) if v.numel() == 1 else v.cpu().numpy()
            raise ValueError(f"{name} must be {kind} and finite, got {shown}")
        return value
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a {kind} float, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v):
        raise ValueError(f"{name} contains NaN (expected a {kind}, finite value)")
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise ValueError(f"{name} must be {kind} and finite, got {v}")
    return v


def _check_square(A: Tensor, name: str) -> None:
    if A.dim() < 2 or A.shape[-1] != A.shape[-2]:
        raise ValueError(f"{name} must be a (batch of) square matrices (..., n, n), got shape "
                         f"{tuple(A.shape)}")


def _check_symmetric(A: Tensor, name: str) -> None:
    """``ValueError`` unless ``A`` is symmetric to rounding (relative ``1e-6`` of its largest
    entry): a Cholesky factorisation reads the lower triangle only, so a non-symmetric
    matrix would silently be replaced by the symmetric one of its lower triangle."""
    if A.shape[-1] < 2:
        return
    with torch.no_grad():
        asym = float((A - A.mT).abs().amax())
        scale = float(A.abs().amax())
    if asym > 1e-6 * scale:
        raise ValueError(f"{name} must be symmetric, got max |A - A^T| = {asym:.3g} "
                         f"({asym / scale:.1e} of its largest entry); symmetrise it, e.g. "
                         f"(A + A.mT) / 2, if that is what you mean")


def symmetrize(A: Tensor) -> Tensor:
    """(A + A^T) / 2 over the last two dimensions."""
    return 0.5 * (A + A.transpose(-1, -2))


def _default_jitter(dtype: torch.dtype) -> float:
    # Relative to the mean diagonal: a few hundred machine epsilons.
    return 1e-10 if dtype == torch.float64 else 1e-6


def cholesky(
    A: Tensor,
    *,
    jitter: float | None = None,
    max_tries: int = 6,
    growth: float = 10.0,
    name: str = "A",
    check: bool = True,
) -> Tensor:
    r"""Lower Cholesky factor of a (batch of) symmetric PSD matrices, adding
    jitter only where it is needed.

    First tries the plain factorisation. Matrices of the batch that fail get
    :math:`\epsilon_k \bar{a} I` added, with :math:`\bar{a}` the mean of their
    diagonal and :math:`\epsilon_k = \text{jitter}\cdot\text{growth}^k`,
    for ``k = 0 .. max_tries - 1``. Matrices that factorise on the first try are
    returned untouched.

    Args:
        A: ``(..., n, n)`` symmetric matrices (float32/float64).
        jitter: first relative jitter; default ``pyro_dkm.settings.cholesky_jitter``,
            else ``1e-10`` for float64, ``1e-6`` for float32.
        max_tries: number of escalating jitters before giving up.
        growth: factor between successive jitters.
        name: how error messages call ``A``.
        check: validate dtype/shape/finiteness of ``A``.

    Returns:
        ``L`` with ``L @ L.mT ~= A + jitter I``, shape ``(..., n, n)``.

    Raises:
        NotPositiveDefiniteError: still failing after ``max_tries`` jitters.
    """
    if check:
        check_tensor(A, name, min_ndim=2)
        _check_square(A, name)
        _check_symmetric(A, name)
    n = A.shape[-1]
    if n == 0:
        return A.clone()
    L, info = torch.linalg.cholesky_ex(A)
    if not bool((info > 0).any()):
        return L
    if jitter is None:
        from ._settings import settings

        jitter = settings.cholesky_jitter
    jitter = _default_jitter(A.dtype) if jitter is None else float(jitter)
    if jitter <= 0:
        raise ValueError(f"jitter must be positive, got {jitter}")
    # Find each matrix's jitter without autograd, then factorise once, differentiably:
    # routing gradients through torch.where over a failed factorisation gives NaN
    # gradients (0 * NaN) even though the forward value is finite.
    with torch.no_grad():
        diag_mean = A.diagonal(dim1=-2, dim2=-1).abs().mean(-1)  # (...)
        diag_mean = torch.where(diag_mean > 0, diag_mean, torch.ones_like(diag_mean))
        eye = torch.eye(n, dtype=A.dtype, device=A.device)
        failed = info > 0  # (...)
        added = torch.zeros_like(diag_mean)  # absolute jitter per matrix (0: none)
        tried = []
        for k in range(max_tries):
            eps = jitter * growth**k
            tried.append(eps)
            trial = torch.where(failed, eps * diag_mean, added)
            _, info_j = torch.linalg.cholesky_ex(A + trial[..., None, None] * eye)
            added = torch.where(failed, trial, added)
            failed = failed & (info_j > 0)
            if not bool(failed.any()):
                break
    if not bool(failed.any()):
        return torch.linalg.cholesky(A + added[..., None, None] * eye)
    abs_jitters = [e * float(diag_mean.detach().max()) for e in tried]
    raise NotPositiveDefiniteError(name, n, abs_jitters, int(failed.sum()))


def tril_solve(L: Tensor, B: Tensor, *, transpose: bool = False) -> Tensor:
    """:func:`solve_tril` without its checks: the package's inner loops, on factors it
    made itself (``cholesky``)."""
    if transpose:
        return torch.linalg.solve_triangular(L.mT, B, upper=True)
    return torch.linalg.solve_triangular(L, B, upper=False)


def solve_tril(L: Tensor, B: Tensor, *, transpose: bool = False) -> Tensor:
    """Solve ``L X = B`` (or ``L^T X = B`` with ``transpose``) for lower-triangular ``L``
    ``(..., n, n)`` and ``B`` ``(..., n, k)``. Raises ``ValueError`` for wrong shapes, a
    matrix with entries above the diagonal (it is not lower triangular: the solve would
    silently use its lower triangle) or a zero on the diagonal (singular)."""
    check_tensor(L, "L", min_ndim=2)
    check_tensor(B, "B", min_ndim=2)
    _check_square(L, "L")
    n = L.shape[-1]
    if B.shape[-2] != n:
        raise ValueError(f"B must have {n} rows (like L, {tuple(L.shape)}), got shape "
                         f"{tuple(B.shape)}; a vector b goes in as b[:, None]")
    if L.dtype != B.dtype:
        raise TypeError(f"L and B must have the same dtype, got {L.dtype} and {B.dtype}")
    upper = torch.triu(L, 1).abs()
    if n > 1 and bool((upper > 0).any()):
        raise ValueError(f"L must be lower triangular; it has entries above the diagonal "
                         f"(max |L_ij|, j > i: {float(upper.max()):.3g})")
    if bool((L.diagonal(dim1=-2, dim2=-1) == 0).any()):
        raise ValueError("L has a zero on its diagonal: the triangular system is singular")
    return tril_solve(L, B, transpose=transpose)


def cholesky_solve(L: Tensor, B: Tensor) -> Tensor:
    """Solve ``A X = B`` given the lower Cholesky factor ``L`` of ``A``."""
    return torch.cholesky_solve(B, L, upper=False)


def logdet_from_tril(L: Tensor) -> Tensor:
    """``log det(L L^T)`` from a lower-triangular factor, shape ``(...)``."""
    return 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def trace_inv_quad(L_K: Tensor, B: Tensor) -> Tensor:
    """``tr(K^-1 B B^T) = ||L_K^-1 B||_F^2`` for ``K = L_K L_K^T``."""
    return tril_solve(L_K, B).pow(2).sum((-1, -2))


def kl_zero_mean_gaussians(
    G: Tensor,
    K: Tensor,
    *,
    G_tril: Tensor | None = None,
    K_tril: Tensor | None = None,
) -> Tensor:
    r"""KL divergence between zero-mean Gaussians,

    .. math:: \mathrm{KL}(\mathcal N(0, G)\,\|\,\mathcal N(0, K))
              = \tfrac12\left[\operatorname{tr}(K^{-1}G) - \log\det(K^{-1}G) - P\right],

    computed with Cholesky factors (``tr(K^-1 G) = ||L_K^-1 L_G||_F^2``).

    Args:
        G: ``(..., P, P)`` covariance of the first Gaussian (may be ``None`` if
            ``G_tril`` is given).
        K: ``(..., P, P)`` covariance of the second (may be ``None`` if
            ``K_tril`` is given).
        G_tril, K_tril: optional precomputed lower Cholesky factors, used instead of
            factorising ``G``/``K`` (a learned Gram parameterised by its factor
            passes it here and skips a factorisation).

    Returns:
        ``(...)`` KL values, batch dimensions broadcast.
    """
    if G_tril is None:
        G_tril = cholesky(G, name="G")
    if K_tril is None:
        K_tril = cholesky(K, name="K")
    if G_tril.shape[-1] != K_tril.shape[-1]:
        raise ValueError(
            f"G and K must have the same size, got {G_tril.shape[-1]} and {K_tril.shape[-1]}"
        )
    P = G_tril.shape[-1]
    batch = torch.broadcast_shapes(G_tril.shape[:-2], K_tril.shape[:-2])
    K_b = K_tril.expand(batch + K_tril.shape[-2:])
    G_b = G_tril.expand(batch + G_tril.shape[-2:])
    trace = trace_inv_quad(K_b, G_b)
    return 0.5 * (trace - P + logdet_from_tril(K_tril) - logdet_from_tril(G_tril))


def kl_zero_mean_gaussians_taylor(
    G: Tensor,
    K: Tensor,
    *,
    G_tril: Tensor | None = None,
) -> Tensor:
    r"""Second-order (Taylor) approximation of :func:`kl_zero_mean_gaussians`,

    .. math:: \mathrm{KL} \approx \tfrac14 \operatorname{tr}\big[(G^{-1}K - I)^2\big]
              = \tfrac14 \| L_G^{-1} K L_G^{-T} - I \|_F^2 ,

    with :math:`G = L_G L_G^T`. It is exact to second order in :math:`K - G`,
    needs no log-determinant, and stays finite and smooth when :math:`G` is
    badly conditioned, which makes it a useful regulariser for small ``nu``.

    The whitened (symmetric) form equals :math:`\operatorname{tr}[(G^{-1}K-I)^2]`,
    the sum of squared eigenvalues of :math:`G^{-1}K - I`; it is never larger than
    the unsymmetrised :math:`\|G^{-1}K - I\|_F^2` and equals it when ``G`` and
    ``K`` commute (see ``docs/numerics.md``).
    """
    if G_tril is None:
        G_tril = cholesky(G, name="G")
    P = G_tril.shape[-1]
    batch = torch.broadcast_shapes(G_tril.shape[:-2], K.shape[:-2])
    L = G_tril.expand(batch + G_tril.shape[-2:])
    A = tril_solve(L, K.expand(batch + K.shape[-2:]))  # L^-1 K
    M = tril_solve(L, A.mT)  # L^-1 K L^-T  (symmetric)
    eye = torch.eye(P, dtype=M.dtype, device=M.device)
    return 0.25 * (M - eye).pow(2).sum((-1, -2))


def gaussian_log_marginal(L: Tensor, y: Tensor) -> Tensor:
    r"""``log N(y | 0, K)`` from the Cholesky factor ``L`` of ``K``.

    Args:
        L: ``(..., n, n)``.
        y: ``(..., n)``.
    """
    check_tensor(L, "L", min_ndim=2)
    check_tensor(y, "y", min_ndim=1)
    _check_square(L, "L")
    n = y.shape[-1]
    if L.shape[-1] != n:
        raise ValueError(f"y must have {L.shape[-1]} entries (the size of L, "
                         f"{tuple(L.shape)}), got shape {tuple(y.shape)}")
    alpha = tril_solve(L, y.unsqueeze(-1)).squeeze(-1)
    return -0.5 * alpha.pow(2).sum(-1) - 0.5 * logdet_from_tril(L) - 0.5 * n * math.log(2 * math.pi)


__all__.append("gaussian_log_marginal")


def sparse_gp_marginals(loc: Tensor, scale_tril: Tensor, W: Tensor, resid: Tensor
                        ) -> tuple[Tensor, Tensor]:
    r"""Marginals of a sparse GP's latent ``f`` at ``T`` points, for ``C`` channels:
    :math:`\mu_{tc} = m_c^T w_t`, :math:`v_{tc} = r_t + \|S_c^T w_t\|^2`, given the
    projection ``W`` ``(M, T)`` (``K_ii^{-1} K_it`` for ``q(u)``, ``L^{-1} K_it`` for a
    whitened ``q(v)``), ``q``'s ``loc`` ``(C, M)`` and ``scale_tril`` ``(M, M)`` (shared) or
    ``(C, M, M)``, and the conditional variance ``resid`` ``(T,)``. Returns ``(T, C)``
    each. Used by the DKM's output layer and the Student-t process classifiers."""
    mean = (loc @ W).mT  # (T, C)
    q = (scale_tril.mT @ W).pow(2).sum(-2)  # (T,) shared or (C, T)
    var = resid[:, None] + (q[:, None] if q.dim() == 1 else q.mT)
    return mean, var.expand_as(mean)


def nystrom_residual(k_tt: Tensor, A: Tensor) -> Tensor:
    r"""The conditional variance :math:`k_{tt} - \|a_t\|^2` ``(T,)`` of a sparse GP
    (``A = L^{-1} K_{it}`` ``(M, T)``), floored at its rounding level
    :math:`\epsilon\,k_{tt}`: cancellation can make it negative, and an exact zero (at an
    inducing input) would give an infinite gradient of its square root. The one floor
    used by the DKM (its Gram propagation and output layer) and the classifiers."""
    return torch.maximum(k_tt - A.pow(2).sum(-2), torch.finfo(k_tt.dtype).eps * k_tt.detach())
