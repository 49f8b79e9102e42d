r"""Scale mixtures of (NN)GPs: Student-t processes and arbitrary scale priors.

Lee, Yun, Yang & Lee, "Scale Mixtures of Neural Network Gaussian Processes", ICLR 2022.
See ``docs/processes.md``.

* :class:`StudentTProcess` -- inverse-gamma mixture, a ``MultivariateStudentT`` prior;
* :class:`ScaleMixture` -- any positive scale prior (``log_prob`` by quadrature);
* :class:`StudentTProcessRegression`, :class:`ScaleMixtureRegression`,
  :class:`GaussianProcessRegression` -- exact regression, :func:`fit`;
* :class:`RobustRegression`, :func:`robust_vb` -- Student-t *noise* (per-observation
  inverse-gamma scales) under a GP / Student-t process prior, variational EM;
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
from .robust import (
    RobustFit,
    RobustRegression,
    StudentTNoisePredictive,
    robust_bound,
    robust_vb,
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
    student_t_log_marginal_from_quad,
)

__all__ = [
    "StudentTProcess",
    "inverse_gamma_posterior",
    "kernel_matrix",
    "log_gamma_ratio",
    "student_t_log_marginal_from_quad",
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
    "RobustFit",
    "RobustRegression",
    "StudentTNoisePredictive",
    "robust_bound",
    "robust_vb",
]

# The classification and GPyTorch modules are imported lazily on first attribute access
# (``pyro_dkm.processes.classification`` or one of their names below): importing this
# package stays light (no gpytorch/pykeops import) and never fails because of them.
_OPTIONAL = ("classification", "gpytorch")
_LAZY_NAMES = {
    "SparseVariationalClassifier": "classification",
    "SVGPClassifier": "classification",
    "SVTPClassifier": "classification",
    "fit_classifier": "classification",
    "classification_metrics": "classification",
    "StudentTMarginalLogLikelihood": "gpytorch",
    "student_t_predictive": "gpytorch",
}
__all__ += list(_LAZY_NAMES)


def __getattr__(name: str):
    import importlib

    if name in _OPTIONAL:
        return importlib.import_module(f"{__name__}.{name}")
    if name in _LAZY_NAMES:
        module = importlib.import_module(f"{__name__}.{_LAZY_NAMES[name]}")
        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_OPTIONAL) | set(_LAZY_NAMES))
