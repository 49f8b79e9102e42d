"""FunBaT: evidence-learned hyper-parameters, discrete modes, standardisation, K modes."""

import math

import pytest
import torch

from pyro_dkm.tucker import FunctionalTucker
from pyro_dkm.tucker.ssm import matern_kernel

D = torch.float64


def _lowrank(K, n_u=12, n=400, R=2, noise=0.05, seed=0, ell=2.0):
    """Entries of a K-mode rank-R Tucker tensor with smooth (sin) factors, plus noise."""
    g = torch.Generator().manual_seed(seed)
    grids = [torch.sort(torch.rand(n_u, generator=g, dtype=D) * 5).values for _ in range(K)]
    fs = [torch.stack([torch.sin((r + 1) * grid / ell + r) for r in range(R)], 1)
          for grid in grids]
    W = torch.randn(*([R] * K), generator=g, dtype=D)
    idx = torch.stack([torch.randint(0, n_u, (n,), generator=g) for _ in range(K)], 1)
    letters = "abcdefgh"[:K]
    f = torch.einsum(",".join([letters] + ["n" + c for c in letters]) + "->n", W,
                     *[fs[k][idx[:, k]] for k in range(K)])
    X = torch.stack([grids[k][idx[:, k]] for k in range(K)], 1)
    return X, f + noise * torch.randn(n, generator=g, dtype=D), f


def _fitted(K=3, **kw):
    X, y, _ = _lowrank(K)
    m = FunctionalTucker([2] * K, progress=False, **{"max_iter": 5, **kw})
    return m.fit(X, y), X, y


def test_message_evidence_is_the_dense_gp_marginal_likelihood():
    # log int p(u) prod_t N(eta_t/lam_t; u_t, 1/lam_t) du = log N(y~; 0, K + diag(1/lam)),
    # value and lengthscale gradient, for Matern 1/2, 3/2, 5/2 (1e-9)
    for nu in (0.5, 1.5, 2.5):
        m, _, _ = _fitted(nu=nu)
        k = 1
        g = torch.Generator().manual_seed(4)
        T = m.unique_coords[k].shape[0]
        lam = torch.rand(2, T, generator=g, dtype=D) + 0.2
        lam[:, 3] = 0.0  # a coordinate without data
        m.msg_lam[k], m.msg_eta[k] = lam, torch.randn(2, T, generator=g, dtype=D) * lam
        log_ell = torch.tensor(math.log(0.7), dtype=D, requires_grad=True)
        log_var = torch.tensor(math.log(1.3), dtype=D)
        ev = m._message_evidence(k, log_ell, log_var)
        (g_ssm,) = torch.autograd.grad(ev, log_ell)
        u = m.unique_coords[k]
        obs = lam[0] > 0
        log_ell2 = log_ell.detach().clone().requires_grad_(True)
        ell = log_ell2.exp()
        dense = 0.0
        for r in range(2):
            Kd = matern_kernel(nu, ell, 1.3, u[obs, None] - u[None, obs])
            C = Kd + torch.diag(1 / lam[r, obs])
            ytil = m.msg_eta[k][r, obs] / lam[r, obs]
            dense = dense + torch.distributions.MultivariateNormal(
                torch.zeros_like(ytil), C).log_prob(ytil)
        (g_dense,) = torch.autograd.grad(dense, log_ell2)
        ev, dense = float(ev.detach()), float(dense.detach())
        assert abs(ev - dense) < 1e-9 * abs(dense), (nu, ev, dense)
        assert abs(float(g_ssm) - float(g_dense)) < 1e-7 * abs(float(g_dense)), nu


def test_discrete_mode_is_the_matern_limit_of_independent_values():
    # an independent N(0, v) embedding per value = Matern 1/2 with a lengthscale far below
    # the spacing (correlation exp(-gap / ell) = 0): identical fits (1e-8)
    X, y, _ = _lowrank(3)
    a = FunctionalTucker([2] * 3, nu=0.5, lengthscale=[1.0, 1.0, 1e-9], max_iter=20,
                         progress=False).fit(X, y)
    b = FunctionalTucker([2] * 3, nu=0.5, lengthscale=[1.0, 1.0, 1e-9], max_iter=20,
                         modes=["continuous", "continuous", "discrete"], progress=False).fit(X, y)
    torch.testing.assert_close(b.predict(X).mean, a.predict(X).mean, rtol=1e-8, atol=1e-8)
    # an unseen value of a discrete mode predicts from the prior: factor mean 0
    x_new = torch.tensor([100.0], dtype=D)
    mean, var = b.factor_posterior(2, x_new)
    assert float(mean.abs().max()) == 0.0 and torch.allclose(var, torch.ones_like(var))


