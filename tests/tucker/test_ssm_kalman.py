"""State-space Matern forms and Kalman/RTS against dense GP algebra (float64 closed forms)."""

import pytest
import torch

from pyro_dkm.tucker import (
    associative_scan,
    condition_on_neighbours,
    discretise,
    kalman_filter,
    matern_kernel,
    matern_ssm,
    rts_smoother,
)

D = torch.float64


def _irregular(n, seed, repeat=True):
    g = torch.Generator().manual_seed(seed)
    x = torch.sort(torch.rand(n, generator=g, dtype=D) * 5).values
    if repeat:
        x[5] = x[4]  # a repeated coordinate: dt = 0 -> A = I, Q = 0
    return x, g


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_state_covariance_reproduces_matern(nu):
    # Cov(f(t), f(t+dt)) = H A(dt) P_inf H^T must equal the closed-form Matern kernel
    ssm = matern_ssm(nu, 0.7, 1.3)
    dt = torch.tensor([0.0, 1e-4, 0.01, 0.3, 1.0, 4.0], dtype=D)
    A, Q = discretise(ssm, dt)
    cov = (A @ ssm.P_inf)[:, 0, 0]
    torch.testing.assert_close(cov, matern_kernel(nu, 0.7, 1.3, dt), rtol=1e-12, atol=1e-13)
    # stationarity: A P A^T + Q = P_inf
    torch.testing.assert_close(
        A @ ssm.P_inf @ A.transpose(-1, -2) + Q, ssm.P_inf.expand_as(Q), rtol=0, atol=1e-12
    )
    # dt = 0 is exactly the identity with zero noise (pyro.ops.ssm_gp gives NaN for nu = 5/2)
    assert torch.equal(A[0], torch.eye(ssm.state_dim, dtype=D))
    assert torch.equal(Q[0], torch.zeros_like(Q[0]))


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_process_noise_positive_definite_small_dt(nu):
    # the naive P_inf - A P_inf A^T loses PD for small dt; quadrature keeps it
    ssm = matern_ssm(nu, 1.0, 1.0)
    A, Q = discretise(ssm, torch.tensor([1e-6, 1e-4, 1e-3, 1e-2], dtype=D))
    assert (torch.linalg.eigvalsh(Q)[:, 0] > 0).all()


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_kalman_rts_equals_dense_gp_posterior(nu):
    n, s2, ell, var = 40, 0.1, 0.7, 1.3
    x, g = _irregular(n, 0)
    y = torch.randn(n, generator=g, dtype=D)
    ssm = matern_ssm(nu, ell, var)
    A, Q = discretise(ssm, torch.cat([x.new_zeros(1), x.diff()]))
    lam = torch.full((1, n), 1 / s2, dtype=D)
    filt = kalman_filter(A[None], Q[None], ssm.P_inf[None], lam, (y / s2)[None])
    sm = rts_smoother(A[None], filt)
    K = matern_kernel(nu, ell, var, x[:, None] - x[None])
    Ky = K + s2 * torch.eye(n, dtype=D)
    mu = K @ torch.linalg.solve(Ky, y)
    C = K - K @ torch.linalg.solve(Ky, K)
    # expected: dense GP posterior mean / marginal variance / log marginal likelihood
    torch.testing.assert_close(sm.mean[0, :, 0], mu, rtol=0, atol=1e-8)
    torch.testing.assert_close(sm.cov[0, :, 0, 0], C.diagonal(), rtol=0, atol=1e-8)
    lml = torch.distributions.MultivariateNormal(torch.zeros(n, dtype=D), Ky).log_prob(y)
    torch.testing.assert_close(filt.log_marginal[0], lml, rtol=0, atol=1e-8)


@pytest.mark.parametrize("nu", [0.5, 1.5, 2.5])
def test_neighbour_conditioning_equals_dense_gp_conditional(nu):
    n, s2, ell, var = 30, 0.05, 0.8, 1.1
    x, g = _irregular(n, 1, repeat=False)
    y = torch.randn(n, generator=g, dtype=D)
    ssm = matern_ssm(nu, ell, var)
    A, Q = discretise(ssm, torch.cat([x.new_zeros(1), x.diff()]))
    filt = kalman_filter(
        A[None], Q[None], ssm.P_inf[None], torch.full((1, n), 1 / s2, dtype=D), (y / s2)[None]
    )
    sm = rts_smoother(A[None], filt)
    xq = torch.tensor(
        [-1.0, x[0] - 0.01, (x[3] + x[4]) / 2, x[10] + 1e-3, x[-1] + 0.2, 7.0], dtype=D
    )
    pos = torch.searchsorted(x, xq)
    hl, hr = pos > 0, pos < n
    li, ri = (pos - 1).clamp_min(0), pos.clamp_max(n - 1)
    dl = torch.where(hl, xq - x[li], torch.zeros_like(xq))
    dr = torch.where(hr, x[ri] - xq, torch.zeros_like(xq))
    Al, Ql = discretise(ssm, dl)
    Ar, Qr = discretise(ssm, dr)
    m, P = condition_on_neighbours(
        Al,
        Ql,
        Ar,
        Qr,
        filt.m_filt[0, li],
        filt.P_filt[0, li],
        sm.mean[0, ri],
        sm.cov[0, ri],
        hl,
        hr,
        ssm.P_inf.expand_as(Al),
    )
    K = matern_kernel(nu, ell, var, x[:, None] - x[None]) + s2 * torch.eye(n, dtype=D)
    Kq = matern_kernel(nu, ell, var, xq[:, None] - x[None])
    mu = Kq @ torch.linalg.solve(K, y)
    v = var - (Kq * torch.linalg.solve(K, Kq.T).T).sum(1)
    # expected: dense GP predictive at the new inputs
    torch.testing.assert_close(m[:, 0], mu, rtol=0, atol=1e-8)
    torch.testing.assert_close(P[:, 0, 0], v, rtol=0, atol=1e-8)


