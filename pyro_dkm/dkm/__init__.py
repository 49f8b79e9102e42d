"""Deep kernel machines (Yang et al., ICML 2023) as Pyro models.

* :class:`DeepKernelMachine`: sparse DKM (inducing points), ``model``/``guide`` for SVI,
  ``objective`` (closed form), ``predict``;
* :class:`ExactDeepKernelMachine`: full DKM for small data, closed-form marginal likelihood;
* :class:`ConvDeepKernelMachine`: convolutional DKM (1-D / 2-D), layers in :mod:`.conv`;
* :func:`fit`: Adam training helper; layers in :mod:`.layers`.
"""

from .conv import select_inducing_patches
from .conv_model import ConvDeepKernelMachine
from .exact import ExactDeepKernelMachine
from .gram_blocks import GramBlocks
from .layers import KERNELS, GramLayer, InputGram, KernelLayer, propagate_gram
from .model import DeepKernelMachine, select_inducing_points
from .output import SparseGPOutput, conditional_weights
from .training import FitResult, fit, fit_lbfgs, validation_metric

__all__ = [
    "DeepKernelMachine", "ConvDeepKernelMachine", "select_inducing_patches",
    "ExactDeepKernelMachine", "GramBlocks", "GramLayer", "InputGram",
    "KernelLayer", "KERNELS", "SparseGPOutput", "conditional_weights", "propagate_gram",
    "select_inducing_points", "fit", "fit_lbfgs", "FitResult", "validation_metric",
]
