"""Functional Bayesian Tucker decomposition (FunBaT) with state-space GP priors."""

from .kalman import associative_scan, condition_on_neighbours, kalman_filter, rts_smoother
from .model import FunctionalTucker
from .ssm import MaternSSM, discretise, matern_kernel, matern_ssm

__all__ = [
    "FunctionalTucker",
    "MaternSSM",
    "matern_ssm",
    "matern_kernel",
    "discretise",
    "kalman_filter",
    "rts_smoother",
    "associative_scan",
    "condition_on_neighbours",
]
