r"""Layers of a sparse deep kernel machine (Yang et al., ICML 2023, "A theory of
representation learning gives a deep generalisation of kernel methods").

Every layer maps a :class:`~pyro_dkm.dkm.gram_blocks.GramBlocks` state to the next:

* :class:`InputGram`: inputs -> :math:`G_0 = X X^T / d` in inducing form, with learnable
  inducing inputs :math:`Z` (``ii = Z Z^T/d``, ``ti = X Z^T/d``, ``t_diag = |x|^2/d``);
* :class:`KernelLayer`: :math:`G \mapsto K(G)` with a Gram kernel of
  :mod:`pyro_dkm.kernels.gram`;
* :class:`GramLayer`: the learned Gram.  The inducing block :math:`G_{ii}` is a free
  parameter (a Cholesky factor with log-diagonal); train/test blocks follow by

  .. math:: G_{ti} = K_{ti} K_{ii}^{-1} G_{ii}, \qquad
            g_t = k_{tt} - \operatorname{diag}(K_{ti}K_{ii}^{-1}K_{it})
                  + \operatorname{diag}(K_{ti}K_{ii}^{-1}G_{ii}K_{ii}^{-1}K_{it}),

  and the layer contributes :math:`-\nu\,\mathrm{KL}(\mathcal N(0,G_{ii})\|\mathcal N(0,K_{ii}))`
  to the objective.
"""

from __future__ import annotations

import math

import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints

from ..kernels.gram import (
    ErfGram,
    GramKernel,
    NormalisedGaussianGram,
    ReluGram,
    SqExpGram,
)
from ..linalg import (
    check_tensor,
    cholesky,
    kl_zero_mean_gaussians,
    kl_zero_mean_gaussians_taylor,
    nystrom_residual,
    tril_solve,
)
from .gram_blocks import GramBlocks

__all__ = ["InputGram", "KernelLayer", "GramLayer", "propagate_gram", "KERNELS"]


#: names accepted by :class:`KernelLayer` (learnable hyper-parameters in brackets):
#: ``"relu"`` (arc-cosine, variance 2), ``"erf"``, ``"sqexp"`` [lengthscale],
#: ``"normalised_gaussian"`` [lengthscale].
KERNELS = ("relu", "erf", "sqexp", "normalised_gaussian")


class InputGram(PyroModule):
    r"""Input layer: :math:`G_0 = X X^T / d` in inducing form.

    Args:
        inducing_points: ``(M, d)`` initial inducing inputs :math:`Z`.
        learn_inducing: make :math:`Z` a learnable parameter (default) or a fixed buffer.
        ard: learn one input lengthscale per feature (``input_lengthscale``, a
            ``PyroParam`` initialised at 1): :math:`G_0 = (X/\ell)(Z/\ell)^T/d`, automatic
            relevance determination as in ARD kernels.
    """

    def __init__(self, inducing_points: Tensor, learn_inducing: bool = True,
                 ard: bool = False):
        super().__init__()
        check_tensor(inducing_points, "inducing_points", ndim=2)
        if inducing_points.shape[0] < 1:
            raise ValueError("inducing_points must hold at least one row (inducing point), "
                             "got shape " + str(tuple(inducing_points.shape)))
        self.input_dim = inducing_points.shape[1]
        self.ard = bool(ard)
        if self.ard:
            self.input_lengthscale = PyroParam(
                torch.ones(self.input_dim, dtype=inducing_points.dtype), constraints.positive)
        Z = inducing_points.detach().clone()
        if learn_inducing:
            self.inducing_points = torch.nn.Parameter(Z)
        else:
            self.register_buffer("inducing_points", Z)

    def _scaled(self, X: Tensor) -> Tensor:
        """``X / l`` with the ARD lengthscales (``X`` itself without ARD)."""
        return X * (1 / self.input_lengthscale) if self.ard else X

    def inducing_gram(self) -> Tensor:
        """``G_0`` between the inducing points, ``(Z/l)(Z/l)^T / d`` ``(M, M)``."""
        Z = self._scaled(self.inducing_points)
        return Z @ Z.mT / self.input_dim

    def forward(self, X: Tensor) -> GramBlocks:
        Z, X = self._scaled(self.inducing_points), self._scaled(X)  # (M, d), (T, d)
        d = self.input_dim
        return GramBlocks(Z @ Z.mT / d, X @ Z.mT / d, X.pow(2).sum(-1) / d)


