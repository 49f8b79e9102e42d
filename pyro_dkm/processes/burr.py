r"""The Burr type XII distribution: a heavy-tailed prior on a positive scale.

Used as a scale prior by Lee, Yun, Yang & Lee (ICLR 2022); Pyro and torch lack it.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from pyro.distributions import TorchDistribution
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

__all__ = ["BurrXII"]

_EMPTY = torch.Size()


class BurrXII(TorchDistribution):
    r"""Burr type XII distribution on :math:`(0, \infty)`,

    .. math:: p(x) = \frac{ck}{\lambda}\Big(\frac x\lambda\Big)^{c-1}
              \Big[1 + \Big(\frac x\lambda\Big)^c\Big]^{-k-1},\qquad
              F(x) = 1 - \Big[1 + \Big(\frac x\lambda\Big)^c\Big]^{-k},

    a heavy-tailed scale prior (tail :math:`\propto x^{-ck-1}`) used by Lee et al.
    (ICLR 2022). ``rsample`` by the inverse CDF.

    Args:
        concentration1: shape ``c > 0``.
        concentration2: shape ``k > 0``.
        scale: ``lambda > 0`` (default 1).
    """

    arg_constraints = {
        "concentration1": constraints.positive,
        "concentration2": constraints.positive,
        "scale": constraints.positive,
    }
    support = constraints.positive
    has_rsample = True

    def __init__(self, concentration1, concentration2, scale=1.0, validate_args=None):
        self.concentration1, self.concentration2, self.scale = broadcast_all(
            concentration1, concentration2, scale)
        super().__init__(self.scale.shape, validate_args=validate_args)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(BurrXII, _instance)
        batch_shape = torch.Size(batch_shape)
        new.concentration1 = self.concentration1.expand(batch_shape)
        new.concentration2 = self.concentration2.expand(batch_shape)
        new.scale = self.scale.expand(batch_shape)
        super(BurrXII, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        c, k, lam = self.concentration1, self.concentration2, self.scale
        z = torch.log(value) - torch.log(lam)  # log(x / lambda)
        return (torch.log(c) + torch.log(k) - torch.log(lam) + (c - 1) * z
                - (k + 1) * F.softplus(c * z))

    def cdf(self, value):
        c, k, lam = self.concentration1, self.concentration2, self.scale
        z = torch.log(value) - torch.log(lam)
        return -torch.expm1(-k * F.softplus(c * z))

    def icdf(self, value):
        c, k, lam = self.concentration1, self.concentration2, self.scale
        return lam * torch.expm1(-torch.log1p(-value) / k).pow(1.0 / c)

    def rsample(self, sample_shape=_EMPTY):
        shape = self._extended_shape(sample_shape)
        finfo = torch.finfo(self.scale.dtype)
        u = torch.rand(shape, dtype=self.scale.dtype, device=self.scale.device)
        return self.icdf(u.clamp(finfo.tiny, 1 - finfo.eps))

    @property
    def mean(self):
        c, k, lam = self.concentration1, self.concentration2, self.scale
        ok = c * k > 1
        kk = torch.where(ok, k, k + 1.0 / c + 1.0)
        m = lam * k * torch.exp(torch.lgamma(kk - 1 / c) + torch.lgamma(1 + 1 / c)
                                - torch.lgamma(kk + 1))
        return torch.where(ok, m, torch.full_like(m, math.inf))
