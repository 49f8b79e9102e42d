"""Functional Bayesian Tucker decomposition (FunBaT) fitted by conditional EP.

Fang, Yu, Wang, Li, Kirby, Zhe, "Functional Bayesian Tucker Decomposition for
Continuous-indexed Tensor Data", ICLR 2024.

Model, for entries :math:`y_n` at continuous coordinates :math:`(i_{n1},..,i_{nK})`:

.. math::
    y_n = \\mathcal{W} \\times_1 u^1(i_{n1}) \\cdots \\times_K u^K(i_{nK}) + \\epsilon_n,
    \\quad u^k_r \\sim GP(0, \\text{Matern}_{\\nu_k}),
    \\ \\mathrm{vec}(\\mathcal W) \\sim N(0, s_w^2 I),
    \\ \\epsilon_n \\sim N(0, \\tau^{-1}),\\ \\tau \\sim \\text{Gamma}(a_0, b_0).

Each GP is a linear SDE over the sorted unique coordinates of its mode, so one
sweep (messages, Kalman filter + RTS smoother per mode, closed-form core and
noise updates) costs O(N) in the number of entries. CP is the diagonal-core
special case (``core="cp"``).
"""

from __future__ import annotations

import math
import string
import warnings
from typing import Sequence

import torch
from torch import Tensor

from .._training import power_of_ten_scale, target_statistics
from ..linalg import cholesky, cholesky_solve
from .als import als_fit
from .kalman import FilterResult, condition_on_neighbours, kalman_filter, rts_smoother
from .moments import core_statistics, factor_messages, factor_statistics
from .ssm import _check_nu, discretise, matern_ssm

__all__ = ["FunctionalTucker", "MomentNormal", "CollapsedFitWarning", "check_tensor_data"]

_LETTERS = string.ascii_lowercase.replace("n", "").replace("z", "")


def _per_mode(x, K: int, name: str) -> list:
    if isinstance(x, (list, tuple)):
        if len(x) != K:
            raise ValueError(
                f"{name} must be a scalar or a sequence of {K} values (one per mode), got {len(x)}"
            )
        return list(x)
    return [x] * K


def check_tensor_data(coords, values=None, *, n_modes: int | None = None, dtype=torch.float64):
    """Validate and convert (coords, values) to float tensors; clear errors on bad input."""
    if not torch.is_tensor(coords):
        try:
            coords = torch.as_tensor(coords)
        except Exception as e:  # noqa: BLE001
            raise TypeError(
                f"coords must be a tensor or array of shape (N, K), got {type(coords)}"
            ) from e
    if coords.ndim != 2:
        raise ValueError(
            f"coords must have shape (N, K) (one column per mode), got shape {tuple(coords.shape)}"
        )
    if n_modes is not None and coords.shape[1] != n_modes:
        raise ValueError(
            f"coords must have {n_modes} columns (one per mode, the length of ranks), "
            f"got {coords.shape[1]}"
        )
    if coords.shape[0] == 0:
        raise ValueError("coords is empty (N = 0)")
    if coords.dtype == torch.bool or coords.is_complex():
        raise TypeError(f"coords must be real numbers, got dtype {coords.dtype}")
    coords = coords.to(dtype)
    if not torch.isfinite(coords).all():
        bad = (~torch.isfinite(coords)).any(1).nonzero()[:5, 0].tolist()
        raise ValueError(f"coords must be finite (NaN/inf found in rows {bad}...)")
    if values is None:
        return coords, None
    if not torch.is_tensor(values):
        values = torch.as_tensor(values)
    values = (
        values.to(dtype).reshape(-1)
        if values.ndim == 2 and values.shape[-1] == 1
        else values.to(dtype)
    )
    if values.ndim != 1:
        raise ValueError(f"values must have shape (N,), got {tuple(values.shape)}")
    if values.shape[0] != coords.shape[0]:
        raise ValueError(
            f"values has {values.shape[0]} entries but coords has {coords.shape[0]} rows"
        )
    if not torch.isfinite(values).all():
        bad = (~torch.isfinite(values)).nonzero()[:5, 0].tolist()
        raise ValueError(f"values must be finite (NaN/inf at entries {bad}...)")
    return coords, values


class CollapsedFitWarning(UserWarning):
    """A FunBaT fit ended at a constant (the all-zero fixed point) and was restarted."""


class MomentNormal(torch.distributions.Normal):
    """A ``Normal`` given by its mean and variance that also unpacks as ``(mean, var)``
    (and indexes: ``[0]`` the mean, ``[1]`` the variance), the form
    :meth:`FunctionalTucker.predict` returned before it returned a distribution."""

    def __init__(self, mean: Tensor, var: Tensor):
        super().__init__(mean, var.clamp_min(0).sqrt(), validate_args=False)
        self._var = var

    def __iter__(self):
        return iter((self.loc, self._var))

    def __getitem__(self, i):
        return (self.loc, self._var)[i]


