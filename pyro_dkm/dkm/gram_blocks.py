"""The state passed between sparse deep-kernel-machine layers."""

from __future__ import annotations

from typing import NamedTuple

from torch import Tensor

__all__ = ["GramBlocks"]


class GramBlocks(NamedTuple):
    r"""One layer's Gram (or kernel) matrix in inducing form.

    Attributes:
        ii: ``(M, M)`` block between the ``M`` inducing points.
        ti: ``(T, M)`` cross block between ``T`` train/test points and the inducing points.
        t_diag: ``(T,)`` diagonal at the train/test points (the full ``T x T`` block is
            never formed: the sparse DKM only needs its diagonal).

    With the training set as the inducing set, ``ii`` is the full Gram of the exact DKM.
    """

    ii: Tensor
    ti: Tensor
    t_diag: Tensor

    @property
    def num_inducing(self) -> int:
        return self.ii.shape[-1]

    @property
    def num_points(self) -> int:
        return self.ti.shape[-2]

    def detach(self) -> "GramBlocks":
        return GramBlocks(self.ii.detach(), self.ti.detach(), self.t_diag.detach())
