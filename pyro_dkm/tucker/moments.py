"""Expected sufficient statistics of the FunBaT likelihood, grouped by unique coordinate.

Pure functions behind one CEP sweep of :class:`~pyro_dkm.tucker.FunctionalTucker`.
Factors are stored per mode at the sorted unique coordinates: ``u_mean[k]``,
``u_var[k]`` (R_k, U_k) posterior means and variances, ``idx[k]`` (N,) the unique-
coordinate id of each entry. Under the factorised posterior, with
:math:`S_j(n) = E[u^j(i_{nj}) u^j(i_{nj})^T] = m m^T + \\mathrm{diag}(v)`:

* the message to the factors of mode k at unique coordinate u needs only
  :math:`X_u = \\sum_{n: i_{nk} = u} \\bigotimes_{j \\ne k} S_j(n)` and
  :math:`g_u = \\sum_{n: i_{nk} = u} y_n \\bigotimes_{j \\ne k} m_j(n)`, because all
  entries at u share the same state of mode k; then
  :math:`E[a a^T]_u = E[W_{(k)} X_u W_{(k)}^T]` (exact, full core covariance) and
  :math:`E[a]^T y = M_{(k)} g_u`;
* the core statistics :math:`\\sum_n \\bigotimes_k S_k(n)` are
  :math:`\\sum_u S_{k^*}(u) \\otimes X^{(k^*)}_u` for the mode :math:`k^*` with the fewest
  unique coordinates.

Cost per sweep O(N Q^2) for the scatter-adds (Q = prod_{j != k} R_j; CP: O(N R^2)) plus
O(sum_k U_k R_k^2 Q^2) for the contractions: linear in N, no Python loop over entries.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["grouped_moments", "factor_statistics", "factor_messages", "core_statistics"]

_CHUNK_ELEMS = 2**19  # elements per temporary: small chunks stay in cache (~4 MB float64)


def _second(m: Tensor, v: Tensor) -> Tensor:
    """E[u u^T] = m m^T + diag(v) per row: (n, R) -> (n, R, R)."""
    return m[:, :, None] * m[:, None, :] + torch.diag_embed(v)


def _combine(X: Tensor, z: Tensor, S: Tensor, m: Tensor, cp: bool):
    """Kronecker (Tucker) or elementwise (CP) product of running moments with one more mode."""
    if cp:
        return X * S, z * m
    n, a, _ = X.shape
    c = S.shape[-1]
    X = (X[:, :, None, :, None] * S[:, None, :, None, :]).reshape(n, a * c, a * c)
    return X, (z[:, :, None] * m[:, None, :]).reshape(n, a * c)


def _chunk_size(Q: int) -> int:
    return max(16, _CHUNK_ELEMS // (Q * Q))


def grouped_moments(u_mean, u_var, idx, y: Tensor, k: int, *, cp: bool = False):
    """``X_u`` (U_k, Q, Q), ``g_u`` (U_k, Q) for mode ``k`` and the order of the other modes.

    ``Q = prod_{j != k} R_j`` (Tucker; Kronecker order = the returned ``order``, first
    slowest) or ``R`` (CP, elementwise products). With a single mode, ``Q = 1`` (Tucker)
    and the moments are counts and sums of ``y``.

    The entries are first grouped by (coordinate of mode k, coordinate of the other mode
    j0 with the fewest unique coordinates): the moments of the remaining modes are
    scatter-added per pair (O(N Q'^2), Q' = Q / R_j0), then multiplied by the pair's
    ``S_j0`` and scatter-added per coordinate of mode k (O(#pairs Q^2), #pairs <= N).
    """
    K = len(u_mean)
    others = [j for j in range(K) if j != k]
    U = u_mean[k].shape[1]
    N = y.shape[0]
    if not others:
        Q = u_mean[k].shape[0] if cp else 1
        cnt = y.new_zeros(U).index_add_(0, idx[k], y.new_ones(N))
        ysum = y.new_zeros(U).index_add_(0, idx[k], y)
        return cnt[:, None, None].expand(U, Q, Q).clone(), ysum[:, None].expand(U, Q).clone(), []
    j0 = min(others, key=lambda j: u_mean[j].shape[1])
    rest = [j for j in others if j != j0]
    Uj = u_mean[j0].shape[1]
    pairs, pinv = torch.unique(idx[k] * Uj + idx[j0], return_inverse=True)
    n_pairs = pairs.shape[0]
    # moments of the remaining modes per pair
    if rest:
        Qr = u_mean[rest[0]].shape[0] if cp else math.prod(u_mean[j].shape[0] for j in rest)
        T = y.new_zeros(n_pairs, Qr, Qr)
        t = y.new_zeros(n_pairs, Qr)
        step = _chunk_size(Qr)
        for s in range(0, N, step):
            sl = slice(s, s + step)
            X = z = None
            for j in rest:
                ij = idx[j][sl]
                m, v = u_mean[j][:, ij].T, u_var[j][:, ij].T
                X, z = (_second(m, v), m) if X is None else _combine(X, z, _second(m, v), m, cp)
            T.index_add_(0, pinv[sl], X)
            t.index_add_(0, pinv[sl], y[sl, None] * z)
    else:
        T = y.new_zeros(n_pairs).index_add_(0, pinv, y.new_ones(N))[:, None, None]
        t = y.new_zeros(n_pairs).index_add_(0, pinv, y)[:, None]
    # times the pair's moments of mode j0, summed per coordinate of mode k
    Rj = u_mean[j0].shape[0]
    Q = Rj if cp else Rj * T.shape[-1]
    X_u = y.new_zeros(U, Q, Q)
    g_u = y.new_zeros(U, Q)
    step = _chunk_size(Q)
    for s in range(0, n_pairs, step):
        sl = slice(s, s + step)
        ij, iu = pairs[sl] % Uj, pairs[sl] // Uj
        m, v = u_mean[j0][:, ij].T, u_var[j0][:, ij].T
        if rest:
            X, z = _combine(_second(m, v), m, T[sl], t[sl], cp)
        else:  # T, t are the pair's count and sum of y
            X, z = _second(m, v) * T[sl], m * t[sl]
        X_u.index_add_(0, iu, X)
        g_u.index_add_(0, iu, z)
    return X_u, g_u, [j0] + rest


def _mode_first(T: Tensor, ranks: list[int], perm: list[int], twice: bool) -> Tensor:
    """Reorder a flat core index (R_1..R_K) to the mode order ``perm``: (R_p0, Q) or
    (R_p0, Q, R_p0, Q)."""
    K = len(ranks)
    Rk, Q = ranks[perm[0]], math.prod(ranks) // ranks[perm[0]]
    if not twice:
        return T.reshape(ranks).permute(perm).reshape(Rk, Q)
    T = T.reshape(ranks + ranks).permute(perm + [K + p for p in perm])
    return T.reshape(Rk, Q, Rk, Q)


def factor_statistics(
    u_mean, u_var, idx, y: Tensor, k: int, core_mean: Tensor, core_second: Tensor,
    ranks: list[int], *, cp: bool = False,
):
    """Per unique coordinate u of mode ``k``: ``E[a a^T]`` summed over its entries (U_k, R_k,
    R_k) and ``sum_n y_n E[a_n]`` (U_k, R_k), with ``a_n = W_(k) (x)_{j != k} u^j(i_nj)``.

    :param core_mean: Tucker: flat (P,) core mean; CP: (R,) diagonal.
    :param core_second: ``E[w w^T]``: Tucker (P, P); CP (R, R).
    """
    X_u, g_u, order = grouped_moments(u_mean, u_var, idx, y, k, cp=cp)
    if cp:
        return core_second[None] * X_u, core_mean[None] * g_u
    perm = [k] + order
    Eaa = torch.einsum("rpsq,upq->urs", _mode_first(core_second, ranks, perm, True), X_u)
    return Eaa, g_u @ _mode_first(core_mean, ranks, perm, False).T


def factor_messages(
    u_mean, u_var, idx, y: Tensor, k: int, Etau: float, core_mean: Tensor, core_second: Tensor,
    ranks: list[int], *, cp: bool = False,
):
    """Conditional-EP (mean-field) Gaussian messages to the factors of mode ``k``.

    Arguments as :func:`factor_statistics`. Returns ``lam``, ``eta`` (R_k, U_k): the message
    precision :math:`E[\\tau] E[a_r^2]` and precision-mean
    :math:`E[\\tau](E[a_r] y - \\sum_{s \\ne r} E[a_r a_s] m_s)`, summed over the entries at
    each unique coordinate.
    """
    Eaa, Eay = factor_statistics(u_mean, u_var, idx, y, k, core_mean, core_second, ranks, cp=cp)
    m_k = u_mean[k].T  # (U, R_k)
    diag = Eaa.diagonal(dim1=-2, dim2=-1)
    cross = (Eaa @ m_k.unsqueeze(-1)).squeeze(-1) - diag * m_k
    return (Etau * diag).T, (Etau * (Eay - cross)).T


def core_statistics(u_mean, u_var, idx, y: Tensor, ranks: list[int], *, cp: bool = False):
    """``S = sum_n E[b_n b_n^T]`` and ``h = sum_n y_n E[b_n]``, ``b_n = (x)_k u^k(i_nk)``.

    Tucker: (P, P) and (P,) in the flat order of the core; CP: (R, R) and (R,).
    """
    K = len(ranks)
    ks = min(range(K), key=lambda j: u_mean[j].shape[1])
    X_u, g_u, order = grouped_moments(u_mean, u_var, idx, y, ks, cp=cp)
    m, v = u_mean[ks].T, u_var[ks].T  # (U, R)
    Sk = _second(m, v)
    if cp:
        return (Sk * X_u).sum(0), (m * g_u).sum(0)
    Rk, Q = ranks[ks], X_u.shape[-1]
    S4 = torch.einsum("uab,upq->apbq", Sk, X_u)  # (R_k, Q, R_k, Q), mode ks first
    h2 = torch.einsum("ua,up->ap", m, g_u)  # (R_k, Q)
    perm = [ks] + order
    inv = [perm.index(j) for j in range(K)]
    shp = [ranks[j] for j in perm]
    S = S4.reshape(shp + shp).permute(inv + [K + p for p in inv]).reshape(Rk * Q, Rk * Q)
    h = h2.reshape(shp).permute(inv).reshape(Rk * Q)
    return S, h
