r"""One kernel protocol, and adapters to ``pyro.contrib.gp`` and GPyTorch.

The protocol is ``pyro.contrib.gp``'s call signature: a kernel is a callable

.. code-block:: python

    k(X, Z=None, diag=False)   # (N, d), (M, d) -> (N, M); Z=None: k(X, X); diag: (N,)

Input-space NNGP/NTK functions (``serial(...)``), :class:`~pyro_dkm.processes.NNGPCovariance`
(learnable hyper-parameters), Gram-space kernels applied to inputs
(:func:`gram_kernel_on_inputs`, :math:`G = XZ^T/d`) and :class:`MaternKernel` all
satisfy it. :class:`PyroGPKernel` turns any of them into a
``pyro.contrib.gp.kernels.Kernel`` (usable in ``gp.models.GPRegression``,
``VariationalSparseGP``, ``gp.kernels.Sum/Product``), and :class:`GPyTorchKernel`
into a ``gpytorch.kernels.Kernel``. A kernel held as a ``torch.nn.Module`` (a
``PyroModule``) is registered as a submodule, so its hyper-parameters train with the
host library's optimiser.
"""

from __future__ import annotations

from typing import Callable

import gpytorch
import pyro.contrib.gp as gp
import torch
from torch import Tensor

from ..linalg import check_tensor
from .gram import GramKernel

__all__ = ["PyroGPKernel", "GPyTorchKernel", "MaternKernel", "gram_kernel_on_inputs",
           "check_kernel"]


def check_kernel(kernel) -> Callable:
    """Return ``kernel`` if it is callable (the protocol above), else raise ``TypeError``."""
    if not callable(kernel):
        raise TypeError(f"kernel must be callable as k(X, Z=None, diag=False), got "
                        f"{type(kernel).__name__}")
    return kernel


def check_gpytorch_inputs(x1, x2=None) -> None:
    """Clear errors for a GPyTorch kernel call's inputs before GPyTorch's own machinery
    sees them (which fails with ``AttributeError``/``RuntimeError`` deep inside)."""
    for name, x in (("x1", x1), ("x2", x2)):
        if x is None:
            continue
        if not isinstance(x, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__} "
                            f"(convert with torch.as_tensor(x, dtype=torch.float64))")
        if x.dim() == 0:
            raise ValueError(f"{name} must have at least one dimension, got a scalar")
    if x2 is not None:
        if x1.dim() != x2.dim():
            raise ValueError(f"x1 and x2 must have the same number of dimensions, got shapes "
                             f"{tuple(x1.shape)} and {tuple(x2.shape)}")
        if x1.dim() > 1 and x1.shape[-1] != x2.shape[-1]:
            raise ValueError(f"x1 and x2 must have the same number of features (last "
                             f"dimension), got shapes {tuple(x1.shape)} and {tuple(x2.shape)}")


def _call(kernel, X: Tensor, Z: Tensor | None, diag: bool) -> Tensor:
    if diag:
        return kernel(X, diag=True)
    return kernel(X, Z)


class _GramOnInputs:
    """A Gram-space kernel ``K(G)`` at the input Gram ``G = X Z^T / d``."""

    def __init__(self, gram_kernel: GramKernel):
        if not isinstance(gram_kernel, GramKernel):
            raise TypeError(f"gram_kernel must be a GramKernel, got {type(gram_kernel).__name__}")
        self.gram_kernel = gram_kernel

    def __call__(self, X: Tensor, Z: Tensor | None = None, diag: bool = False) -> Tensor:
        check_tensor(X, "X", min_ndim=2)
        d = X.shape[-1]
        gx = X.pow(2).sum(-1) / d
        if diag:
            return self.gram_kernel.diag(gx)
        if Z is None:
            return self.gram_kernel(X @ X.mT / d)
        check_tensor(Z, "Z", min_ndim=2)
        if Z.shape[-1] != d:
            raise ValueError(f"X and Z must have the same number of columns, got {d} and "
                             f"{Z.shape[-1]}")
        gz = Z.pow(2).sum(-1) / d
        return self.gram_kernel.cross(X @ Z.mT / d, gx[..., :, None], gz[..., None, :])

    def __repr__(self) -> str:
        return f"gram_kernel_on_inputs({self.gram_kernel!r})"


