"""pyro_dkm: representation-learning kernel methods for Pyro and GPyTorch.

Main entry points (all importable from here):

* :class:`DeepKernelMachine` -- sparse deep kernel machine: a latent function for any
  Pyro model (``f = dkm(X)``), or a whole model (``model``/``guide``/``predict``);
  :class:`ExactDeepKernelMachine` for small data; :class:`ConvDeepKernelMachine` for
  sequences and images;
* :mod:`pyro_dkm.likelihoods` -- ``Gaussian``, ``StudentT``, ``Bernoulli``, ``Poisson``,
  ``Categorical``, any callable;
* :class:`StudentTProcessRegression`, :class:`ScaleMixtureRegression`,
  :class:`GaussianProcessRegression`, :class:`RobustRegression` -- heavy-tailed
  processes and noise (:mod:`pyro_dkm.processes`);
* :class:`FunctionalTucker` -- functional Bayesian Tucker decomposition
  (:mod:`pyro_dkm.tucker`);
* :func:`serial` (``Dense``, ``Relu``, ``Erf``) -- NNGP/NTK kernels
  (:mod:`pyro_dkm.kernels`; adapters to ``pyro.contrib.gp`` and GPyTorch in
  :mod:`pyro_dkm.kernels.adapters`);
* :func:`fit` -- one training entry point for every model, returning a
  :class:`FitResult`; :data:`settings` -- KeOps / lazy-kernel / jitter / CG settings;
* :mod:`pyro_dkm.gpytorch` -- ``NNGPKernel`` and ``DeepKernelMachineGP`` for GPyTorch.

See ``docs/architecture.md`` for the layers and their contracts.
"""

import os as _os

# KeOps (imported by GPyTorch / linear_operator when installed) prints a CUDA warning and
# its code-generation lines unless told not to; keep it quiet unless the user has chosen
# (set KEOPS_VERBOSE=1 / PYKEOPS_VERBOSE=1 to see them).
for _name in ("KEOPS_VERBOSE", "PYKEOPS_VERBOSE"):
    _os.environ.setdefault(_name, "0")
del _name

from . import dkm, kernels, likelihoods, linalg, processes, tucker  # noqa: E402
from ._settings import settings  # noqa: E402
from ._training import FitResult  # noqa: E402
from .dkm import (  # noqa: E402
    ConvDeepKernelMachine,
    DeepKernelMachine,
    ExactDeepKernelMachine,
    select_inducing_points,
)
from .fitting import fit  # noqa: E402
from .kernels import Dense, Erf, Relu, serial  # noqa: E402
from .linalg import NotPositiveDefiniteError  # noqa: E402
from .processes import (  # noqa: E402
    GaussianProcessRegression,
    RobustRegression,
    ScaleMixtureRegression,
    StudentTProcessRegression,
)
from .tucker import FunctionalTucker  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "dkm", "kernels", "likelihoods", "linalg", "processes", "tucker", "gpytorch", "datasets",
    "baselines", "ConvDeepKernelMachine", "DeepKernelMachine", "ExactDeepKernelMachine",
    "select_inducing_points",
    "GaussianProcessRegression", "StudentTProcessRegression", "ScaleMixtureRegression",
    "RobustRegression", "FunctionalTucker", "Dense", "Erf", "Relu", "serial", "fit",
    "FitResult", "settings", "NotPositiveDefiniteError", "DeepKernelMachineGP", "__version__",
]

# imported on first attribute access: GPyTorch (and KeOps) stay out of a plain import
_LAZY_MODULES = ("gpytorch", "datasets", "baselines")


def __getattr__(name: str):
    import importlib

    if name in _LAZY_MODULES:
        return importlib.import_module(f"{__name__}.{name}")
    if name == "DeepKernelMachineGP":
        return importlib.import_module(f"{__name__}.gpytorch").DeepKernelMachineGP
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