class FunctionalTucker:
    """FunBaT: Tucker (or CP) decomposition with Matern state-space GP factors.

    :param ranks: rank per mode (ints >= 1); ``K = len(ranks)`` modes.
    :param nu: Matern smoothness per mode (0.5, 1.5 or 2.5), scalar or per mode.
    :param lengthscale: kernel lengthscale per mode (same units as the coordinates).
    :param variance: kernel variance per mode.
    :param core: ``"tucker"`` (dense core) or ``"cp"`` (diagonal core, equal ranks).
    :param core_prior_scale: prior std ``s_w`` of the core entries.
    :param noise_prior: ``(a0, b0)`` of the Gamma prior on the noise precision.
    :param damping: step size rho in (0, 1] for the factor messages
        (``new = (1 - rho) old + rho computed``).
    :param max_iter: maximum number of CEP sweeps; ``tol``: stop when the relative
        change of the fitted training means falls below it.
    :param init: ``"als"`` (default: factor means and core from ``init_iter`` sweeps of ridge
        ALS with penalty ``init_reg``, coordinates as categories) or ``"random"`` (prior draws).
    :param schedule: ``"parallel"`` (all modes' messages from the same state,
        one Kalman pass batched over modes) or ``"sequential"`` (mode by mode).
    :param modes: ``"continuous"`` (a Matern GP over the coordinate, default) or
        ``"discrete"`` (an independent ``N(0, variance)`` embedding per coordinate value:
        the index as a category; unseen values predict from the prior), or ``"auto"``: chosen
        by validation in :meth:`fit` (greedily mode by mode, the lower validation RMSE on a
        held-out ``val_fraction`` of the entries; ``self.mode_val_rmse`` records them; the
        chosen model is then fitted to all entries), scalar or per mode.
    :param learn_hyperparameters: learn each mode's lengthscale and variance (discrete
        modes: the variance) by maximising the evidence of its factor messages, the
        Kalman-filter marginal likelihood ``log int p(u | ell, s2) prod_t m_t(u_t) du``
        (for fixed messages this is the part of the EP energy that depends on the prior),
        every ``hyper_every`` sweeps from sweep 3 on, ``hyper_rounds`` times (default: to
        the end; L-BFGS in log space);
        ``rank_lengthscales``: one lengthscale per rank component (a component may become
        nearly constant, an additive effect of the other modes). Lengthscales
        well below the coordinate spacing are reachable (the exact discretisation has no
        step-size limit).
    :param standardise: fit ``(values - mean) / std`` and report predictions and the noise
        in the values' units (values already standardised, to 1e-12, pass unchanged);
        ``False`` (default): values of extreme spread (outside [1e-2, 1e2]) are fitted in
        units of their power-of-ten scale, others as they are.
    """

    def __init__(
        self,
        ranks: Sequence[int],
        nu=1.5,
        lengthscale=1.0,
        variance=1.0,
        *,
        core: str = "tucker",
        core_prior_scale: float = 1.0,
        noise_prior: tuple[float, float] = (1e-3, 1e-3),
        damping: float = 0.5,
        max_iter: int = 100,
        tol: float = 1e-4,
        schedule: str = "sequential",
        seed: int | None = 0,
        init: str = "als",
        init_reg: float = 1.0,
        init_iter: int = 10,
        dtype: torch.dtype = torch.float64,
        progress: bool = True,
        modes=None,
        learn_hyperparameters: bool = False,
        hyper_every: int = 5,
        hyper_rounds: int | None = None,
        rank_lengthscales: bool = False,
        standardise: bool = False,
    ):
        if isinstance(ranks, int) or not hasattr(ranks, "__len__"):
            raise TypeError(f"ranks must be a sequence of ints (one per mode), got {ranks!r}")
        ranks = list(ranks)
        if len(ranks) < 1:
            raise ValueError("ranks must name at least one mode")
        for r in ranks:
            if not isinstance(r, int) or isinstance(r, bool):
                raise TypeError(f"ranks must be ints, got {ranks!r}")
            if r < 1:
                raise ValueError(f"ranks must be >= 1, got {ranks!r}")
        if core not in ("tucker", "cp"):
            raise ValueError(f"core must be 'tucker' or 'cp', got {core!r}")
        if core == "cp" and len(set(ranks)) != 1:
            raise ValueError(f"core='cp' needs equal ranks in every mode, got {ranks!r}")
        K = len(ranks)
        if K > len(_LETTERS) // 2:
            raise ValueError(f"at most {len(_LETTERS) // 2} modes are supported")
        self.ranks = ranks
        self.K = K
        self.nu = [_check_nu(v) for v in _per_mode(nu, K, "nu")]
        self.lengthscale = [float(v) for v in _per_mode(lengthscale, K, "lengthscale")]
        self.variance = [float(v) for v in _per_mode(variance, K, "variance")]
        for name, vals in (("lengthscale", self.lengthscale), ("variance", self.variance)):
            if any(not math.isfinite(v) or v <= 0 for v in vals):
                raise ValueError(f"{name} must be finite and > 0, got {vals}")
        if not (0 < damping <= 1):
            raise ValueError(f"damping must be in (0, 1], got {damping}")
        if core_prior_scale <= 0:
            raise ValueError(f"core_prior_scale must be > 0, got {core_prior_scale}")
        a0, b0 = noise_prior
        if a0 <= 0 or b0 <= 0:
            raise ValueError(f"noise_prior (a0, b0) must be positive, got {noise_prior}")
        if init not in ("als", "random"):
            raise ValueError(f"init must be 'als' or 'random', got {init!r}")
        if init_reg < 0 or init_iter < 0:
            raise ValueError("init_reg and init_iter must be >= 0")
        if schedule not in ("parallel", "sequential"):
            raise ValueError(f"schedule must be 'parallel' or 'sequential', got {schedule!r}")
        self.modes = [str(v) for v in _per_mode("continuous" if modes is None else modes, K,
                                                 "modes")]
        for v in self.modes:
            if v not in ("continuous", "discrete", "auto"):
                raise ValueError(f"modes must be 'continuous', 'discrete' or 'auto' (per mode), "
                                 f"got {v!r}")
        self._requested_modes = list(self.modes)
        if not isinstance(hyper_every, int) or hyper_every < 1:
            raise ValueError(f"hyper_every must be a positive int, got {hyper_every!r}")
        self.learn_hyperparameters = bool(learn_hyperparameters)
        self._initial_hyper = (list(self.lengthscale), list(self.variance))
        self.hyper_every = hyper_every
        if hyper_rounds is not None and (not isinstance(hyper_rounds, int) or hyper_rounds < 1):
            raise ValueError(f"hyper_rounds must be None or a positive int, got {hyper_rounds!r}")
        self.hyper_rounds = hyper_rounds
        self.rank_lengthscales = bool(rank_lengthscales)
        self.standardise = bool(standardise)
        self.core_type = core
        self.core_prior_scale = float(core_prior_scale)
        self.a0, self.b0 = float(a0), float(b0)
        self.damping = float(damping)
        self.max_iter = int(max_iter)
        self.tol = float(tol)
        self.schedule = schedule
        self.seed = seed
        self.init, self.init_reg, self.init_iter = init, float(init_reg), int(init_iter)
        self.dtype = dtype
        self.progress = progress
        self.fitted = False

    # ------------------------------------------------------------------ core helpers
    def _core_full(self) -> tuple[Tensor, Tensor, Tensor]:
        """Dense core mean (R_1..R_K), its elementwise variance, and E[w w^T] (P, P)."""
        R, P = self.ranks, math.prod(self.ranks)
        if self.core_type == "tucker":
            mean = self.core_mean.reshape(R)
            var = self.core_cov.diagonal().reshape(R)
            second = self.core_cov + torch.outer(self.core_mean, self.core_mean)
        else:
            idx = self._diag_flat_index()
            mean = self.core_mean.new_zeros(P)
            mean[idx] = self.core_mean
            var = torch.zeros_like(mean)
            var[idx] = self.core_cov.diagonal()
            second = mean.new_zeros(P, P)
            sec_small = self.core_cov + torch.outer(self.core_mean, self.core_mean)
            second[idx[:, None], idx[None, :]] = sec_small
            mean, var = mean.reshape(R), var.reshape(R)
        return mean, var, second

    def _diag_flat_index(self) -> Tensor:
        R = self.ranks[0]
        r = torch.arange(R)
        flat = torch.zeros(R, dtype=torch.long)
        for _ in range(self.K):
            flat = flat * R + r
        return flat

    # ------------------------------------------------------------------ moments
    def _core_moments(self) -> tuple[Tensor, Tensor]:
        """Core mean and second moment E[w w^T] in the form the moment functions take:
        Tucker: flat (P,), (P, P); CP: the diagonal (R,), (R, R)."""
        return self.core_mean, self.core_cov + torch.outer(self.core_mean, self.core_mean)

    def _update_core_and_noise(self, y: Tensor, yy: Tensor, update_noise: bool = True):
        """Closed-form core update N(mu, Sigma), Sigma^-1 = I/s^2 + E[tau] S, then tau."""
        cp = self.core_type == "cp"
        S, h = core_statistics(self.u_mean, self.u_var, self._idx, y, self.ranks, cp=cp)
        Etau = self.tau_a / self.tau_b
        prec = S * Etau + torch.eye(S.shape[0], dtype=self.dtype) / self.core_prior_scale**2
        Lp = cholesky(prec, name="core posterior precision")
        self.core_mean = cholesky_solve(Lp, (Etau * h).unsqueeze(-1)).squeeze(-1)
        self.core_cov = cholesky_solve(Lp, torch.eye(S.shape[0], dtype=self.dtype))
        if update_noise:
            second = self.core_cov + torch.outer(self.core_mean, self.core_mean)
            sse = yy - 2 * (h * self.core_mean).sum() + (second * S).sum()
            self.tau_a = self.a0 + 0.5 * y.shape[0]
            self.tau_b = self.b0 + 0.5 * float(sse.clamp_min(0))

    # ------------------------------------------------------------------ Kalman over modes
    def _prepare_chains(self):
        """Per-mode SSMs and discretisations, padded into one batch (sum_k R_k, T_max, d_max)."""
        self._ssm = [None] * self.K
        self._AQ = [None] * self.K
        for k in range(self.K):
            if self.modes[k] == "continuous":
                self._set_chain(k)

    def _set_chain(self, k: int) -> None:
        """Mode ``k``'s SSM at its current hyper-parameters and its discretisation over the
        gaps between its sorted unique coordinates."""
        u = self.unique_coords[k]
        ssm = matern_ssm(self.nu[k],
                         self._rank_ell[k].to(self.dtype).expand(self.ranks[k]).to(u.device),
                         self.variance[k], dtype=self.dtype, device=u.device)
        gaps = torch.cat([u.new_zeros(1), u.diff()])
        self._ssm[k] = ssm
        self._AQ[k] = discretise(ssm, gaps.expand(self.ranks[k], -1))

    def _run_chains(self, modes: list[int]):
        """Kalman filter + RTS smoother for the listed modes, batched; updates u moments.
        Discrete modes: the closed-form product of the N(0, variance) prior and the
        messages, per coordinate value."""
        for k in [k for k in modes if self.modes[k] == "discrete"]:
            prec = self.msg_lam[k] + 1.0 / self.variance[k]
            self.u_mean[k] = self.msg_eta[k] / prec
            self.u_var[k] = 1.0 / prec
            self._states[k] = None
        modes = [k for k in modes if self.modes[k] == "continuous"]
        if not modes:
            return
        Tm = max(self.unique_coords[k].shape[0] for k in modes)
        dm = max(self._ssm[k].state_dim for k in modes)
        As, Qs, P0s, lams, etas = [], [], [], [], []
        dt_ = self.dtype
        for k in modes:
            A, Q = self._AQ[k]
            R, T, d, _ = A.shape
            eye = torch.eye(dm, dtype=dt_)
            Ap = eye.expand(R, Tm, dm, dm).clone()
            Ap[:, :T, :d, :d] = A
            Qp = A.new_zeros(R, Tm, dm, dm)
            Qp[:, :T, :d, :d] = Q
            P0 = eye.expand(R, dm, dm).clone()
            P0[:, :d, :d] = self._ssm[k].P_inf
            lam = A.new_zeros(R, Tm)
            eta = A.new_zeros(R, Tm)
            lam[:, :T] = self.msg_lam[k]
            eta[:, :T] = self.msg_eta[k]
            As.append(Ap)
            Qs.append(Qp)
            P0s.append(P0)
            lams.append(lam)
            etas.append(eta)
        A = torch.cat(As)
        filt = kalman_filter(A, torch.cat(Qs), torch.cat(P0s), torch.cat(lams), torch.cat(etas))
        smooth = rts_smoother(A, filt)
        start = 0
        for k in modes:
            R, T, d = self.ranks[k], self.unique_coords[k].shape[0], self._ssm[k].state_dim
            sl = slice(start, start + R)
            start += R
            self.u_mean[k] = smooth.mean[sl, :T, 0].clone()
            self.u_var[k] = smooth.cov[sl, :T, 0, 0].clamp_min(0).clone()
            self._states[k] = (
                filt.m_filt[sl, :T, :d].clone(),
                filt.P_filt[sl, :T, :d, :d].clone(),
                smooth.mean[sl, :T, :d].clone(),
                smooth.cov[sl, :T, :d, :d].clone(),
            )
            self._pred[k] = (filt.m_pred[sl, :T, :d].clone(), filt.P_pred[sl, :T, :d, :d].clone())

    def _message_evidence(self, k: int, log_ell: Tensor, log_var: Tensor) -> Tensor:
        """log int p(u^k | ell, s2) prod_t m_t(u^k_t) du^k summed over the rank, up to
        the messages' constants (differentiable in ``log_ell``, ``log_var``)."""
        lam, eta = self.msg_lam[k], self.msg_eta[k]
        var = log_var.exp()
        if self.modes[k] == "discrete":
            obs = lam > 0
            safe = torch.where(obs, lam, torch.ones_like(lam))
            v = var + 1.0 / safe
            ll = -0.5 * (torch.log(v) + (eta / safe) ** 2 / v)
            return torch.where(obs, ll, torch.zeros_like(ll)).sum()
        R = self.ranks[k]
        ssm = matern_ssm(self.nu[k], log_ell.exp().expand(R), var.expand(R), dtype=self.dtype)
        # (log_ell may hold one lengthscale per rank component: rank_lengthscales=True)
        u = self.unique_coords[k]
        gaps = torch.cat([u.new_zeros(1), u.diff()])
        A, Q = discretise(ssm, gaps.expand(R, -1))
        return kalman_filter(A, Q, ssm.P_inf, lam, eta).log_marginal.sum()

    def _learn_mode_hyperparameters(self, k: int, max_iter: int = 10) -> None:
        """Maximise :meth:`_message_evidence` over mode ``k``'s (log) lengthscale and
        variance with L-BFGS (lengthscale within [1e-4, 10] x the coordinates' span)."""
        if not bool((self.msg_lam[k] > 0).any()):
            return
        u = self.unique_coords[k]
        span = float(u[-1] - u[0]) if u.shape[0] > 1 else 1.0
        span = span if span > 0 else 1.0
        lo, hi = math.log(1e-4 * span), math.log(10.0 * span)
        ell0 = torch.as_tensor(self._rank_ell[k], dtype=self.dtype)
        log_ell = ell0.log().clone().requires_grad_(True)
        log_var = torch.tensor(math.log(self.variance[k]), dtype=self.dtype, requires_grad=True)
        params = [log_var] if self.modes[k] == "discrete" else [log_ell, log_var]
        opt = torch.optim.LBFGS(params, max_iter=max_iter, line_search_fn="strong_wolfe")
        start = [p.detach().clone() for p in params]

        def closure():
            opt.zero_grad()
            loss = -self._message_evidence(k, log_ell.clamp(lo, hi), log_var.clamp(-12, 12))
            loss.backward()
            return loss

        with torch.enable_grad():
            before = float(closure().detach())
            opt.step(closure)
            after = float(closure().detach())
        if not math.isfinite(after) or after > before:  # keep the old values
            for p, s0 in zip(params, start):
                p.data.copy_(s0)
        self._rank_ell[k] = log_ell.detach().clamp(lo, hi).exp()
        self.lengthscale[k] = float(self._rank_ell[k].log().mean().exp())  # geometric mean
        self.variance[k] = float(log_var.detach().clamp(-12, 12).exp())
        if self.modes[k] == "continuous":
            self._set_chain(k)

    # ------------------------------------------------------------------ fit
    def fit(self, coords, values, *, restarts: int = 1, val_fraction: float = 0.1):
        """Fit by conditional expectation propagation.

        A fit that ends *collapsed* (its fitted entries constant while the values are not:
        the all-zero fixed point of the multilinear model, which the ALS start can reach)
        is detected, and refitted once from a random start (``init="random"``) with a
        :class:`CollapsedFitWarning`; ``self.restarted`` records it.

        :param coords: (N, K) continuous coordinates (float; integer indexes work too).
        :param values: (N,) observed entries.
        :param restarts: with ``restarts > 1``, a random ``val_fraction`` of the entries is
            held out, the model is fitted to the rest from ``restarts`` seeds (``seed``,
            ``seed + 1000``, ...) and the fit of lowest validation RMSE is kept
            (``self.restart_val_rmse`` lists them; the kept fit has not seen the held-out
            entries). Restarts matter: on Beijing PM2.5 two seeds' validation RMSEs differ
            by up to 0.04 (``benchmarks/results/funbat_beijing_learned.err``).
        :returns: ``self``.
        """
        if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
            raise ValueError(f"restarts must be a positive int, got {restarts!r}")
        if "auto" in self._requested_modes:
            return self._fit_auto_modes(coords, values, restarts, val_fraction)
        if restarts == 1:
            return self._fit_checked(coords, values)
        coords, y, val, trn = self._holdout(coords, values, val_fraction)
        seed0, best, self.restart_val_rmse = self.seed, None, []
        try:
            for r in range(restarts):
                self.seed = (0 if seed0 is None else seed0) + 1000 * r
                self._fit_checked(coords[trn], y[trn])
                rmse = float(((self.predict(coords[val]).mean - y[val]) ** 2).mean().sqrt())
                self.restart_val_rmse.append(rmse)
                if best is None or rmse < best[0]:
                    best = (rmse, {k: v for k, v in self.__dict__.items()
                                   if k not in ("restart_val_rmse", "seed")})
        finally:
            self.seed = seed0
        self.__dict__.update(best[1])
        return self

    def _holdout(self, coords, values, val_fraction):
        """Checked ``coords, y`` and a random held-out / fitted split of the entries
        (``val_fraction`` of them held out; seeded by ``self.seed``)."""
        if not 0 < val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        coords, y = check_tensor_data(coords, values, n_modes=self.K, dtype=self.dtype)
        gen = torch.Generator().manual_seed(0 if self.seed is None else self.seed)
        perm = torch.randperm(y.shape[0], generator=gen)
        n_val = max(1, int(round(val_fraction * y.shape[0])))
        return coords, y, perm[:n_val], perm[n_val:]

    def _fit_auto_modes(self, coords, values, restarts, val_fraction):
        """``modes="auto"``: each such mode continuous or discrete by validation RMSE on
        a held-out part (greedy over the modes, in order), then the chosen model fitted to
        all the entries."""
        coords, y, val, trn = self._holdout(coords, values, val_fraction)
        requested = list(self._requested_modes)
        choice = ["continuous" if m == "auto" else m for m in requested]
        scores = {}

        def score(modes):
            key = tuple(modes)
            if key not in scores:
                self.modes = list(modes)
                self._fit_checked(coords[trn], y[trn])
                scores[key] = float(((self.predict(coords[val]).mean - y[val]) ** 2)
                                    .mean().sqrt())
            return scores[key]

        record = {}
        try:
            for k in [k for k, m in enumerate(requested) if m == "auto"]:
                for cand in ("continuous", "discrete"):
                    trial = list(choice)
                    trial[k] = cand
                    record[(k, cand)] = score(trial)
                choice[k] = min(("continuous", "discrete"), key=lambda c: record[(k, c)])
            self.modes = choice
            self._requested_modes = choice  # the final fit (and its restarts) use these
            self.fit(coords, y, restarts=restarts, val_fraction=val_fraction)
        finally:
            self._requested_modes = requested
        self.mode_val_rmse = record
        return self

    def _fit_checked(self, coords, values):
        """One fit with the collapse check and its random-start refit."""
        self.restarted = False
        self._fit_once(coords, values)
        if self.collapsed and self.init != "random":
            warnings.warn(
                f"FunctionalTucker: the fit from init={self.init!r} collapsed to a constant "
                f"(training RMSE {self.history[-1]['train_rmse']:.4g} = the values' spread); "
                f"refitting from init='random'", CollapsedFitWarning, stacklevel=3)
            init, self.init = self.init, "random"
            try:
                self._fit_once(coords, values)
            finally:
                self.init = init
            self.restarted = True
        if self.collapsed:
            warnings.warn("FunctionalTucker: the fit is constant (collapsed) even from a random "
                          "start; try other ranks, lengthscales or seeds", CollapsedFitWarning,
                          stacklevel=3)
        return self

    def _fit_once(self, coords, values):
        coords, y = check_tensor_data(coords, values, n_modes=self.K, dtype=self.dtype)
        N = y.shape[0]
        if N < 3:
            raise ValueError(f"values must hold at least 3 entries to fit a FunctionalTucker "
                             f"(the noise posterior needs a0 + N/2 > 1 for E[1/tau]), got {N}")
        # values of extreme magnitude (spread outside [1e-2, 1e2]) are fitted in units of
        # the power of ten nearest their standard deviation, where the ALS start and the
        # priors are meant to work; predictions and the noise variance are reported in the
        # values' own units. Values of ordinary spread are fitted as they are (the ALS start
        # is sensitive to the scale: 3.8-spread data divided by 10 collapsed once)
        if self.standardise:
            loc, scale = target_statistics(y[:, None])
            self._y_loc, self._y_scale = float(loc), float(scale)
        else:
            self._y_loc, self._y_scale = 0.0, power_of_ten_scale(y, ordinary=(1e-2, 1e2))
        y = (y - self._y_loc) / self._y_scale
        gen = torch.Generator().manual_seed(self.seed if self.seed is not None else torch.seed())
        # every fit starts from the constructor's hyper-parameters (learning changes them)
        self.lengthscale, self.variance = (list(v) for v in self._initial_hyper)
        # per rank component (rank_lengthscales) or one shared value per mode
        self._rank_ell = [torch.full((self.ranks[k],) if self.rank_lengthscales else (1,),
                                     self.lengthscale[k], dtype=self.dtype)
                          for k in range(self.K)]
        self.unique_coords, self._idx = [], []
        for k in range(self.K):
            u, inv = torch.unique(coords[:, k], sorted=True, return_inverse=True)
            self.unique_coords.append(u)
            self._idx.append(inv)
        self._prepare_chains()
        self.u_mean = [
            torch.randn(self.ranks[k], len(self.unique_coords[k]), generator=gen, dtype=self.dtype)
            * math.sqrt(self.variance[k])
            for k in range(self.K)
        ]
        self.u_var = [torch.zeros_like(m) for m in self.u_mean]
        self.msg_lam = [torch.zeros_like(m) for m in self.u_mean]
        self.msg_eta = [torch.zeros_like(m) for m in self.u_mean]
        self._states = [None] * self.K
        self._pred = [None] * self.K  # filter predictions (for streaming and smoothing)
        P = math.prod(self.ranks) if self.core_type == "tucker" else self.ranks[0]
        # start away from the degenerate all-zero fixed point: core N(0, s^2) (CP: ones),
        # small core covariance, and the noise precision at 1 / var(y)
        if self.core_type == "cp":
            self.core_mean = torch.ones(P, dtype=self.dtype)
        else:
            self.core_mean = torch.randn(P, generator=gen, dtype=self.dtype) * self.core_prior_scale
        self.core_cov = torch.eye(P, dtype=self.dtype) * 1e-6
        if self.init == "als" and self.init_iter > 0:
            # start from a ridge-ALS solution treating coordinates as categories: mean-field
            # CEP updates one latent function at a time and needs many sweeps from a random start
            seed = int(torch.randint(0, 2**31 - 1, (1,), generator=gen))
            self.u_mean, self.core_mean = als_fit(
                self._idx, y, self.ranks, [len(u) for u in self.unique_coords],
                reg=self.init_reg, n_iter=self.init_iter, core=self.core_type, seed=seed,
                init_scale=math.sqrt(min(self.variance)),
            )
        self.tau_a = 1.0
        self.tau_b = float(y.var().clamp_min(1e-12)) if N > 1 else 1.0
        yy = (y * y).sum()
        self.history = []
        f_old = None
        from tqdm.auto import tqdm

        bar = tqdm(range(self.max_iter), desc="FunBaT CEP", disable=not self.progress, leave=False)
        self.converged = False
        for it in bar:
            # factor messages (grouped per unique coordinate) + Kalman/RTS per mode
            Etau = self.tau_a / self.tau_b
            groups = (
                [list(range(self.K))]
                if self.schedule == "parallel"
                else [[k] for k in range(self.K)]
            )
            rho = self.damping if it > 0 else 1.0
            w_mean, w_second = self._core_moments()
            for modes in groups:
                j, r = divmod(it - 3, self.hyper_every)
                learn = (self.learn_hyperparameters and it >= 3 and r == 0
                         and (self.hyper_rounds is None or j < self.hyper_rounds))
                new = [
                    factor_messages(
                        self.u_mean, self.u_var, self._idx, y, k, Etau, w_mean, w_second,
                        self.ranks, cp=self.core_type == "cp",
                    )
                    for k in modes
                ]
                for k, (lam, eta) in zip(modes, new):
                    self.msg_lam[k] = (1 - rho) * self.msg_lam[k] + rho * lam
                    self.msg_eta[k] = (1 - rho) * self.msg_eta[k] + rho * eta
                    if learn:
                        self._learn_mode_hyperparameters(k)
                self._run_chains(modes)
            self._update_core_and_noise(y, yy)
            f = self._mean_at(self._idx)
            rmse = float(((f - y) ** 2).mean().sqrt())
            delta = (
                float("inf")
                if f_old is None
                else float((f - f_old).norm() / f_old.norm().clamp_min(1e-300))
            )
            f_old = f
            self.history.append(
                {"iter": it, "train_rmse": rmse, "delta": delta, "noise_std": (1 / Etau) ** 0.5}
            )
            bar.set_postfix(rmse=f"{rmse:.4f}", delta=f"{delta:.1e}")
            if delta < self.tol:
                self.converged = True
                break
        bar.close()
        # final core update consistent with the last factor posteriors
        self._update_core_and_noise(y, yy, update_noise=False)
        self.n_iter = len(self.history)
        self.fitted = True
        f = self._mean_at(self._idx)
        spread = float(y.std()) if N > 1 else 0.0
        self.collapsed = bool(spread > 0 and float(f.std()) <= 1e-6 * spread)
        return self

    def _mean_at(self, idx: list[Tensor]) -> Tensor:
        Mfull, _, _ = self._core_full()
        letters = _LETTERS[: self.K]
        ops = [Mfull] + [self.u_mean[k][:, idx[k]].T for k in range(self.K)]
        subs = [letters] + ["n" + c for c in letters]
        return torch.einsum(",".join(subs) + "->n", *ops)

    @property
    def noise_variance(self) -> float:
        """Posterior mean of the noise variance, E[1/tau] = b / (a - 1), in the values'
        units."""
        return self.tau_b / max(self.tau_a - 1.0, 1e-12) * getattr(self, "_y_scale", 1.0) ** 2

    # ------------------------------------------------------------------ streaming
    @torch.no_grad()
    def partial_fit(self, coords, values, *, mode: int | None = None,
                    inner_iter: int = 10) -> "FunctionalTucker":
        """Absorb new entries that arrive in order along the streaming ``mode`` (default
        the last one, a continuous mode: time), at coordinates beyond every one absorbed
        so far; the other modes' coordinates may be new (their factors are read from the
        posterior there: interpolated by the GP, a discrete mode's prior).

        Assumed-density filtering in time: the Kalman filter of ``mode`` continues from its
        last filtered state over the new coordinates, one step each; at a step, the new
        entries' mean-field messages (their moments under the other modes' posteriors and
        the core) are absorbed at their fixed point over the rank components
        (``inner_iter`` Gauss-Seidel passes).
        Cost linear in the new entries and coordinates; the other modes, the core and the
        noise are held. The result does not depend on how the stream is cut into calls
        (one call with everything = many small ones). New coordinates hold filtered
        moments until :meth:`smooth`, whose RTS pass gives the batch smoother of all
        messages (tested against the parallel-scan smoother). Predictions at coordinates
        beyond the last are forecasts.
        """
        if not self.fitted:
            raise RuntimeError("call fit() before partial_fit()")
        k = self.K - 1 if mode is None else mode
        if not isinstance(k, int) or not 0 <= k < self.K:
            raise ValueError(f"mode must be an int in [0, {self.K}), got {mode!r}")
        if self.modes[k] != "continuous":
            raise ValueError(f"the streaming mode must be continuous, mode {k} is "
                             f"{self.modes[k]}")
        if isinstance(inner_iter, bool) or not isinstance(inner_iter, int) or inner_iter < 1:
            raise ValueError(f"inner_iter must be a positive int, got {inner_iter!r}")
        coords, y = check_tensor_data(coords, values, n_modes=self.K, dtype=self.dtype)
        y = (y - self._y_loc) / self._y_scale
        last = float(self.unique_coords[k][-1])
        t = coords[:, k]
        if bool((t <= last).any()):
            raise ValueError(f"partial_fit streams in order along mode {k}: every new entry's "
                             f"mode-{k} coordinate must be > the last one absorbed ({last:g}), "
                             f"got a minimum of {float(t.min()):g}")
        # the other modes' moments at the new entries' coordinates (posterior at seen
        # values, the GP's interpolation at unseen ones), grouped per unique value
        idx, ph_mean, ph_var = [], [], []
        for j in range(self.K):
            uj, inv = torch.unique(coords[:, j], sorted=True, return_inverse=True)
            idx.append(inv)
            if j == k:
                new_u = uj
                ph_mean.append(uj.new_zeros(self.ranks[k], uj.shape[0]))
                ph_var.append(torch.zeros_like(ph_mean[-1]))
            else:
                mean, var = self.factor_posterior(j, uj)
                ph_mean.append(mean.T.contiguous())
                ph_var.append(var.T.contiguous())
        R, U = self.ranks[k], new_u.shape[0]
        w_mean, w_second = self._core_moments()
        Eaa, Eay = factor_statistics(ph_mean, ph_var, idx, y, k, w_mean, w_second, self.ranks,
                                     cp=self.core_type == "cp")
        Etau = self.tau_a / self.tau_b
        gaps = torch.cat([new_u[:1] - last, new_u.diff()])
        A, Q = discretise(self._ssm[k], gaps.expand(R, -1))
        m_f, P_f, m_s, P_s = self._states[k]
        m, P = m_f[:, -1], P_f[:, -1]
        out = {n: [] for n in ("m_pred", "P_pred", "m_filt", "P_filt", "lam", "eta")}
        for step in range(U):  # one Kalman step per new coordinate
            m = (A[:, step] @ m.unsqueeze(-1)).squeeze(-1)
            P = A[:, step] @ P @ A[:, step].mT + Q[:, step]
            P = 0.5 * (P + P.mT)
            out["m_pred"].append(m)
            out["P_pred"].append(P)
            # the step's mean-field fixed point over the rank components (Gauss-Seidel: a
            # component's message uses the others' current filtered means; one Jacobi step
            # from the prediction overshoots when the components are correlated)
            E, h = Eaa[step], Eay[step]
            lam = Etau * E.diagonal()
            gain = P[:, :, 0]
            S = 1.0 + lam * P[:, 0, 0]
            mf = m.clone()
            eta = torch.zeros_like(lam)
            for _ in range(inner_iter):
                for r in range(R):
                    cross = E[r] @ mf[:, 0] - E[r, r] * mf[r, 0]
                    eta[r] = Etau * (h[r] - cross)
                    mf[r] = m[r] + gain[r] * (eta[r] - lam[r] * m[r, 0]) / S[r]
            P = P - (lam / S)[:, None, None] * gain.unsqueeze(-1) * gain.unsqueeze(-2)
            m, P = mf, 0.5 * (P + P.mT)
            for n, v in (("m_filt", m), ("P_filt", P), ("lam", lam), ("eta", eta.clone())):
                out[n].append(v)
        st = {n: torch.stack(v, 1) for n, v in out.items()}
        self.unique_coords[k] = torch.cat([self.unique_coords[k], new_u])
        self.msg_lam[k] = torch.cat([self.msg_lam[k], st["lam"]], 1)
        self.msg_eta[k] = torch.cat([self.msg_eta[k], st["eta"]], 1)
        A0, Q0 = self._AQ[k]
        self._AQ[k] = (torch.cat([A0, A], 1), torch.cat([Q0, Q], 1))
        mp, Pp = self._pred[k]
        self._pred[k] = (torch.cat([mp, st["m_pred"]], 1), torch.cat([Pp, st["P_pred"]], 1))
        self._states[k] = (torch.cat([m_f, st["m_filt"]], 1), torch.cat([P_f, st["P_filt"]], 1),
                           torch.cat([m_s, st["m_filt"]], 1), torch.cat([P_s, st["P_filt"]], 1))
        self.u_mean[k] = torch.cat([self.u_mean[k], st["m_filt"][..., 0]], 1)
        self.u_var[k] = torch.cat([self.u_var[k], st["P_filt"][..., 0, 0].clamp_min(0)], 1)
        self._stream_mode = k
        return self

    @torch.no_grad()
    def smooth(self, mode: int | None = None) -> "FunctionalTucker":
        """RTS smoothing pass over the streaming mode's whole chain (after
        :meth:`partial_fit`): the posterior of every coordinate given every message."""
        if not self.fitted:
            raise RuntimeError("call fit() before smooth()")
        k = getattr(self, "_stream_mode", self.K - 1) if mode is None else mode
        if self.modes[k] != "continuous":
            raise ValueError(f"mode {k} is discrete: nothing to smooth")
        m_f, P_f, _, _ = self._states[k]
        m_p, P_p = self._pred[k]
        sm = rts_smoother(self._AQ[k][0], FilterResult(m_p, P_p, m_f, P_f, None))
        self._states[k] = (m_f, P_f, sm.mean, sm.cov)
        self.u_mean[k] = sm.mean[..., 0].clone()
        self.u_var[k] = sm.cov[..., 0, 0].clamp_min(0).clone()
        return self

    # ------------------------------------------------------------------ predict
    def factor_posterior(self, k: int, x) -> tuple[Tensor, Tensor]:
        """Posterior mean and variance of the latent functions u^k_r at coordinates ``x``.

        :param x: (M,) coordinates of mode ``k`` (any real values).
        :returns: ``(mean, var)`` each (M, R_k).
        """
        if not self.fitted:
            raise RuntimeError("call fit() before predicting")
        x = torch.as_tensor(x, dtype=self.dtype).reshape(-1)
        if not torch.isfinite(x).all():
            raise ValueError("coordinates must be finite")
        u = self.unique_coords[k]
        if self.modes[k] == "discrete":  # seen values: the posterior; unseen: the prior
            pos = torch.searchsorted(u, x.contiguous()).clamp_max(u.shape[0] - 1)
            seen = u[pos] == x
            mean = torch.where(seen, self.u_mean[k][:, pos], torch.zeros_like(x))
            var = torch.where(seen, self.u_var[k][:, pos],
                              torch.full_like(x, self.variance[k]))
            return mean.T, var.T
        m_f, P_f, m_s, P_s = self._states[k]
        xq, inv = torch.unique(x, sorted=True, return_inverse=True)
        U, Mq, R = u.shape[0], xq.shape[0], self.ranks[k]
        pos = torch.searchsorted(u, xq)
        exact = (pos < U) & (u[pos.clamp_max(U - 1)] == xq)
        mean = xq.new_zeros(R, Mq)
        var = xq.new_zeros(R, Mq)
        e = exact.nonzero()[:, 0]
        mean[:, e] = m_s[:, pos[e], 0]
        var[:, e] = P_s[:, pos[e], 0, 0]
        ne = (~exact).nonzero()[:, 0]
        if ne.numel():
            p = pos[ne]
            has_left = p > 0
            has_right = p < U
            li = (p - 1).clamp_min(0)
            ri = p.clamp_max(U - 1)
            dl = torch.where(has_left, xq[ne] - u[li], torch.zeros_like(xq[ne]))
            dr = torch.where(has_right, u[ri] - xq[ne], torch.zeros_like(xq[ne]))
            ssm = self._ssm[k]
            Al, Ql = discretise(ssm, dl.expand(R, -1))
            Ar, Qr = discretise(ssm, dr.expand(R, -1))
            hl = has_left.expand(R, -1)
            hr = has_right.expand(R, -1)
            mq, Pq = condition_on_neighbours(
                Al,
                Ql,
                Ar,
                Qr,
                m_f[:, li],
                P_f[:, li],
                m_s[:, ri],
                P_s[:, ri],
                hl,
                hr,
                ssm.P_inf[:, None].expand_as(Al),
            )
            mean[:, ne] = mq[..., 0]
            var[:, ne] = Pq[..., 0, 0]
        return mean[:, inv].T, var[:, inv].T.clamp_min(0)

    @torch.no_grad()
    def pyro_model(self, coords=None, likelihood=None):
        """The fitted model in Pyro: ``(pyro_tucker, guide)``, a
        :class:`~pyro_dkm.tucker.PyroFunctionalTucker` on the fitted unique coordinates
        (plus those of ``coords``, ``(M, K)``, where it should predict) with this model's
        priors and ``likelihood``, and a :class:`~pyro_dkm.tucker.pyro_model.
        TuckerMeanFieldGuide` at the CEP posterior (:func:`guide_from_cep`): the ``model`` /
        ``guide`` pair for SVI, other likelihoods or a bigger Pyro model."""
        from .pyro_model import PyroFunctionalTucker, guide_from_cep

        if not self.fitted:
            raise RuntimeError("call fit() before pyro_model()")
        if self.rank_lengthscales:
            raise ValueError("pyro_model() needs one lengthscale per mode "
                             "(rank_lengthscales=False)")
        if "discrete" in self.modes:
            raise ValueError("pyro_model() supports continuous modes only (this model has "
                             f"modes={self.modes})")
        if getattr(self, "_y_scale", 1.0) != 1.0 or getattr(self, "_y_loc", 0.0) != 0.0:
            raise ValueError(f"pyro_model() needs a fit on values as they are (these were "
                             f"fitted as (values - {self._y_loc:g}) / {self._y_scale:g}); "
                             f"transform the values so, refit with standardise=False, and "
                             f"map the Pyro model's entries back")
        grids = [u.clone() for u in self.unique_coords]
        if coords is not None:
            coords, _ = check_tensor_data(coords, n_modes=self.K, dtype=self.dtype)
            grids = [torch.unique(torch.cat([g, coords[:, k]]), sorted=True)
                     for k, g in enumerate(grids)]
        pm = PyroFunctionalTucker(grids, self.ranks, self.nu, self.lengthscale, self.variance,
                                  core=self.core_type, core_prior_scale=self.core_prior_scale,
                                  noise_prior=(self.a0, self.b0), likelihood=likelihood)
        return pm, guide_from_cep(pm, self)

    def predict(
        self, coords, *, include_noise: bool = True, chunk: int = 1024
    ) -> "MomentNormal":
        """Predictive distribution of entries at arbitrary continuous coordinates.

        :param coords: (M, K) coordinates.
        :returns: a :class:`MomentNormal` (a ``torch.distributions.Normal``, batch (M,))
            with the predictive mean and variance; the variance includes the noise
            variance ``E[1/tau]`` unless ``include_noise=False``. It also unpacks as
            ``mean, var = m.predict(coords)``.
        """
        if not self.fitted:
            raise RuntimeError("call fit() before predict()")
        coords, _ = check_tensor_data(coords, n_modes=self.K, dtype=self.dtype)
        mv = [self.factor_posterior(k, coords[:, k]) for k in range(self.K)]
        Mfull, _, second = self._core_full()
        letters = _LETTERS[: self.K]
        upper = _LETTERS[self.K : 2 * self.K]
        ops = [Mfull] + [m for m, _ in mv]
        mean = torch.einsum(",".join([letters] + ["n" + c for c in letters]) + "->n", *ops)
        W2 = second.reshape(self.ranks + self.ranks)
        Ef2 = []
        for s in range(0, coords.shape[0], chunk):
            sl = slice(s, s + chunk)
            Es = [m[sl, :, None] * m[sl, None, :] + torch.diag_embed(v[sl]) for m, v in mv]
            subs = [letters + upper] + ["n" + a + b for a, b in zip(letters, upper)]
            Ef2.append(torch.einsum(",".join(subs) + "->n", W2, *Es))
        var = (torch.cat(Ef2) - mean**2).clamp_min(0)
        s = getattr(self, "_y_scale", 1.0)  # fit units -> the values' units
        mean, var = mean * s + getattr(self, "_y_loc", 0.0), var * s * s
        if include_noise:
            var = var + self.noise_variance
        return MomentNormal(mean, var)
