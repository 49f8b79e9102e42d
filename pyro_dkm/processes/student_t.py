r"""Student-t processes: the inverse-gamma scale mixture of a Gaussian process.

With :math:`s \sim \mathrm{InvGamma}(a, b)` and :math:`f \mid s \sim \mathcal N(m, sK)`,
the marginal is :math:`f \sim \mathrm{MVT}(2a, m, (b/a) K)` (Shah, Wilson & Ghahramani
2014; Lee, Yun, Yang & Lee, "Scale Mixtures of Neural Network Gaussian Processes",
ICLR 2022). :class:`StudentTProcess` is that distribution over the function values at
given inputs, a :class:`pyro.distributions.MultivariateStudentT` with a kernel front
end and a log-density that stays exact as ``df -> inf`` (where it becomes the GP's).

Pure functions for the conjugate maths live here too: :func:`student_t_log_marginal`
and :func:`inverse_gamma_posterior`.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from pyro.distributions import MultivariateStudentT
from torch import Tensor
from torch.distributions import constraints

from ..linalg import check_positive, check_tensor, cholesky, tril_solve

__all__ = [
    "StudentTProcess",
    "student_t_log_marginal",
    "inverse_gamma_posterior",
    "log_gamma_ratio",
    "student_t_log_marginal_from_quad",
    "kernel_matrix",
]


# --------------------------------------------------------------------------
# Small pure helpers
# --------------------------------------------------------------------------
def log_gamma_ratio(x: Tensor, h) -> Tensor:
    r""":math:`\log\Gamma(x + h) - \log\Gamma(x) - h \log x`, accurate for large ``x``.

    The naive difference of ``lgamma`` values loses ~``eps * x log x`` absolute
    accuracy (1e-5 at ``x = 1e10``); for ``x >= 100`` Stirling's series is used
    instead, :math:`(x + h - \tfrac12)\log(1 + h/x) - h + \tfrac1{12}[(x+h)^{-1} - x^{-1}]
    - \tfrac1{360}[(x+h)^{-3} - x^{-3}]` (truncation error < 1e-13). The result tends to
    0 as ``x -> inf`` at fixed ``h``. Shapes broadcast; ``h >= 0``.
    """
    x = torch.as_tensor(x)
    h = torch.as_tensor(h, dtype=x.dtype, device=x.device)
    big = x >= 100.0
    xs = torch.where(big, x, torch.full_like(x, 100.0))  # safe argument for each branch
    xl = torch.where(big, torch.ones_like(x), x)
    xh = xs + h
    stirling = ((xh - 0.5) * torch.log1p(h / xs) - h
                + (1.0 / xh - 1.0 / xs) / 12.0 - (xh.pow(-3) - xs.pow(-3)) / 360.0)
    direct = torch.lgamma(xl + h) - torch.lgamma(xl) - h * torch.log(xl)
    return torch.where(big, stirling, direct)


def kernel_matrix(kernel: Callable, x1: Tensor, x2: Tensor | None = None, *,
                  diag: bool = False) -> Tensor:
    """Evaluate ``kernel`` as a dense tensor.

    ``kernel`` is any callable ``kernel(x1, x2)`` returning a tensor (our
    ``serial(...)`` kernel functions, :class:`~pyro_dkm.processes.NNGPCovariance`) or a
    GPyTorch kernel / anything returning an object with ``to_dense()``. With ``diag``
    only ``k(x1_i, x1_i)`` is returned (``diag=True`` is passed through when the kernel
    accepts it, else the diagonal of the full matrix is taken).
    """
    if not callable(kernel):
        raise TypeError(f"kernel must be callable (x1, x2) -> Tensor, got {type(kernel).__name__}")
    if diag:
        try:
            out = kernel(x1, x1 if x2 is None else x2, diag=True)
        except TypeError:
            out = kernel(x1, x1 if x2 is None else x2)
            out = out.to_dense() if hasattr(out, "to_dense") else out
            return out.diagonal(dim1=-2, dim2=-1)
    else:
        out = kernel(x1, x1 if x2 is None else x2)
    if hasattr(out, "to_dense") and not isinstance(out, Tensor):
        out = out.to_dense()
    if not isinstance(out, Tensor):
        raise TypeError(f"kernel must return a Tensor, got {type(out).__name__}")
    return out


def _positive(value, name: str, like: Tensor | None = None) -> Tensor:
    """A positive, finite floating tensor (ValueError/TypeError naming ``name``)."""
    value = check_positive(value, name)
    if not isinstance(value, Tensor):
        dtype = like.dtype if like is not None else torch.get_default_dtype()
        device = like.device if like is not None else None
        value = torch.tensor(value, dtype=dtype, device=device)
    return value


def _tril_from(covariance_matrix, scale_tril, kernel, inputs, *, name="covariance_matrix"):
    given = [covariance_matrix is not None, scale_tril is not None, kernel is not None]
    if sum(given) != 1:
        raise ValueError("give exactly one of covariance_matrix, scale_tril or kernel (with "
                         "inputs)")
    if kernel is not None:
        if inputs is None:
            raise ValueError("kernel needs inputs: the (..., n, d) points the process is "
                             "evaluated at")
        check_tensor(inputs, "inputs", min_ndim=2)
        covariance_matrix = kernel_matrix(kernel, inputs)
        name = "kernel(inputs, inputs)"
    elif inputs is not None:
        raise ValueError("inputs are only used together with kernel")
    if scale_tril is not None:
        check_tensor(scale_tril, "scale_tril", min_ndim=2)
        if scale_tril.shape[-1] != scale_tril.shape[-2]:
            raise ValueError(f"scale_tril must be square (..., n, n), got "
                             f"{tuple(scale_tril.shape)}")
        if bool((scale_tril.diagonal(dim1=-2, dim2=-1) <= 0).any()):
            raise ValueError("scale_tril must be lower triangular with a positive diagonal")
        return scale_tril.tril()
    check_tensor(covariance_matrix, name, min_ndim=2)
    K = covariance_matrix
    if K.shape[-1] != K.shape[-2]:
        raise ValueError(f"{name} must be square (..., n, n), got shape {tuple(K.shape)}")
    if K.shape[-1] == 0:
        raise ValueError(f"{name} is 0 x 0: the process needs at least one point (n >= 1)")
    with torch.no_grad():  # a value check: no autograd (and no tensor-to-scalar warning)
        asym = float((K - K.mT).abs().amax()) if K.numel() else 0.0
        diag = float(K.diagonal(dim1=-2, dim2=-1).abs().amax()) if K.numel() else 0.0
    tol = 1e-8 if K.dtype == torch.float64 else 1e-4
    if asym > tol * max(diag, 1e-300):
        raise ValueError(f"{name} must be symmetric, max |K - K^T| = {asym:.3g}")
    return cholesky(K, name=name, check=False)


# --------------------------------------------------------------------------
# Closed-form conjugate maths
# --------------------------------------------------------------------------
def student_t_log_marginal_from_quad(q: Tensor, logdet: Tensor, n: int, a, b) -> Tensor:
    r"""Log marginal of the inverse-gamma scale mixture from :math:`q = r^T K_y^{-1} r` and
    :math:`\log|K_y|`:

    .. math:: \log\Gamma(a + \tfrac n2) - \log\Gamma(a) - \tfrac n2 \log(2\pi b)
              - \tfrac12 \log|K_y| - (a + \tfrac n2) \log(1 + \tfrac{q}{2b}),

    with the Gamma ratio by :func:`log_gamma_ratio` and ``log1p``, so it stays accurate
    in the Gaussian limit (``a, b`` large). Shapes broadcast.
    """
    return (log_gamma_ratio(a, 0.5 * n) - 0.5 * n * torch.log(2 * math.pi * b / a)
            - 0.5 * logdet - (a + 0.5 * n) * torch.log1p(q / (2 * b)))


def _conjugate_inputs(y, covariance_matrix, scale_tril, concentration, rate):
    """Validated ``(L, a, b)`` for the closed forms of the inverse-gamma mixture."""
    check_tensor(y, "y", min_ndim=1)
    L = _tril_from(covariance_matrix, scale_tril, None, None)
    if L.shape[-1] != y.shape[-1]:
        raise ValueError(f"y has {y.shape[-1]} points but the covariance is "
                         f"{L.shape[-1]} x {L.shape[-1]}")
    return L, _positive(concentration, "concentration", y), _positive(rate, "rate", y)


def _quad_and_logdet(y: Tensor, L: Tensor, loc) -> tuple[Tensor, Tensor]:
    r = y if loc is None else y - loc
    alpha = tril_solve(L, r.unsqueeze(-1)).squeeze(-1)
    return alpha.pow(2).sum(-1), 2.0 * L.diagonal(dim1=-2, dim2=-1).log().sum(-1)


def student_t_log_marginal(
    y: Tensor,
    covariance_matrix: Tensor | None = None,
    concentration=1.0,
    rate=1.0,
    *,
    loc: Tensor | None = None,
    scale_tril: Tensor | None = None,
) -> Tensor:
    r"""Exact log marginal likelihood of the inverse-gamma scale mixture,

    .. math:: \log p(y) = \log \int \mathcal N(y \mid m, s K)\,
              \mathrm{InvGamma}(s \mid a, b)\, ds
              = \log\Gamma(a + \tfrac n2) - \log\Gamma(a) + a \log b
                - (a + \tfrac n2)\log(b + \tfrac q2) - \tfrac n2 \log 2\pi
                - \tfrac12 \log\det K,

    with :math:`q = (y - m)^T K^{-1} (y - m)`; i.e. :math:`\log \mathrm{MVT}(y \mid 2a, m,
    (b/a) K)`. For regression pass :math:`K_y = K + \sigma^2 I` (noise in the kernel).

    Args:
        y: ``(..., n)`` observations.
        covariance_matrix: ``(..., n, n)`` (or give ``scale_tril``, its Cholesky factor).
        concentration: ``a > 0``, shape broadcasting with ``(...)``.
        rate: ``b > 0``, shape broadcasting with ``(...)``.
        loc: optional ``(..., n)`` mean.
    Returns:
        ``(...)`` log marginal likelihoods.
    """
    L, a, b = _conjugate_inputs(y, covariance_matrix, scale_tril, concentration, rate)
    n = y.shape[-1]
    q, logdet = _quad_and_logdet(y, L, loc)
    return student_t_log_marginal_from_quad(q, logdet, n, a, b)


def inverse_gamma_posterior(
    y: Tensor,
    covariance_matrix: Tensor | None = None,
    concentration=1.0,
    rate=1.0,
    *,
    loc: Tensor | None = None,
    scale_tril: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    r"""Posterior of the scale: :math:`s \mid y \sim \mathrm{InvGamma}(a + n/2,\,
    b + q/2)`, :math:`q = (y - m)^T K^{-1} (y - m)`. Returns ``(a', b')``, shape ``(...)``."""
    L, a, b = _conjugate_inputs(y, covariance_matrix, scale_tril, concentration, rate)
    q, _ = _quad_and_logdet(y, L, loc)
    return a + 0.5 * y.shape[-1], b + 0.5 * q


# --------------------------------------------------------------------------
# The process
# --------------------------------------------------------------------------
class StudentTProcess(MultivariateStudentT):
    r"""Student-t process prior over function values at given inputs,

    .. math:: f \sim \mathrm{MVT}(\nu, m, c K), \qquad \text{density}\ \propto
              \left[1 + \tfrac1\nu (f - m)^T (cK)^{-1} (f - m)\right]^{-(\nu + n)/2},

    with ``c = 1`` when ``df`` is given, and :math:`\nu = 2a`, :math:`c = b/a` when the
    inverse-gamma scale prior ``(concentration a, rate b)`` is given; then
    :math:`f \mid s \sim \mathcal N(m, sK)` with :math:`s \sim \mathrm{InvGamma}(a, b)`
    (Lee et al., ICLR 2022). The covariance of ``f`` is :math:`\tfrac{\nu}{\nu-2} cK`
    for :math:`\nu > 2`. As :math:`\nu \to \infty` the density tends to
    :math:`\mathcal N(m, cK)`; :meth:`log_prob` stays accurate there (Stirling form of
    the normaliser).

    Exactly one covariance source and exactly one of ``df`` / ``(concentration, rate)``:

    Args:
        df: ``nu > 0``, float or tensor of shape broadcasting with the batch shape.
        covariance_matrix: ``(..., n, n)`` kernel matrix ``K`` (symmetric PD; factorised
            with adaptive jitter, raising ``NotPositiveDefiniteError`` if it is not PD).
        loc: mean ``m``: a float, a ``(..., n)`` tensor, or (with ``kernel``) a callable
            ``loc(inputs) -> (..., n)``. Default 0.
        kernel: callable ``kernel(x1, x2) -> (..., n1, n2)`` (e.g. an NNGP
            ``serial(...)`` kernel function or a GPyTorch kernel), used with ``inputs``.
        inputs: ``(..., n, d)`` inputs for ``kernel``.
        concentration, rate: inverse-gamma ``(a, b)`` of the scale, instead of ``df``.
        scale_tril: ``(..., n, n)`` Cholesky factor of ``K`` instead of ``K``.

    Batch shape: broadcast of ``df``'s shape, ``loc.shape[:-1]`` and ``K.shape[:-2]``;
    event shape ``(n,)``. Usable in ``pyro.sample`` (``rsample`` supported).
    """

    arg_constraints = {
        "df": constraints.positive,
        "loc": constraints.real_vector,
        "scale_tril": constraints.lower_cholesky,
    }
    support = constraints.real_vector
    has_rsample = True

    def __init__(
        self,
        df=None,
        covariance_matrix: Tensor | None = None,
        *,
        loc=None,
        kernel: Callable | None = None,
        inputs: Tensor | None = None,
        concentration=None,
        rate=None,
        scale_tril: Tensor | None = None,
        validate_args=None,
    ):
        L = _tril_from(covariance_matrix, scale_tril, kernel, inputs)
        n = L.shape[-1]
        if n == 0:
            raise ValueError("the process needs at least one point (n >= 1)")
        if df is not None and (concentration is not None or rate is not None):
            raise ValueError("give either df or (concentration, rate), not both")
        if df is None:
            if concentration is None or rate is None:
                raise ValueError("give df, or both concentration and rate of the inverse-gamma "
                                 "scale prior")
            a = _positive(concentration, "concentration", L)
            b = _positive(rate, "rate", L)
            df = 2.0 * a
            c = (b / a).sqrt()
            L = L * (c.reshape(c.shape + (1, 1)) if c.dim() else c)
            self.concentration, self.rate = a, b
        else:
            df = _positive(df, "df", L)
            self.concentration, self.rate = None, None
        if callable(loc):
            if inputs is None:
                raise ValueError("a callable loc needs kernel and inputs")
            loc = loc(inputs)
        if loc is None:
            loc = L.new_zeros(L.shape[:-1])
        elif not isinstance(loc, Tensor):
            if isinstance(loc, bool) or not isinstance(loc, (int, float)):
                raise TypeError(f"loc must be a float, a tensor or a callable, got "
                                f"{type(loc).__name__}")
            loc = torch.full(L.shape[:-1], float(loc), dtype=L.dtype, device=L.device)
        else:
            check_tensor(loc, "loc")
            if loc.dim() == 0:
                loc = loc.expand(L.shape[:-1])
            elif loc.shape[-1] != n:
                raise ValueError(f"loc must have last dimension n = {n}, got shape "
                                 f"{tuple(loc.shape)}")
        super().__init__(df.to(L.dtype), loc.to(L.dtype), L, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(StudentTProcess, _instance)
        new.concentration, new.rate = self.concentration, self.rate
        return super().expand(batch_shape, _instance=new)

    def log_prob(self, value: Tensor) -> Tensor:
        if self._validate_args:
            self._validate_sample(value)
        n = self.loc.size(-1)
        y = torch.linalg.solve_triangular(
            self.scale_tril, (value - self.loc).unsqueeze(-1), upper=False).squeeze(-1)
        q = y.pow(2).sum(-1)
        half_logdet = self.scale_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        df = self.df
        return (log_gamma_ratio(0.5 * df, 0.5 * n) - 0.5 * n * math.log(2 * math.pi)
                - half_logdet - 0.5 * (df + n) * torch.log1p(q / df))
