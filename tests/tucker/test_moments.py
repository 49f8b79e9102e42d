"""Grouped expected statistics of the FunBaT likelihood vs per-entry brute force (float64)."""

import itertools
import math

import pytest
import torch

from pyro_dkm.tucker.moments import core_statistics, factor_messages

D = torch.float64


def _problem(ranks, n_u, N, seed, cp):
    g = torch.Generator().manual_seed(seed)
    u_mean = [torch.randn(R, U, generator=g, dtype=D) for R, U in zip(ranks, n_u)]
    u_var = [torch.rand(R, U, generator=g, dtype=D) for R, U in zip(ranks, n_u)]
    idx = [torch.randint(0, U, (N,), generator=g) for U in n_u]
    y = torch.randn(N, generator=g, dtype=D)
    P = ranks[0] if cp else math.prod(ranks)
    w = torch.randn(P, generator=g, dtype=D)
    L = torch.randn(P, P, generator=g, dtype=D) * 0.3
    second = L @ L.T + torch.outer(w, w)  # E[w w^T] with a full core covariance
    return u_mean, u_var, idx, y, w, second


def _full_core(w, ranks, cp):
    """Dense core mean and second moment (P, P) in the flat order of the core."""
    if not cp:
        return w, None
    R, K = ranks[0], len(ranks)
    flat = torch.zeros(R, dtype=torch.long)
    for _ in range(K):
        flat = flat * R + torch.arange(R)
    return flat


def _brute(u_mean, u_var, idx, y, w, second, ranks, k, Etau, cp):
    """Per entry, by explicit sums over core indexes: E[a a^T] and E[a] for mode k."""
    K, N = len(ranks), y.shape[0]
    P = math.prod(ranks)
    if cp:  # embed the diagonal core into a dense one
        flat = _full_core(w, ranks, cp)
        wf = w.new_zeros(P)
        wf[flat] = w
        sf = w.new_zeros(P, P)
        sf[flat[:, None], flat[None, :]] = second
        w, second = wf, sf
    W = w.reshape(ranks)
    W2 = second.reshape(ranks + ranks)
    U = u_mean[k].shape[1]
    lam = torch.zeros(ranks[k], U, dtype=D)
    eta = torch.zeros(ranks[k], U, dtype=D)
    others = [j for j in range(K) if j != k]
    for n in range(N):
        m = [u_mean[j][:, idx[j][n]] for j in range(K)]
        v = [u_var[j][:, idx[j][n]] for j in range(K)]
        Eaa = torch.zeros(ranks[k], ranks[k], dtype=D)
        Ea = torch.zeros(ranks[k], dtype=D)
        for p in itertools.product(*[range(ranks[j]) for j in others]):
            for r in range(ranks[k]):
                ip = list(p)
                ip.insert(k, r)
                Ea[r] += W[tuple(ip)] * math.prod(float(m[j][p[i]]) for i, j in enumerate(others))
            for q in itertools.product(*[range(ranks[j]) for j in others]):
                Euu = 1.0
                for i, j in enumerate(others):  # E[u_p u_q] = m_p m_q + delta_pq v_p
                    Euu *= float(m[j][p[i]] * m[j][q[i]] + (v[j][p[i]] if p[i] == q[i] else 0))
                for r in range(ranks[k]):
                    for s in range(ranks[k]):
                        ip, iq = list(p), list(q)
                        ip.insert(k, r)
                        iq.insert(k, s)
                        Eaa[r, s] += W2[tuple(ip) + tuple(iq)] * Euu
        u = idx[k][n]
        mk = u_mean[k][:, u]
        lam[:, u] += Etau * Eaa.diagonal()
        eta[:, u] += Etau * (y[n] * Ea - Eaa @ mk + Eaa.diagonal() * mk)
    return lam, eta


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("k", [0, 1, 2])
def test_factor_messages_match_per_entry_sums(cp, k):
    # expected: explicit per-entry sums over core indexes of E[W_rp W_sq] E[u_p u_q]
    ranks = [2, 2, 2] if cp else [2, 3, 2]
    u_mean, u_var, idx, y, w, second = _problem(ranks, [4, 3, 5], 30, seed=k, cp=cp)
    lam, eta = factor_messages(u_mean, u_var, idx, y, k, 2.5, w, second, ranks, cp=cp)
    lam_b, eta_b = _brute(u_mean, u_var, idx, y, w, second, ranks, k, 2.5, cp)
    torch.testing.assert_close(lam, lam_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eta, eta_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cp", [False, True])
@pytest.mark.parametrize("k", [0, 1])
def test_factor_messages_two_modes(cp, k):
    # K = 2: no modes beyond the pairing mode (counts and sums of y per pair)
    ranks = [2, 2] if cp else [2, 3]
    u_mean, u_var, idx, y, w, second = _problem(ranks, [4, 3], 25, seed=11 + k, cp=cp)
    lam, eta = factor_messages(u_mean, u_var, idx, y, k, 0.7, w, second, ranks, cp=cp)
    lam_b, eta_b = _brute(u_mean, u_var, idx, y, w, second, ranks, k, 0.7, cp)
    torch.testing.assert_close(lam, lam_b, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(eta, eta_b, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cp", [False, True])
def test_core_statistics_match_per_entry_kronecker(cp):
    # expected: sum_n (x)_k E[u u^T] and sum_n y_n (x)_k m, built entry by entry
    ranks = [2, 2, 2] if cp else [2, 3, 2]
    u_mean, u_var, idx, y, _, _ = _problem(ranks, [4, 6, 3], 40, seed=7, cp=cp)
    S, h = core_statistics(u_mean, u_var, idx, y, ranks, cp=cp)
    Sb, hb = 0.0, 0.0
    for n in range(y.shape[0]):
        Es, ms = None, None
        for j in range(3):
            m, v = u_mean[j][:, idx[j][n]], u_var[j][:, idx[j][n]]
            E = torch.outer(m, m) + torch.diag(v)
            if Es is None:
                Es, ms = E, m
            elif cp:
                Es, ms = Es * E, ms * m
            else:
                Es, ms = torch.kron(Es, E), torch.kron(ms, m)
        Sb, hb = Sb + Es, hb + y[n] * ms
    torch.testing.assert_close(S, Sb, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(h, hb, rtol=1e-10, atol=1e-10)
