"""Functional Bayesian Tucker decomposition (FunBaT) with state-space GP priors."""

from .als import als_fit, als_predict
from .kalman import associative_scan, condition_on_neighbours, kalman_filter, rts_smoother
from .model import FunctionalTucker
from .pyro_model import (
    GaussMarkovChain,
    PyroFunctionalTucker,
    TuckerMeanFieldGuide,
    grids_and_index,
    guide_from_cep,
)
from .ssm import MaternSSM, discretise, matern_kernel, matern_ssm

__all__ = [
    "FunctionalTucker",
    "PyroFunctionalTucker",
    "TuckerMeanFieldGuide",
    "GaussMarkovChain",
    "guide_from_cep",
    "grids_and_index",
    "als_fit",
    "als_predict",
    "MaternSSM",
    "matern_ssm",
    "matern_kernel",
    "discretise",
    "kalman_filter",
    "rts_smoother",
    "associative_scan",
    "condition_on_neighbours",
]