def test_learned_lengthscale_moves_towards_the_truth():
    # factors drawn from Matern 3/2 GPs of lengthscale 0.5 (fine) and 3 (smooth); started
    # at the opposite values, the evidence brings each within a factor 2 of its truth
    g = torch.Generator().manual_seed(0)
    grids, fs = [], []
    for ell in (0.5, 3.0):
        grid = torch.linspace(0, 10, 60, dtype=D)
        Kd = matern_kernel(1.5, ell, 1.0, grid[:, None] - grid[None])
        L = torch.linalg.cholesky(Kd + 1e-9 * torch.eye(60, dtype=D))
        fs.append((L @ torch.randn(60, 2, generator=g, dtype=D)))
        grids.append(grid)
    idx = torch.stack([torch.randint(0, 60, (1500,), generator=g) for _ in range(2)], 1)
    W = torch.randn(2, 2, generator=g, dtype=D)
    f = torch.einsum("ab,na,nb->n", W, fs[0][idx[:, 0]], fs[1][idx[:, 1]])
    X = torch.stack([grids[k][idx[:, k]] for k in range(2)], 1)
    y = f + 0.05 * torch.randn(1500, generator=g, dtype=D)
    m = FunctionalTucker([2, 2], nu=1.5, lengthscale=[3.0, 0.5], max_iter=60, damping=0.9,
                         learn_hyperparameters=True, hyper_every=5, progress=False).fit(X, y)
    assert 0.25 < m.lengthscale[0] < 1.0, m.lengthscale
    assert 1.5 < m.lengthscale[1] < 6.0, m.lengthscale
    assert all(math.isfinite(v) and v > 0 for v in m.variance)


def test_lengthscales_below_the_spacing_are_reachable():
    # values independent per index along mode 1 (spacing 1), seen almost without noise:
    # the evidence of a Matern-1/2 (OU) prior is maximised at the lengthscale whose lag-1
    # correlation exp(-1/ell) is the draw's sample autocorrelation rho (0.144 here), i.e.
    # ell = -1/log(rho) = 0.52, below one unit of spacing (started at 5), to 10%; the fit
    # stays finite
    g = torch.Generator().manual_seed(1)
    n_u = 300
    day = torch.randn(n_u, generator=g, dtype=D)
    idx = torch.stack([torch.randint(0, 5, (2000,), generator=g),
                       torch.randint(0, n_u, (2000,), generator=g)], 1)
    X = idx.to(D)
    y = day[idx[:, 1]] * (1 + 0.3 * X[:, 0]) + 0.05 * torch.randn(2000, generator=g, dtype=D)
    m = FunctionalTucker([1, 1], nu=0.5, lengthscale=[1.0, 5.0], max_iter=40, damping=0.9,
                         learn_hyperparameters=True, hyper_every=5, progress=False).fit(X, y)
    d = day - day.mean()
    rho = float((d[1:] * d[:-1]).sum() / (d * d).sum())
    ell_ml = -1.0 / math.log(rho)
    assert abs(m.lengthscale[1] - ell_ml) < 0.1 * ell_ml, (m.lengthscale, ell_ml)
    assert m.lengthscale[1] < 1.0
    pred = m.predict(X).mean
    assert bool(torch.isfinite(pred).all())
    assert float(((pred - y) ** 2).mean().sqrt()) < 0.2


@pytest.mark.parametrize("c, b", [(1e4, 0.0), (1e-3, 5.0), (7.0, -300.0)])
def test_standardised_fit_rescales_with_the_values(c, b):
    X, y, _ = _lowrank(3)
    kw = dict(max_iter=15, progress=False, standardise=True)
    m1 = FunctionalTucker([2] * 3, **kw).fit(X, y)
    m2 = FunctionalTucker([2] * 3, **kw).fit(X, c * y + b)
    p1, p2 = m1.predict(X[:20]), m2.predict(X[:20])
    torch.testing.assert_close(p2.mean, c * p1.mean + b, rtol=1e-7, atol=1e-7 * c)
    torch.testing.assert_close(p2.variance, c * c * p1.variance, rtol=1e-7, atol=0)