def test_batched_filter_matches_single():
    ssm = matern_ssm(1.5, torch.tensor([0.5, 2.0], dtype=D), torch.tensor([1.0, 0.3], dtype=D))
    x, g = _irregular(25, 2)
    A, Q = discretise(ssm, torch.cat([x.new_zeros(1), x.diff()]).expand(2, -1))
    lam = torch.rand(2, 25, generator=g, dtype=D)
    eta = torch.randn(2, 25, generator=g, dtype=D)
    sm = rts_smoother(A, kalman_filter(A, Q, ssm.P_inf, lam, eta))
    for b in range(2):
        s1 = rts_smoother(
            A[b : b + 1],
            kalman_filter(
                A[b : b + 1], Q[b : b + 1], ssm.P_inf[b : b + 1], lam[b : b + 1], eta[b : b + 1]
            ),
        )
        torch.testing.assert_close(sm.mean[b], s1.mean[0], rtol=0, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 7, 16, 33])
def test_associative_scan_order(T):
    # non-commutative op: prefix products of random 2x2 matrices, earlier factor on the right
    g = torch.Generator().manual_seed(T)
    M = torch.randn(3, T, 2, 2, generator=g, dtype=D)
    (out,) = associative_scan(lambda a, b: (b[0] @ a[0],), (M,))
    ref = [M[:, 0]]
    for t in range(1, T):
        ref.append(M[:, t] @ ref[-1])
    torch.testing.assert_close(out, torch.stack(ref, 1), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("T", [1, 2, 5, 64, 257])
def test_scan_filter_smoother_equal_sequential(T):
    # the parallel-scan KF/RTS must reproduce the sequential recursions (rounding only):
    # mixed nu padded to d = 3 like FunctionalTucker does, lam = 0 gaps, a repeated coordinate
    g = torch.Generator().manual_seed(T)
    x = torch.sort(torch.rand(T, generator=g, dtype=D) * 4).values
    if T > 3:
        x[2] = x[1]
    gaps = torch.cat([x.new_zeros(1), x.diff()])
    A = torch.eye(3, dtype=D).repeat(3, T, 1, 1)
    Q = torch.zeros(3, T, 3, 3, dtype=D)
    P0 = torch.eye(3, dtype=D).repeat(3, 1, 1)
    for b, nu in enumerate([0.5, 1.5, 2.5]):
        ssm = matern_ssm(nu, 0.6, 1.2)
        Ab, Qb = discretise(ssm, gaps)
        d = ssm.state_dim
        A[b, :, :d, :d], Q[b, :, :d, :d], P0[b, :d, :d] = Ab, Qb, ssm.P_inf
    lam = torch.rand(3, T, generator=g, dtype=D) * 30
    lam[:, ::3] = 0
    eta = torch.randn(3, T, generator=g, dtype=D) * 5
    f_seq = kalman_filter(A, Q, P0, lam, eta, method="sequential")
    s_seq = rts_smoother(A, f_seq, method="sequential")
    f_par = kalman_filter(A, Q, P0, lam, eta)
    s_par = rts_smoother(A, f_par)
    for a, b in zip(f_par, f_seq):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s_par.mean, s_seq.mean, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(s_par.cov, s_seq.cov, rtol=1e-9, atol=1e-10)


def test_kalman_bad_shapes():
    A = torch.eye(2, dtype=D).repeat(1, 4, 1, 1)
    with pytest.raises(ValueError, match="lam"):
        kalman_filter(
            A, A, torch.eye(2, dtype=D)[None], torch.ones(1, 3, dtype=D), torch.ones(1, 3)
        )
    with pytest.raises(ValueError, match="method"):
        kalman_filter(A, A, torch.eye(2, dtype=D)[None], torch.ones(1, 4, dtype=D),
                      torch.ones(1, 4, dtype=D), method="fast")


def test_bad_hyperparameters():
    with pytest.raises(ValueError, match="nu"):
        matern_ssm(1.0, 1.0, 1.0)
    with pytest.raises(ValueError, match="lengthscale"):
        matern_ssm(1.5, -1.0, 1.0)
    with pytest.raises(ValueError, match="dt"):
        discretise(matern_ssm(1.5, 1.0), torch.tensor([-0.1], dtype=D))
