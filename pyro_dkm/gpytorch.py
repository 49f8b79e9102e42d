"""GPyTorch adapters: our kernels as ``gpytorch.kernels.Kernel`` objects, and the DKM as a
GPyTorch model.

``NNGPKernel`` drops into any GPyTorch model (``ExactGP``, ``ApproximateGP``)::

    covar_module = gpytorch.kernels.ScaleKernel(NNGPKernel(depth=2, activation="relu"))

:class:`DeepKernelMachineGP` trains with ``gpytorch.mlls.VariationalELBO``;
:class:`~pyro_dkm.kernels.adapters.GPyTorchKernel` wraps any protocol kernel.
"""

from __future__ import annotations

import torch
from gpytorch.constraints import Positive
from torch import Tensor

from ._gpytorch_dkm import DeepKernelMachineGP  # noqa: E402
from .kernels.adapters import CheckedKernel, GPyTorchKernel  # noqa: E402
from .kernels.keops import DEFAULT_KEOPS_THRESHOLD
from .kernels.nngp import ACTIVATIONS as _ACTIVATIONS
from .kernels.nngp import fully_connected
from .linalg import check_positive

__all__ = ["NNGPKernel", "DeepKernelMachineGP", "GPyTorchKernel"]



def _check_init_variance(value, name: str, *, allow_zero: bool) -> float:
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a float, got a tensor")
    return check_positive(value, name, allow_zero=allow_zero)