class KernelLayer(PyroModule):
    r"""Applies a Gram kernel :math:`K(G)` blockwise.

    Args:
        kernel: a :class:`~pyro_dkm.kernels.gram.GramKernel` instance (used as is, its
            hyper-parameters fixed), or one of :data:`KERNELS`; named kernels with a
            lengthscale get it as a ``PyroParam`` (``lengthscale``), which can be replaced
            by a ``PyroSample`` prior.
        lengthscale: initial lengthscale for ``"sqexp"`` / ``"normalised_gaussian"``.
    """

    def __init__(self, kernel="relu", lengthscale: float = 1.0):
        super().__init__()
        self.name = None
        if isinstance(kernel, GramKernel):
            self.fixed_kernel = kernel
        elif isinstance(kernel, str):
            if kernel not in KERNELS:
                raise ValueError(f"kernel must be a GramKernel or one of {KERNELS}, got {kernel!r}")
            self.name = kernel
            self.fixed_kernel = None
            if kernel in ("sqexp", "normalised_gaussian"):
                if not lengthscale > 0:
                    raise ValueError(f"lengthscale must be positive, got {lengthscale}")
                self.lengthscale = PyroParam(torch.tensor(float(lengthscale), dtype=torch.float64),
                                             constraints.positive)
        else:
            raise TypeError(f"kernel must be a GramKernel or a string, got {type(kernel).__name__}")

    def kernel(self) -> GramKernel:
        """The Gram kernel with the current hyper-parameter values."""
        if self.fixed_kernel is not None:
            return self.fixed_kernel
        if self.name == "relu":
            return ReluGram()
        if self.name == "erf":
            return ErfGram()
        if self.name == "sqexp":
            return SqExpGram(lengthscale=self.lengthscale)
        return NormalisedGaussianGram(lengthscale=self.lengthscale)

    def forward(self, G: GramBlocks) -> GramBlocks:
        k = self.kernel()
        K_ii = k(G.ii)
        g_i = G.ii.diagonal(dim1=-2, dim2=-1)
        K_ti = k.cross(G.ti, G.t_diag[..., :, None], g_i[..., None, :])
        return GramBlocks(K_ii, K_ti, k.diag(G.t_diag))

    def extra_repr(self) -> str:
        return repr(self.fixed_kernel) if self.fixed_kernel is not None else self.name


def propagate_gram(K: GramBlocks, G_tril: Tensor, K_tril: Tensor | None = None) -> GramBlocks:
    r"""Learned Gram at train/test points from the inducing Gram :math:`G_{ii} = L L^T`.

    With :math:`K_{ii} = L_K L_K^T`, :math:`A = L_K^{-1}K_{it}`, :math:`B = L_K^{-1} L`:
    :math:`G_{ti} = A^T B L^T`,
    :math:`g_t = [k_{tt} - \|A_{:t}\|^2]_{\ge \epsilon k_{tt}} + \|B^T A_{:t}\|^2`
    (the Nystrom residual is floored on its own, at its rounding level: it is where
    cancellation happens).

    Args:
        K: kernel blocks ``(M, M), (T, M), (T,)``.
        G_tril: ``(M, M)`` lower Cholesky factor of the learned inducing Gram.
        K_tril: optional precomputed Cholesky factor of ``K.ii``.
    """
    if K_tril is None:
        K_tril = cholesky(K.ii, name="K_ii (kernel at the inducing points)")
    A = tril_solve(K_tril, K.ti.mT)  # (M, T)
    B = tril_solve(K_tril, G_tril)  # (M, M)
    BtA = B.mT @ A  # (M, T)
    G_ii = G_tril @ G_tril.mT
    G_ti = BtA.mT @ G_tril.mT  # (T, M) = K_ti K_ii^-1 G_ii
    g_t = nystrom_residual(K.t_diag, A) + BtA.pow(2).sum(-2)
    return GramBlocks(G_ii, G_ti, g_t)


