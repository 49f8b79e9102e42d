"""FunBaT as a Pyro model: state-space GP factors, Tucker/CP core, any likelihood.

The generative model is the one :class:`~pyro_dkm.tucker.FunctionalTucker`
fits by conditional EP, written with ``pyro.sample`` statements so that it can
be trained with SVI, given a different likelihood (Student-t, Poisson, ...)
by overriding :meth:`PyroFunctionalTucker.likelihood`, or embedded in a bigger
model. The latent state sequence of each factor ``u^k_r`` over the sorted
unique coordinates of mode k has the Gauss-Markov prior
:class:`GaussMarkovChain` (exact discretisation of the Matern SDE), whose
log-density costs O(T d^3) and is vectorised over time.
"""

from __future__ import annotations

import math
from typing import Sequence

import pyro
import pyro.distributions as dist
import torch
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints
from torch.distributions.transforms import ReshapeTransform

from ..linalg import cholesky
from .model import _LETTERS, check_tensor_data
from .ssm import _check_nu, discretise, matern_ssm

__all__ = [
    "GaussMarkovChain",
    "PyroFunctionalTucker",
    "TuckerMeanFieldGuide",
    "grids_and_index",
    "guide_from_cep",
]


class GaussMarkovChain(TorchDistribution):
    """Zero-mean Gauss-Markov chain :math:`x_0 \\sim N(0, P_0)`,
    :math:`x_t = A_t x_{t-1} + N(0, Q_t)`.

    :param P0: (..., d, d) covariance of the first state.
    :param A: (..., T, d, d) transitions (``A[..., 0, :, :]`` is unused).
    :param Q: (..., T, d, d) process noise (``Q[..., 0, :, :]`` unused); must be
        positive definite for t >= 1 (distinct coordinates).

    ``event_shape = (T, d)``. Unlike ``pyro.distributions.GaussianHMM`` (which
    integrates the states out), the states themselves are the random variable,
    so a guide can put a posterior on them.
    """

    arg_constraints = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def __init__(self, P0: Tensor, A: Tensor, Q: Tensor, validate_args=None):
        T, d = A.shape[-3], A.shape[-1]
        batch_shape = torch.broadcast_shapes(P0.shape[:-2], A.shape[:-3], Q.shape[:-3])
        self.P0 = P0.expand(batch_shape + (d, d))
        self.A = A.expand(batch_shape + (T, d, d))
        self.Q = Q.expand(batch_shape + (T, d, d))
        self._L0 = cholesky(self.P0, name="P0")
        self._LQ = cholesky(self.Q[..., 1:, :, :], name="process noise Q") if T > 1 else None
        super().__init__(batch_shape, torch.Size((T, d)), validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        batch_shape = torch.Size(batch_shape)
        new = self._get_checked_instance(GaussMarkovChain, _instance)
        T, d = self.event_shape
        new.P0 = self.P0.expand(batch_shape + (d, d))
        new.A = self.A.expand(batch_shape + (T, d, d))
        new.Q = self.Q.expand(batch_shape + (T, d, d))
        new._L0 = self._L0.expand(batch_shape + (d, d))
        new._LQ = None if self._LQ is None else self._LQ.expand(batch_shape + (T - 1, d, d))
        super(GaussMarkovChain, new).__init__(batch_shape, self.event_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, x: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(x)
        lp = dist.MultivariateNormal(torch.zeros_like(x[..., 0, :]), scale_tril=self._L0).log_prob(
            x[..., 0, :]
        )
        if self._LQ is not None:
            pred = (self.A[..., 1:, :, :] @ x[..., :-1, :].unsqueeze(-1)).squeeze(-1)
            lp = lp + dist.MultivariateNormal(pred, scale_tril=self._LQ).log_prob(
                x[..., 1:, :]
            ).sum(-1)
        return lp

    def precision_matrix(self) -> Tensor:
        """Dense joint precision (..., T d, T d) of the stacked states (block tridiagonal).

        With ``e = M x`` the innovations (``M`` block bidiagonal: ``I`` on the diagonal,
        ``-A_t`` below it), ``Cov(e) = blockdiag(P0, Q_1, ..)`` and the precision is
        ``M^T Cov(e)^-1 M``. Meant for tests and small grids.
        """
        T, d = self.event_shape
        batch = self.batch_shape
        M = self.A.new_zeros(batch + (T * d, T * d))
        eye = torch.eye(d, dtype=self.A.dtype, device=self.A.device)
        Dinv = self.A.new_zeros(batch + (T * d, T * d))
        for t in range(T):
            s = slice(t * d, (t + 1) * d)
            M[..., s, s] = eye
            if t > 0:
                M[..., s, (t - 1) * d : t * d] = -self.A[..., t, :, :]
            L = self._L0 if t == 0 else self._LQ[..., t - 1, :, :]
            Dinv[..., s, s] = torch.cholesky_inverse(L)
        P = M.transpose(-1, -2) @ Dinv @ M
        return 0.5 * (P + P.transpose(-1, -2))

    def rsample(self, sample_shape=torch.Size()) -> Tensor:  # noqa: B008
        shape = self._extended_shape(sample_shape)
        eps = torch.randn(shape, dtype=self.A.dtype, device=self.A.device)
        xs = [(self._L0 @ eps[..., 0, :].unsqueeze(-1)).squeeze(-1)]
        for t in range(1, shape[-2]):
            mean = (self.A[..., t, :, :] @ xs[-1].unsqueeze(-1)).squeeze(-1)
            xs.append(
                mean + (self._LQ[..., t - 1, :, :] @ eps[..., t, :].unsqueeze(-1)).squeeze(-1)
            )
        return torch.stack(xs, -2)


def grids_and_index(coords) -> tuple[list[Tensor], Tensor]:
    """Sorted unique coordinates per mode and the (N, K) integer index of each entry into them."""
    coords, _ = check_tensor_data(coords)
    grids, idx = [], []
    for k in range(coords.shape[1]):
        u, inv = torch.unique(coords[:, k], sorted=True, return_inverse=True)
        grids.append(u)
        idx.append(inv)
    return grids, torch.stack(idx, 1)


class PyroFunctionalTucker(PyroModule):
    """The FunBaT generative model in Pyro.

    :param grids: list of K sorted 1-D tensors of unique coordinates per mode
        (include the coordinates you want to predict at: their states are then
        sampled from the conditional prior); see :func:`grids_and_index`.
    :param ranks, nu, lengthscale, variance, core, core_prior_scale, noise_prior:
        as in :class:`~pyro_dkm.tucker.FunctionalTucker`.
    :param likelihood: ``None`` (Gaussian entries with a Gamma prior on their precision
        ``tau``, the CEP model), or any :class:`~pyro_dkm.likelihoods.Likelihood`
        (``Poisson()``, ``StudentT()``, ``Bernoulli()``, ...), a name of one or a callable
        ``f -> Distribution``: entries are then observed under it (site
        ``"likelihood.y"``) and its own parameters are ``PyroParam`` point estimates.

    Sample sites: ``u_k`` (R_k, T_k, d_k) per mode inside plate ``factors_k``;
    ``core`` (P,) ; ``tau`` (noise precision, Gaussian entries only); ``obs`` (or
    ``likelihood.y``) in plate ``data``. Train with ``SVI(model.model, guide, optim,
    Trace_ELBO())`` and a :class:`TuckerMeanFieldGuide`, which also covers any latent
    site a subclass adds (e.g. a sampled bias in an overridden :meth:`likelihood_params`).
    """

    def __init__(
        self,
        grids: Sequence[Tensor],
        ranks: Sequence[int],
        nu=1.5,
        lengthscale=1.0,
        variance=1.0,
        *,
        core: str = "tucker",
        core_prior_scale: float = 1.0,
        noise_prior: tuple[float, float] = (1e-3, 1e-3),
        likelihood=None,
    ):
        super().__init__()
        from ..likelihoods import as_likelihood
        from .model import FunctionalTucker

        self.lik = None if likelihood is None else as_likelihood(likelihood)
        # reuse the argument checks of the CEP model
        spec = FunctionalTucker(
            ranks,
            nu,
            lengthscale,
            variance,
            core=core,
            core_prior_scale=core_prior_scale,
            noise_prior=noise_prior,
            progress=False,
        )
        if len(grids) != spec.K:
            raise ValueError(f"grids must have one tensor per mode ({spec.K}), got {len(grids)}")
        self.spec = spec
        self.K = spec.K
        self.ranks = spec.ranks
        self.core_type = core
        self._chains = []
        for k, g in enumerate(grids):
            g = torch.as_tensor(g, dtype=torch.float64)
            if g.ndim != 1 or not torch.isfinite(g).all() or (g.diff() <= 0).any():
                raise ValueError(f"grids[{k}] must be a finite, strictly increasing 1-D tensor")
            ssm = matern_ssm(_check_nu(spec.nu[k]), spec.lengthscale[k], spec.variance[k])
            A, Q = discretise(ssm, torch.cat([g.new_zeros(1), g.diff()]))
            self._chains.append((ssm.P_inf, A, Q))
        self.grids = [torch.as_tensor(g, dtype=torch.float64) for g in grids]

    def prior_factors(self) -> list[Tensor]:
        """Sample the factor states; returns u^k values, each (R_k, T_k)."""
        us = []
        for k, (P0, A, Q) in enumerate(self._chains):
            with pyro.plate(f"factors_{k}", self.ranks[k]):
                x = pyro.sample(f"u_{k}", GaussMarkovChain(P0, A, Q))
            us.append(x[..., 0])
        return us

    def core_tensor(self, core: Tensor) -> Tensor:
        """Dense core (R_1, ..., R_K) from the sampled ``core`` vector."""
        if self.core_type == "tucker":
            return core.reshape(self.ranks)
        R = self.ranks[0]
        full = core.new_zeros([R] * self.K)
        r = torch.arange(R)
        full[(r,) * self.K] = core
        return full

    def entries(self, us: list[Tensor], core: Tensor, index: Tensor) -> Tensor:
        """Latent entries f_n = W x_1 u^1(i_n1) ... x_K u^K(i_nK) at integer grid indexes (N, K)."""
        letters = _LETTERS[: self.K]
        ops = [self.core_tensor(core)] + [us[k][:, index[:, k]].T for k in range(self.K)]
        return torch.einsum(",".join([letters] + ["n" + c for c in letters]) + "->n", *ops)

    @property
    def has_tau(self) -> bool:
        """Whether the model samples the Gaussian noise precision ``tau``."""
        return self.lik is None and type(self).likelihood_params is \
            PyroFunctionalTucker.likelihood_params

    def likelihood_params(self):
        """Global likelihood parameters, sampled outside the data plate (default: tau;
        ``None`` with a ``likelihood`` object)."""
        if self.lik is not None:
            return None
        a0, b0 = self.spec.a0, self.spec.b0
        return pyro.sample(
            "tau",
            dist.Gamma(
                torch.tensor(a0, dtype=torch.float64), torch.tensor(b0, dtype=torch.float64)
            ),
        )

    def likelihood(self, f: Tensor, params) -> dist.Distribution:
        """Observation distribution given latent entries ``f`` (override both methods for
        e.g. ``dist.StudentT`` or ``dist.Poisson(f.exp())`` entries)."""
        return dist.Normal(f, params.rsqrt())

    def model(self, index: Tensor, values: Tensor | None = None, subsample_size: int | None = None,
              num_data: int | None = None):
        """The generative model. ``index`` (N, K) long into ``grids``; ``values`` (N,).
        ``subsample_size``: a random minibatch of the entries inside the plate;
        ``num_data``: ``index``/``values`` already are a minibatch of that many entries."""
        if index.ndim != 2 or index.shape[1] != self.K:
            raise ValueError(f"index must have shape (N, {self.K}), got {tuple(index.shape)}")
        us = self.prior_factors()
        P = math.prod(self.ranks) if self.core_type == "tucker" else self.ranks[0]
        s = self.spec.core_prior_scale
        core = pyro.sample("core", dist.Normal(torch.zeros(P, dtype=torch.float64), s).to_event(1))
        params = self.likelihood_params()
        N = index.shape[0]
        if num_data is None:
            plate = pyro.plate("data", N, subsample_size=subsample_size)
        else:
            if num_data < N:
                raise ValueError(f"num_data ({num_data}) must be >= the batch size ({N})")
            plate = pyro.plate("data", int(num_data), subsample=torch.arange(N))
        with plate as ind:
            f = self.entries(us, core, index[ind])
            obs = None if values is None else values[ind]
            if self.lik is not None:  # f is a sample here: its variance is 0
                self.lik(f, torch.zeros_like(f), obs)
            else:
                pyro.sample("obs", self.likelihood(f, params), obs=obs)
        return f

    def forward(self, index, values=None, subsample_size=None, num_data=None):
        return self.model(index, values, subsample_size, num_data)


class TuckerMeanFieldGuide(PyroModule):
    """Variational family of the CEP fit, as a Pyro guide for :class:`PyroFunctionalTucker`.

    :math:`q = \\prod_{k,r} q(u^k_r)\\, q(\\mathrm{vec}\\,\\mathcal W)\\, q(\\tau)`: each latent
    function's state sequence ``(T_k, d_k)`` gets a full-covariance Gaussian, the core a
    full-covariance Gaussian, the noise precision a Gamma. For Gaussian entries the
    conditional-EP updates of :class:`~pyro_dkm.tucker.FunctionalTucker` are the
    coordinate-ascent updates of the ELBO of exactly this family, so SVI with this guide
    and CEP share their fixed points (:func:`guide_from_cep` puts the guide at a CEP fit).

    :param tucker: the :class:`PyroFunctionalTucker` whose sample sites this guide covers.
    :param init_scale: initial standard deviation of the factor and core guides.
    :param init_tau: initial mean of ``q(tau)`` (e.g. ``1 / var(y)``).
    :param seed: seed of the random initial means (prior draws: a multilinear model must
        not start at its all-zero saddle point).
    """

    def __init__(self, tucker: "PyroFunctionalTucker", init_scale: float = 0.05,
                 init_tau: float = 1.0, seed: int = 0):
        super().__init__()
        if init_scale <= 0 or init_tau <= 0:
            raise ValueError("init_scale and init_tau must be > 0")
        self.K = tucker.K
        self.ranks = list(tucker.ranks)
        self.core_type = tucker.core_type
        g = torch.Generator().manual_seed(seed)
        self._shapes = []
        for k, (P0, A, Q) in enumerate(tucker._chains):
            T, d = A.shape[-3], A.shape[-1]
            self._shapes.append((T, d))
            # random prior draws of the states (x_t = A x_{t-1} + chol(Q) eps)
            L0 = cholesky(P0, name="P0")
            LQ = cholesky(Q[1:], name="process noise Q") if T > 1 else None
            eps = torch.randn(self.ranks[k], T, d, generator=g, dtype=torch.float64)
            xs = [eps[:, 0] @ L0.T]
            for t in range(1, T):
                xs.append(xs[-1] @ A[t].T + eps[:, t] @ LQ[t - 1].T)
            loc = torch.stack(xs, 1).reshape(self.ranks[k], T * d)
            tril = init_scale * torch.eye(T * d, dtype=torch.float64).expand(
                self.ranks[k], T * d, T * d)
            setattr(self, f"u_{k}_loc", PyroParam(loc))
            setattr(self, f"u_{k}_scale_tril",
                    PyroParam(tril.clone(), constraint=constraints.lower_cholesky))
        P = math.prod(self.ranks) if self.core_type == "tucker" else self.ranks[0]
        core0 = (torch.randn(P, generator=g, dtype=torch.float64) * tucker.spec.core_prior_scale
                 if self.core_type == "tucker" else torch.ones(P, dtype=torch.float64))
        self.core_loc = PyroParam(core0)
        self.core_scale_tril = PyroParam(init_scale * torch.eye(P, dtype=torch.float64),
                                         constraint=constraints.lower_cholesky)
        self.has_tau = tucker.has_tau
        if self.has_tau:
            self.tau_concentration = PyroParam(torch.tensor(10.0, dtype=torch.float64),
                                               constraint=constraints.positive)
            self.tau_rate = PyroParam(torch.tensor(10.0 / init_tau, dtype=torch.float64),
                                      constraint=constraints.positive)
        self._model = tucker.model
        self._known = {f"u_{k}" for k in range(self.K)} | {"core"} | (
            {"tau"} if self.has_tau else set())
        self.extra = None  # AutoNormal over latent sites the model adds (set on first call)

    def factor_dist(self, k: int) -> dist.Distribution:
        """``q(u^k)``: batch (R_k,), event (T_k, d_k)."""
        T, d = self._shapes[k]
        mvn = dist.MultivariateNormal(getattr(self, f"u_{k}_loc"),
                                      scale_tril=getattr(self, f"u_{k}_scale_tril"))
        return dist.TransformedDistribution(mvn, [ReshapeTransform((T * d,), (T, d))])

    def factor_means(self) -> list[Tensor]:
        """Means of the latent functions at the grid points under q, each (R_k, T_k)."""
        return [
            getattr(self, f"u_{k}_loc").reshape(self.ranks[k], *self._shapes[k])[..., 0]
            for k in range(self.K)
        ]

    @torch.no_grad()
    def mean_entries(self, tucker: "PyroFunctionalTucker", index: Tensor) -> Tensor:
        """``E_q[f_n]`` at integer grid indexes (N, K): exact, as q factorises over the
        factors and the core (the multilinear map of the means)."""
        return tucker.entries(self.factor_means(), self.core_loc, index)

    def _extra_sites(self, *args, **kwargs) -> list[str]:
        """Latent sample sites of the model that this guide's own family does not cover."""
        with pyro.poutine.block():
            tr = pyro.poutine.trace(self._model).get_trace(*args, **kwargs)
        return [name for name, site in tr.nodes.items()
                if site["type"] == "sample" and not site["is_observed"]
                and not site["infer"].get("_do_not_trace") and name not in self._known
                and not name.startswith("_")]

    def forward(self, index=None, values=None, subsample_size=None, num_data=None):
        if self.extra is None and index is not None:
            extra = self._extra_sites(index, values, subsample_size, num_data)
            if extra:
                from pyro.infer.autoguide import AutoNormal

                self.extra = AutoNormal(pyro.poutine.block(self._model, expose=extra),
                                        init_scale=0.05)
            else:
                self.extra = False
        for k in range(self.K):
            with pyro.plate(f"factors_{k}", self.ranks[k]):
                pyro.sample(f"u_{k}", self.factor_dist(k))
        pyro.sample("core", dist.MultivariateNormal(self.core_loc, scale_tril=self.core_scale_tril))
        if self.has_tau:
            pyro.sample("tau", dist.Gamma(self.tau_concentration, self.tau_rate))
        if self.extra:
            self.extra(index, values, subsample_size, num_data)


def guide_from_cep(tucker: "PyroFunctionalTucker", cep) -> TuckerMeanFieldGuide:
    """A :class:`TuckerMeanFieldGuide` holding the posterior of a fitted ``FunctionalTucker``.

    ``q(u^k_r)`` is the Gauss-Markov posterior of the chain given the CEP messages (exact
    joint over the states, from the dense precision; meant for grids of moderate size),
    ``q(core)`` and ``q(tau)`` are copied. ``tucker``'s grids must contain the CEP fit's
    unique coordinates; at extra grid points (no data) ``q`` is the conditional of the chain.
    """
    if not getattr(cep, "fitted", False):
        raise ValueError("cep must be a fitted FunctionalTucker")
    guide = TuckerMeanFieldGuide(tucker)
    with torch.no_grad():
        for k, (P0, A, Q) in enumerate(tucker._chains):
            T, d = A.shape[-3], A.shape[-1]
            grid, seen = tucker.grids[k], cep.unique_coords[k]
            pos = torch.searchsorted(grid, seen).clamp_max(T - 1)
            if not torch.equal(grid[pos], seen):
                raise ValueError(f"grids[{k}] must contain every coordinate of the CEP fit")
            prec = GaussMarkovChain(P0, A, Q).precision_matrix()  # (T d, T d)
            locs, trils = [], []
            for r in range(tucker.ranks[k]):
                Pk = prec.clone()
                h = prec.new_zeros(T * d)
                Pk.diagonal()[pos * d] += cep.msg_lam[k][r]  # messages on the first state
                h[pos * d] = cep.msg_eta[k][r]
                Lp = cholesky(Pk, name="factor posterior precision")
                locs.append(torch.cholesky_solve(h[:, None], Lp)[:, 0])
                cov = torch.cholesky_solve(torch.eye(T * d, dtype=Pk.dtype), Lp)
                trils.append(cholesky(0.5 * (cov + cov.T), name="factor posterior covariance"))
            setattr(guide, f"u_{k}_loc", PyroParam(torch.stack(locs)))
            setattr(guide, f"u_{k}_scale_tril",
                    PyroParam(torch.stack(trils), constraint=constraints.lower_cholesky))
        guide.core_loc = PyroParam(cep.core_mean.clone())
        guide.core_scale_tril = PyroParam(cholesky(cep.core_cov, name="core covariance"),
                                          constraint=constraints.lower_cholesky)
        guide.tau_concentration = PyroParam(torch.tensor(cep.tau_a, dtype=torch.float64),
                                            constraint=constraints.positive)
        guide.tau_rate = PyroParam(torch.tensor(cep.tau_b, dtype=torch.float64),
                                   constraint=constraints.positive)
    return guide
