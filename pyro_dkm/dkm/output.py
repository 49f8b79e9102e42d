r"""Sparse-GP output layer of a deep kernel machine.

Prior :math:`u_c \sim \mathcal N(0, K_{ii})` per output channel ``c`` on the top-layer
kernel :math:`K = K(G_L)`; variational posterior :math:`q(u_c) = \mathcal N(m_c, S_c)`
(one ``S`` shared by the channels or one per channel). The latent function at a
train/test point has marginal

.. math:: q(f_{tc}) = \mathcal N\big(K_{ti}K_{ii}^{-1} m_c,\;
          k_{tt} - K_{ti}K_{ii}^{-1}K_{it} + K_{ti}K_{ii}^{-1} S_c K_{ii}^{-1}K_{it}\big).
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.nn import PyroModule, PyroParam
from torch import Tensor
from torch.distributions import constraints

from ..linalg import nystrom_residual, sparse_gp_marginals, tril_solve
from .gram_blocks import GramBlocks

__all__ = ["SparseGPOutput", "conditional_weights"]


def conditional_weights(K: GramBlocks, K_tril: Tensor) -> tuple[Tensor, Tensor]:
    """``W = K_ii^-1 K_it`` ``(M, T)`` and the clamped Nystrom residual
    ``k_tt - diag(K_ti K_ii^-1 K_it)`` ``(T,)``."""
    A = tril_solve(K_tril, K.ti.mT)  # (M, T)
    W = tril_solve(K_tril, A, transpose=True)  # (M, T)
    return W, nystrom_residual(K.t_diag, A)


class SparseGPOutput(PyroModule):
    r"""Holds :math:`q(u) = \mathcal N(m, S)` for ``C`` output channels.

    Args:
        num_inducing: ``M``.
        out_channels: ``C``.
        shared_covariance: one ``S`` for all channels (default) or one per channel.

    Parameters: ``u_loc`` ``(C, M)``; ``u_scale_tril`` ``(M, M)`` or ``(C, M, M)``
    (``PyroParam`` with the ``lower_cholesky`` constraint).
    """

    def __init__(self, num_inducing: int, out_channels: int = 1, shared_covariance: bool = True):
        super().__init__()
        M, C = num_inducing, out_channels
        self.num_inducing, self.out_channels = M, C
        self.shared_covariance = bool(shared_covariance)
        self.u_loc = PyroParam(torch.zeros(C, M, dtype=torch.float64))
        eye = torch.eye(M, dtype=torch.float64)
        self.u_scale_tril = PyroParam(eye if shared_covariance else eye.expand(C, M, M).clone(),
                                      constraints.lower_cholesky)

    def prior(self, K_tril: Tensor) -> dist.Distribution:
        """``p(u)``: batch ``(C,)``, event ``(M,)`` made one event ``(C, M)``."""
        loc = K_tril.new_zeros(self.out_channels, self.num_inducing)
        return dist.MultivariateNormal(loc, scale_tril=K_tril).to_event(1)

    def posterior(self) -> dist.Distribution:
        """``q(u)`` with event shape ``(C, M)``."""
        return dist.MultivariateNormal(self.u_loc, scale_tril=self.u_scale_tril).to_event(1)

    def kl_to_prior(self, K_tril: Tensor) -> Tensor:
        r""":math:`\sum_c \mathrm{KL}(q(u_c)\,\|\,\mathcal N(0, K_{ii}))` in closed form from
        ``K_tril = chol(K_ii)``: :math:`\tfrac12\sum_c [\|L_K^{-1}L_{S_c}\|_F^2 +
        \|L_K^{-1}m_c\|^2 - M + \log|K| - \log|S_c|]` (the value
        ``torch.distributions.kl_divergence`` gives, without building distributions)."""
        M, C = self.num_inducing, self.out_channels
        S_tril = self.u_scale_tril  # (M, M) or (C, M, M)
        trace = tril_solve(K_tril, S_tril).pow(2).sum((-1, -2))  # () or (C,)
        maha = tril_solve(K_tril, self.u_loc.mT).pow(2).sum()  # sum over channels
        logdet_K = 2 * K_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        logdet_S = 2 * S_tril.diagonal(dim1=-2, dim2=-1).log().sum(-1)
        per_channel = trace - M + logdet_K - logdet_S  # () shared or (C,)
        total = per_channel * C if per_channel.dim() == 0 else per_channel.sum()
        return 0.5 * (total + maha)

    def marginals(self, W: Tensor, resid: Tensor, u: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Mean and variance ``(T, C)`` of the latent ``f``: under ``q(u)`` when ``u`` is
        None, else of ``p(f | u)`` for the given ``(C, M)`` sample."""
        if u is not None:
            mean = (u @ W).mT
            return mean, resid[:, None].expand_as(mean)
        return sparse_gp_marginals(self.u_loc, self.u_scale_tril, W, resid)