class NNGPKernel(CheckedKernel):
    r"""NNGP (or NTK) kernel of a fully-connected network of ``depth`` hidden layers,

    ``serial(Dense(w_0, b_0), act, Dense(w_1, b_1), act, ..., Dense(w_depth, b_depth))``

    (see :mod:`pyro_dkm.kernels.nngp`), with learnable per-layer weight and bias
    variances :math:`\sigma_{w,l}^2, \sigma_{b,l}^2` (``depth + 1`` of each).

    Args:
        depth: number of hidden layers (activations), ``>= 0``.
        activation: ``"relu"`` or ``"erf"``.
        weight_var: initial :math:`\sigma_w^2` for every layer (``> 0``).
        bias_var: initial :math:`\sigma_b^2` for every layer (``>= 0``).
        kernel: ``"nngp"`` or ``"ntk"``.
        weight_var_constraint, bias_var_constraint: GPyTorch constraints
            (default ``Positive()``, and ``Interval(0, 1e4)`` is a sensible bound).
        batch_shape: as for every GPyTorch kernel; hyper-parameters get shape
            ``(*batch_shape, depth + 1)``.
        use_keops: ``None`` (default: ``pyro_dkm.settings``: the lazy operator when
            ``settings.lazy_kernels`` says so, its products on ``settings.use_keops``'s
            backend; by default a dense matrix), ``False`` (the dense kernel matrix),
            ``True`` (always the lazy :class:`~pyro_dkm.kernels.keops.NNGPOperator` with
            KeOps products, falling back to torch with a warning where impossible) or
            ``"auto"`` (the lazy operator when both inputs have ``>= keops_threshold``
            rows; its products run through KeOps on CUDA and through the tiled torch
            kernel on CPU, which is faster there). The lazy operator never holds K whole
            (O(N) memory matrix products; linear_operator then uses CG/Lanczos). It needs
            2-D inputs and an empty ``batch_shape`` (else dense).
        keops_threshold: size switch for ``use_keops="auto"`` (default 20000): below it a
            dense matrix is cheaper (a dense Cholesky solve beats 15-25 CG iterations
            below a few thousand points, and the matrix, 8 N^2 bytes, is 3.2 GB at
            N = 2e4). Gradients of the KeOps products are hand-derived KeOps formulas
            (``docs/keops.md``).

    ``forward(x1, x2, diag=False)`` takes ``(..., n, d)`` inputs and returns
    ``(..., n1, n2)`` (or ``(..., n1)`` with ``diag=True``, computed in O(n d)).
    """

    has_lengthscale = False

    def __init__(
        self,
        depth: int = 2,
        activation: str = "relu",
        weight_var: float = 2.0,
        bias_var: float = 0.1,
        kernel: str = "nngp",
        weight_var_constraint=None,
        bias_var_constraint=None,
        use_keops=None,
        keops_threshold: int = DEFAULT_KEOPS_THRESHOLD,
        **kwargs,
    ):
        if use_keops not in (None, True, False, "auto"):
            raise ValueError(f"use_keops must be None, True, False or 'auto', got "
                             f"{use_keops!r}")
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 0:
            raise ValueError(f"depth must be a non-negative int, got {depth!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"activation must be one of {sorted(_ACTIVATIONS)}, got "
                             f"{activation!r}")
        if kernel not in ("nngp", "ntk"):
            raise ValueError(f"kernel must be 'nngp' or 'ntk', got {kernel!r}")
        weight_var = _check_init_variance(weight_var, "weight_var", allow_zero=False)
        bias_var = _check_init_variance(bias_var, "bias_var", allow_zero=True)
        super().__init__(**kwargs)
        self.depth = depth
        self.activation = activation
        self.kernel = kernel
        self.use_keops = use_keops
        self.keops_threshold = int(keops_threshold)
        shape = (*self.batch_shape, depth + 1)
        self.register_parameter("raw_weight_var", torch.nn.Parameter(torch.zeros(shape)))
        self.register_parameter("raw_bias_var", torch.nn.Parameter(torch.zeros(shape)))
        self.register_constraint("raw_weight_var", weight_var_constraint or Positive())
        self.register_constraint("raw_bias_var", bias_var_constraint or Positive())
        self.weight_var = torch.full(shape, weight_var)
        # Positive() cannot represent exactly 0: start from a tiny bias instead.
        self.bias_var = torch.full(shape, max(bias_var, 1e-6))

    @property
    def weight_var(self) -> Tensor:
        return self.raw_weight_var_constraint.transform(self.raw_weight_var)

    @weight_var.setter
    def weight_var(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_weight_var.dtype,
                                device=self.raw_weight_var.device)
        self.initialize(raw_weight_var=self.raw_weight_var_constraint.inverse_transform(value))

    @property
    def bias_var(self) -> Tensor:
        return self.raw_bias_var_constraint.transform(self.raw_bias_var)

    @bias_var.setter
    def bias_var(self, value) -> None:
        value = torch.as_tensor(value, dtype=self.raw_bias_var.dtype,
                                device=self.raw_bias_var.device)
        self.initialize(raw_bias_var=self.raw_bias_var_constraint.inverse_transform(value))

    def kernel_fn(self):
        """The :class:`~pyro_dkm.kernels.nngp.NNGPKernelFn` with the current
        hyper-parameters (differentiable)."""
        return fully_connected(self.depth, self.activation, self.weight_var, self.bias_var,
                               per_layer=True)

    def forward(self, x1: Tensor, x2: Tensor, diag: bool = False, **params) -> Tensor:
        if params.get("last_dim_is_batch", False):
            raise ValueError("NNGPKernel does not support last_dim_is_batch=True")
        kfn = self.kernel_fn()
        if diag:
            same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
            return kfn(x1, None if same else x2, get=self.kernel, diag=True)
        if self._keops_wanted(x1, x2):
            from .kernels.keops import NNGPOperator

            same = x1 is x2 or (x1.shape == x2.shape and torch.equal(x1, x2))
            return NNGPOperator(kfn, x1, None if same else x2, get=self.kernel,
                                use_keops=self.use_keops,
                                threshold=None if self.use_keops is None else
                                self.keops_threshold)
        return kfn(x1, x2, get=self.kernel)

    def _keops_wanted(self, x1: Tensor, x2: Tensor) -> bool:
        """Whether to return the lazy operator (not which backend multiplies)."""
        if self.use_keops is None:
            from ._settings import settings

            lazy, threshold = settings.lazy_kernels, settings.lazy_threshold
        else:
            lazy, threshold = self.use_keops, self.keops_threshold
        if lazy is False:
            return False
        if lazy == "auto" and min(x1.shape[-2], x2.shape[-2]) < threshold:
            return False
        if x1.dim() != 2 or x2.dim() != 2 or len(self.batch_shape) > 0:
            if self.use_keops is True:
                import warnings

                from .kernels.keops import KeOpsFallbackWarning

                warnings.warn("NNGPKernel: the KeOps path needs 2-D inputs and no batch_shape; "
                              "using the dense path", KeOpsFallbackWarning, stacklevel=3)
            return False
        return True

