"""Batched Kalman filter, RTS smoother and neighbour conditioning for Gauss-Markov chains.

All functions are batched over a leading batch shape ``B`` (latent factors x
modes), run in the dtype of their inputs (use float64) and cost O(T d^3) per
chain. Observations enter as Gaussian messages on the first state component in
natural form: precision ``lam`` (>= 0, 0 = no data at that step) and
precision-times-mean ``eta``; a scalar observation ``y`` with noise variance
``s2`` is ``lam = 1/s2``, ``eta = y/s2``.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

__all__ = [
    "FilterResult",
    "SmootherResult",
    "kalman_filter",
    "rts_smoother",
    "condition_on_neighbours",
]


class FilterResult(NamedTuple):
    m_pred: Tensor  # (B, T, d)
    P_pred: Tensor  # (B, T, d, d)
    m_filt: Tensor  # (B, T, d)
    P_filt: Tensor  # (B, T, d, d)
    log_marginal: Tensor  # (B,) log-normaliser of the messages (up to message constants)


class SmootherResult(NamedTuple):
    mean: Tensor  # (B, T, d)
    cov: Tensor  # (B, T, d, d)


def _sym(P: Tensor) -> Tensor:
    return 0.5 * (P + P.transpose(-1, -2))


def kalman_filter(A: Tensor, Q: Tensor, P0: Tensor, lam: Tensor, eta: Tensor) -> FilterResult:
    """Forward filtering with scalar Gaussian messages on the first state component.

    :param A: (B, T, d, d) transitions ``x_t = A_t x_{t-1} + q_t`` (``A[:, 0]`` unused).
    :param Q: (B, T, d, d) process noise covariances (``Q[:, 0]`` unused).
    :param P0: (B, d, d) prior covariance of ``x_0`` (zero mean).
    :param lam: (B, T) message precisions, >= 0.
    :param eta: (B, T) message precision-means.

    ``log_marginal`` is :math:`\\sum_t \\log N(y_t | H m^-_t, H P^-_t H^T + 1/lam_t)`
    for steps with ``lam > 0`` when the messages are observations ``y = eta/lam``.
    """
    B, T, d, _ = A.shape
    m_pred = A.new_zeros(B, T, d)
    P_pred = A.new_zeros(B, T, d, d)
    m_filt = A.new_zeros(B, T, d)
    P_filt = A.new_zeros(B, T, d, d)
    logml = A.new_zeros(B)
    m = A.new_zeros(B, d)
    P = P0
    At = A.transpose(-1, -2)
    log2pi = torch.log(torch.tensor(2 * torch.pi, dtype=A.dtype, device=A.device))
    for t in range(T):
        if t > 0:
            m = (A[:, t] @ m.unsqueeze(-1)).squeeze(-1)
            P = _sym(A[:, t] @ P @ At[:, t] + Q[:, t])
        m_pred[:, t] = m
        P_pred[:, t] = P
        lt = lam[:, t]
        k = P[:, :, 0]  # (B, d)
        S = 1.0 + lt * P[:, 0, 0]
        resid = eta[:, t] - lt * m[:, 0]
        m = m + k * (resid / S).unsqueeze(-1)
        P = _sym(P - (lt / S)[:, None, None] * k.unsqueeze(-1) * k.unsqueeze(-2))
        m_filt[:, t] = m
        P_filt[:, t] = P
        # predictive of y = eta/lam: var = P00 + 1/lam; accumulate only where lam > 0
        obs = lt > 0
        safe = torch.where(obs, lt, torch.ones_like(lt))
        y = eta[:, t] / safe
        v = m_pred[:, t, 0].new_zeros(B) + P_pred[:, t, 0, 0] + 1.0 / safe
        ll = -0.5 * (log2pi + torch.log(v) + (y - m_pred[:, t, 0]) ** 2 / v)
        logml = logml + torch.where(obs, ll, torch.zeros_like(ll))
    return FilterResult(m_pred, P_pred, m_filt, P_filt, logml)


def rts_smoother(A: Tensor, filt: FilterResult) -> SmootherResult:
    """Rauch-Tung-Striebel smoother; returns smoothed means (B, T, d) and covariances."""
    m_s = filt.m_filt.clone()
    P_s = filt.P_filt.clone()
    T = A.shape[1]
    for t in range(T - 2, -1, -1):
        Pf = filt.P_filt[:, t]
        Pp = filt.P_pred[:, t + 1]
        # G = Pf A^T Pp^{-1}  <=>  G^T = Pp^{-1} A Pf  (Pp symmetric)
        G = torch.linalg.solve(Pp, A[:, t + 1] @ Pf).transpose(-1, -2)
        m_s[:, t] = filt.m_filt[:, t] + (
            G @ (m_s[:, t + 1] - filt.m_pred[:, t + 1]).unsqueeze(-1)
        ).squeeze(-1)
        P_s[:, t] = _sym(Pf + G @ (P_s[:, t + 1] - Pp) @ G.transpose(-1, -2))
    return SmootherResult(m_s, P_s)


def condition_on_neighbours(
    A_left: Tensor,
    Q_left: Tensor,
    A_right: Tensor,
    Q_right: Tensor,
    m_left: Tensor,
    P_left: Tensor,
    m_right: Tensor,
    P_right: Tensor,
    has_left: Tensor,
    has_right: Tensor,
    P_inf: Tensor,
) -> tuple[Tensor, Tensor]:
    """Posterior state at a new input between two stored neighbours (exact).

    By the Markov property the new state depends on the data only through its
    neighbours: predict it from the *filtered* left state (``m_left``,
    ``P_left``; the stationary prior ``N(0, P_inf)`` when ``has_left`` is false)
    and correct it with one RTS step against the *smoothed* right state
    (``m_right``, ``P_right``); with no right neighbour the prediction is the
    answer. All tensors are batched: (..., d) and (..., d, d); ``has_*`` (...,).
    """
    zero_m = torch.zeros_like(m_left)
    m0 = torch.where(has_left[..., None], m_left, zero_m)
    P0 = torch.where(has_left[..., None, None], P_left, P_inf)
    Al = torch.where(
        has_left[..., None, None], A_left, torch.eye(A_left.shape[-1], dtype=A_left.dtype)
    )
    Ql = torch.where(has_left[..., None, None], Q_left, torch.zeros_like(Q_left))
    m = (Al @ m0.unsqueeze(-1)).squeeze(-1)
    P = _sym(Al @ P0 @ Al.transpose(-1, -2) + Ql)
    # one RTS step against the right neighbour
    Pp = _sym(A_right @ P @ A_right.transpose(-1, -2) + Q_right)
    mp = (A_right @ m.unsqueeze(-1)).squeeze(-1)
    eye = torch.eye(P.shape[-1], dtype=P.dtype, device=P.device)
    Pp_safe = torch.where(has_right[..., None, None], Pp, eye.expand_as(Pp))
    G = torch.linalg.solve(Pp_safe, A_right @ P).transpose(-1, -2)
    m_new = m + (G @ (m_right - mp).unsqueeze(-1)).squeeze(-1)
    P_new = _sym(P + G @ (P_right - Pp) @ G.transpose(-1, -2))
    m_out = torch.where(has_right[..., None], m_new, m)
    P_out = torch.where(has_right[..., None, None], P_new, P)
    return m_out, P_out