class GramLayer(PyroModule):
    r"""Learned Gram layer with regulariser :math:`\nu\,\mathrm{KL}(\mathcal N(0,G_{ii})\|
    \mathcal N(0,K_{ii}))`.

    The free parameter is a lower-triangular ``V = tril(gram_tril_offdiag, -1) +
    diag(exp(gram_log_diag))``:

    * ``parameterisation="cholesky"`` (default): :math:`G_{ii} = V V^T`, initialised at
      ``V = chol(K_ii)`` (the NNGP);
    * ``"whitened"``: :math:`G_{ii} = L_K V V^T L_K^T` with :math:`L_K = \mathrm{chol}(K_{ii})`
      (``L_K V`` is again a Cholesky factor), initialised at ``V = I``. The KL is then
      :math:`\tfrac12(\|V\|_F^2 - 2\sum\log V_{mm} - M)`, independent of ``K``: moving the
      inducing inputs or earlier layers does not move this layer off the NNGP, which keeps
      Adam well conditioned for large ``nu``.

    Args:
        num_inducing: ``M``.
        nu: regularisation strength :math:`\nu > 0` (width of the layer relative to the
            data; :math:`\nu\to\infty` is the NNGP). ``float("inf")``: the Gram is held
            at its prior ``K_ii`` (the NNGP limit: no trainable Gram, no KL term;
            :attr:`kl_weight` is 0).
        kl: ``"exact"`` (default) or ``"taylor"`` (:math:`\tfrac14\|L^{-1}K L^{-T}-I\|_F^2`,
            finite for badly conditioned Grams).
        parameterisation: ``"cholesky"`` or ``"whitened"``.
    """

    def __init__(self, num_inducing: int, nu: float = 1.0, kl: str = "exact",
                 parameterisation: str = "cholesky"):
        super().__init__()
        if not isinstance(num_inducing, int) or num_inducing < 1:
            raise ValueError(f"num_inducing must be a positive int, got {num_inducing!r}")
        nu = float(nu)
        if not nu > 0:
            raise ValueError(f"nu must be positive (float('inf') for the NNGP limit), got {nu}")
        if kl not in ("exact", "taylor"):
            raise ValueError(f"kl must be 'exact' or 'taylor', got {kl!r}")
        if parameterisation not in ("cholesky", "whitened"):
            raise ValueError(f"parameterisation must be 'cholesky' or 'whitened', got "
                             f"{parameterisation!r}")
        self.nu = nu
        self.fixed = math.isinf(nu)
        self.kl_form = kl
        self.parameterisation = parameterisation
        M = num_inducing
        offdiag = torch.zeros(M, M, dtype=torch.float64)
        log_diag = torch.zeros(M, dtype=torch.float64)
        if self.fixed:  # held at the prior: buffers (same state-dict keys), nothing to train
            self.register_buffer("gram_tril_offdiag", offdiag)
            self.register_buffer("gram_log_diag", log_diag)
        else:
            self.gram_tril_offdiag = torch.nn.Parameter(offdiag)
            self.gram_log_diag = torch.nn.Parameter(log_diag)

    @property
    def kl_weight(self) -> float:
        """The weight of this layer's KL in the objective: ``nu``, or 0 at ``nu = inf``
        (where the Gram is the prior and the KL is 0)."""
        return 0.0 if self.fixed else self.nu

    @property
    def whitened(self) -> bool:
        return self.parameterisation == "whitened"

    def raw_factor(self) -> Tensor:
        """The parameter ``V`` ``(M, M)``, lower triangular with positive diagonal."""
        return torch.tril(self.gram_tril_offdiag, -1) + torch.diag_embed(self.gram_log_diag.exp())

    def factor(self, K_tril: Tensor | None = None) -> Tensor:
        """Lower Cholesky factor of the learned inducing Gram (``K_tril`` = chol of the
        previous layer's kernel at the inducing points: needed when whitened, and at
        ``nu = inf``, where the factor is ``K_tril`` itself)."""
        if self.fixed:
            if K_tril is None:
                raise ValueError("a GramLayer with nu=inf is its prior: it needs K_tril (the "
                                 "Cholesky factor of the kernel at the inducing points)")
            return K_tril
        V = self.raw_factor()
        if not self.whitened:
            return V
        if K_tril is None:
            raise ValueError("a whitened GramLayer needs K_tril (the Cholesky factor of the "
                             "kernel at the inducing points) to form its Gram")
        return K_tril @ V

    @property
    def gram_tril(self) -> Tensor:
        """``(M, M)`` lower Cholesky factor of the learned inducing Gram (Cholesky
        parameterisation; use :meth:`factor` when whitened)."""
        return self.factor()

    @property
    def inducing_gram(self) -> Tensor:
        L = self.gram_tril
        return L @ L.mT

    @torch.no_grad()
    def set_gram(self, G_ii: Tensor | None = None, *, G_tril: Tensor | None = None,
                 K_tril: Tensor | None = None) -> None:
        """Set the learned inducing Gram (whitened: also give ``K_tril``)."""
        if self.fixed:
            raise ValueError("a GramLayer with nu=inf is held at its prior; its Gram cannot "
                             "be set (use a finite nu)")
        if G_tril is None:
            G_tril = cholesky(G_ii, name="G_ii")
        if self.whitened:
            if K_tril is None:
                raise ValueError("set_gram of a whitened GramLayer needs K_tril")
            G_tril = tril_solve(K_tril, G_tril)
        self.gram_tril_offdiag.copy_(torch.tril(G_tril, -1))
        self.gram_log_diag.copy_(G_tril.diagonal().log())

    @torch.no_grad()
    def reset_to_prior(self, K_ii: Tensor) -> None:
        """Set ``G_ii = K_ii`` (the NNGP value)."""
        if self.fixed:
            return
        if self.whitened:
            self.gram_tril_offdiag.zero_()
            self.gram_log_diag.zero_()
        else:
            self.set_gram(K_ii)

    def kl(self, K_ii: Tensor, G_tril: Tensor, K_tril: Tensor) -> Tensor:
        if self.fixed:
            return K_ii.new_zeros(())
        if self.kl_form == "taylor":
            return kl_zero_mean_gaussians_taylor(None, K_ii, G_tril=G_tril)
        if self.whitened:
            # KL(N(0, L V V^T L^T) || N(0, L L^T)) = KL(N(0, V V^T) || N(0, I))
            M = self.gram_log_diag.shape[-1]
            V = self.raw_factor()
            return 0.5 * (V.pow(2).sum() - M) - self.gram_log_diag.sum()
        return kl_zero_mean_gaussians(None, None, G_tril=G_tril, K_tril=K_tril)

    def forward(self, K: GramBlocks) -> tuple[GramBlocks, Tensor]:
        """Returns the learned Gram blocks and this layer's (unweighted) KL."""
        K_tril = cholesky(K.ii, name="K_ii (kernel at the inducing points)")
        G_tril = self.factor(K_tril)
        G = propagate_gram(K, G_tril, K_tril)
        return G, self.kl(K.ii, G_tril, K_tril)

    def extra_repr(self) -> str:
        return (f"num_inducing={self.gram_log_diag.shape[0]}, nu={self.nu}, "
                f"kl={self.kl_form!r}, parameterisation={self.parameterisation!r}")
