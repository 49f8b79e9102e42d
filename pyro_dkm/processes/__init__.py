r"""Scale mixtures of (NN)GPs: Student-t processes and arbitrary scale priors.

Lee, Yun, Yang & Lee, "Scale Mixtures of Neural Network Gaussian Processes", ICLR 2022.
See ``docs/processes.md``.
"""

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
]