@pytest.mark.parametrize("K", [2, 3, 4, 5])
def test_k_mode_tensors_fit_predict_and_differentiate(K):
    # K = 2..5 modes from the ALS start: the fit explains the low-rank signal (training
    # RMSE well below the values' spread), predictions at unseen coordinates are finite and
    # between the neighbours' scale, and the evidence has finite lengthscale gradients
    X, y, f = _lowrank(K, n=150 * K)
    m = FunctionalTucker([2] * K, max_iter=60, progress=False, damping=0.9).fit(X, y)
    rmse = float(((m.predict(X).mean - f) ** 2).mean().sqrt())
    assert rmse < 0.35 * float(f.std()), (K, rmse, float(f.std()))
    X_new = X[:10] + 0.013  # off every grid point
    p = m.predict(X_new)
    assert bool(torch.isfinite(p.mean).all() and (p.variance > 0).all())
    log_ell = torch.tensor(0.0, dtype=D, requires_grad=True)
    (grad,) = torch.autograd.grad(m._message_evidence(0, log_ell, torch.tensor(0.0, dtype=D)),
                                  log_ell)
    assert math.isfinite(float(grad))


def test_bad_mode_and_hyperparameter_arguments():
    with pytest.raises(ValueError, match="modes must be 'continuous', 'discrete' or 'auto'"):
        FunctionalTucker([2, 2], modes=["continuous", "categorical"])
    with pytest.raises(ValueError, match="modes must be a scalar or a sequence of 2"):
        FunctionalTucker([2, 2], modes=["discrete"])
    with pytest.raises(ValueError, match="hyper_every must be a positive int"):
        FunctionalTucker([2, 2], hyper_every=0)


def test_restarts_keep_the_fit_of_lowest_validation_rmse():
    # restarts=3: three seeds fitted to the same 90%; the kept model is the one whose
    # held-out RMSE is the minimum, and it equals a plain fit with that seed on that 90%
    X, y, _ = _lowrank(3, n=500)
    m = FunctionalTucker([2] * 3, max_iter=8, progress=False, seed=5)
    m.fit(X, y, restarts=3)
    assert len(m.restart_val_rmse) == 3 and m.seed == 5
    best = min(range(3), key=lambda r: m.restart_val_rmse[r])
    perm = torch.randperm(500, generator=torch.Generator().manual_seed(5))
    trn = perm[50:]
    ref = FunctionalTucker([2] * 3, max_iter=8, progress=False, seed=5 + 1000 * best)
    ref.fit(X[trn], y[trn])
    torch.testing.assert_close(m.predict(X).mean, ref.predict(X).mean, rtol=0, atol=0)
    with pytest.raises(ValueError, match="restarts must be a positive int"):
        m.fit(X, y, restarts=0)


def test_auto_modes_choose_discrete_and_continuous_by_validation():
    """Mode 0: 12 labels at coordinates 0, 0.01, ..., 0.11 with independent effects (the
    lengthscale, fixed at 1, makes neighbouring labels correlate ~1 under a GP, so a
    continuous mode cannot separate them; a GP on 12 well-spaced integers would fit them
    as well as an embedding does); mode 1: a smooth function of a coordinate drawn afresh
    for every entry (a discrete embedding never sees a test value). Validation picks
    discrete for mode 0 and continuous for mode 1, and the chosen model predicts better
    than the other choices on fresh entries."""
    g = torch.Generator().manual_seed(0)
    effects = torch.randn(12, generator=g, dtype=torch.float64) * 1.5

    def draw(n):
        i = torch.randint(0, 12, (n,), generator=g)
        t = torch.rand(n, generator=g, dtype=torch.float64) * 10
        y = effects[i] * torch.sin(t) + 0.05 * torch.randn(n, generator=g, dtype=torch.float64)
        return torch.stack([i.double() * 0.01, t], 1), y

    X, y = draw(1500)
    Xt, yt = draw(500)
    kw = dict(nu=1.5, lengthscale=[1.0, 1.0], core="cp", max_iter=60, progress=False,
              seed=0)
    auto = FunctionalTucker([1, 1], modes="auto", **kw).fit(X, y)
    assert auto.modes == ["discrete", "continuous"]
    assert set(auto.mode_val_rmse) == {(0, "continuous"), (0, "discrete"), (1, "continuous"),
                                       (1, "discrete")}
    assert auto._requested_modes == ["auto", "auto"]
    rmse = {}
    for modes in (["continuous", "continuous"], ["discrete", "continuous"],
                  ["discrete", "discrete"]):
        m = FunctionalTucker([1, 1], modes=modes, **kw).fit(X, y)
        rmse[tuple(modes)] = float(((m.predict(Xt).mean - yt) ** 2).mean().sqrt())
    chosen = float(((auto.predict(Xt).mean - yt) ** 2).mean().sqrt())
    assert chosen == pytest.approx(rmse[("discrete", "continuous")], rel=1e-10)
    assert chosen < 0.7 * min(rmse[("continuous", "continuous")],
                              rmse[("discrete", "discrete")])
