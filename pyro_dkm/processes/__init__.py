r"""Scale mixtures of (NN)GPs: Student-t processes and arbitrary scale priors.

Lee, Yun, Yang & Lee, "Scale Mixtures of Neural Network Gaussian Processes", ICLR 2022.
See ``docs/processes.md``.

* :class:`StudentTProcess` -- inverse-gamma mixture, a ``MultivariateStudentT`` prior;
* :class:`ScaleMixture` -- any positive scale prior (``log_prob`` by quadrature);
* :class:`StudentTProcessRegression`, :class:`ScaleMixtureRegression`,
  :class:`GaussianProcessRegression` -- exact regression, :func:`fit`;
* :class:`BurrXII`, quadrature / importance-sampling posteriors over the scale,
  :class:`SpectralProblem` (one eigendecomposition, O(n) per hyper-parameter step).
"""

from .burr import BurrXII
from .regression import (
    GaussianProcessRegression,
    NNGPCovariance,
    ScaleMixtureRegression,
    StudentTProcessRegression,
    fit,
)
from .scale_mixture import (
    GaussianScaleLikelihood,
    ScaleMixture,
    ScalePosterior,
    check_scale_prior,
    mixture_predictive,
    scale_posterior_importance,
    scale_posterior_quadrature,
)
from .spectral import SpectralProblem, maximise_positive
from .student_t import (
    StudentTProcess,
    inverse_gamma_posterior,
    kernel_matrix,
    log_gamma_ratio,
    student_t_log_marginal,
)

__all__ = [
    "StudentTProcess",
    "inverse_gamma_posterior",
    "kernel_matrix",
    "log_gamma_ratio",
    "student_t_log_marginal",
    "BurrXII",
    "GaussianScaleLikelihood",
    "ScaleMixture",
    "ScalePosterior",
    "check_scale_prior",
    "mixture_predictive",
    "scale_posterior_importance",
    "scale_posterior_quadrature",
    "GaussianProcessRegression",
    "NNGPCovariance",
    "ScaleMixtureRegression",
    "StudentTProcessRegression",
    "fit",
    "SpectralProblem",
    "maximise_positive",
]

# Modules contributed alongside (classification, GPyTorch route) are imported lazily on
# first attribute access (``pyro_dkm.processes.classification``): importing this package
# stays light (no gpytorch/pykeops import) and never fails because of them.
_OPTIONAL = ("classification", "gpytorch")


def __getattr__(name: str):
    if name in _OPTIONAL:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
