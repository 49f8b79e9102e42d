"""Kernels: input-space NNGP/NTK (:mod:`.nngp`) and Gram-space layer maps (:mod:`.gram`)."""

from .gram import (
    ErfGram,
    GramKernel,
    NormalisedGaussianGram,
    ReluGram,
    SqExpGram,
    SumGram,
)
from .nngp import Dense, Erf, KernelState, Layer, NNGPKernelFn, Relu, serial

__all__ = [
    "Dense", "Erf", "KernelState", "Layer", "NNGPKernelFn", "Relu", "serial",
    "GramKernel", "ReluGram", "ErfGram", "SqExpGram", "NormalisedGaussianGram", "SumGram",
]