def gram_kernel_on_inputs(gram_kernel: GramKernel) -> Callable:
    r"""The protocol form of a Gram-space kernel: :math:`k(x, z) = K(G)` at the input
    Gram :math:`G = X Z^T / d` (the DKM's first kernel layer, with no learned Gram)."""
    return _GramOnInputs(gram_kernel)


class MaternKernel:
    r"""Stationary Matern kernel of 1-D inputs (the FunBaT factor prior; its state-space
    form is :func:`pyro_dkm.tucker.ssm.matern_ssm`), ``nu`` in ``{1/2, 3/2, 5/2}``."""

    def __init__(self, nu: float = 1.5, lengthscale: float = 1.0, variance: float = 1.0):
        from ..tucker.ssm import _check_nu

        self.nu = _check_nu(nu)
        self.lengthscale, self.variance = lengthscale, variance

    def __call__(self, X: Tensor, Z: Tensor | None = None, diag: bool = False) -> Tensor:
        from ..tucker.ssm import matern_kernel

        check_tensor(X, "X", min_ndim=1)
        x = X[..., 0] if X.dim() == 2 else X
        if diag:
            return matern_kernel(self.nu, self.lengthscale, self.variance, torch.zeros_like(x))
        z = x if Z is None else (Z[..., 0] if Z.dim() == 2 else Z)
        r = (x[:, None] - z[None, :]).abs()
        return matern_kernel(self.nu, self.lengthscale, self.variance, r)


class PyroGPKernel(gp.kernels.Kernel):
    """Any protocol kernel as a ``pyro.contrib.gp.kernels.Kernel``.

    Args:
        kernel: ``k(X, Z=None, diag=False)``; a ``torch.nn.Module`` kernel (e.g.
            ``NNGPCovariance``) becomes the submodule ``base`` (its ``PyroParam``s are
            named ``"<prefix>.base.<name>"``, swappable for ``PyroSample`` priors).
        input_dim, active_dims: as for every ``gp.kernels.Kernel`` (the kernel sees the
            active columns only).
    """

    def __init__(self, kernel, input_dim: int, active_dims=None):
        super().__init__(input_dim, active_dims)
        self.base = check_kernel(kernel)

    def forward(self, X: Tensor, Z: Tensor | None = None, diag: bool = False) -> Tensor:
        X = self._slice_input(X)
        Z = None if Z is None else self._slice_input(Z)
        return _call(self.base, X, Z, diag)


class CheckedKernel(gpytorch.kernels.Kernel):
    """A ``gpytorch.kernels.Kernel`` whose call checks ``x1``/``x2`` first
    (:func:`check_gpytorch_inputs`)."""

    def __call__(self, x1, x2=None, diag: bool = False, last_dim_is_batch: bool = False,
                 **params):
        check_gpytorch_inputs(x1, x2)
        return super().__call__(x1, x2, diag=diag, last_dim_is_batch=last_dim_is_batch,
                                **params)


class GPyTorchKernel(CheckedKernel):
    """Any protocol kernel as a ``gpytorch.kernels.Kernel`` (a ``torch.nn.Module`` kernel
    becomes the submodule ``base``)."""

    has_lengthscale = False

    def __init__(self, kernel, **kwargs):
        super().__init__(**kwargs)
        self.base = check_kernel(kernel)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params) -> Tensor:
        if params.get("last_dim_is_batch", False):
            raise ValueError("GPyTorchKernel does not support last_dim_is_batch=True")
        same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
        return _call(self.base, x1, None if same else x2, diag)
