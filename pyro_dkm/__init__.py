"""pyro_dkm: representation-learning kernel methods for Pyro."""

from . import dkm, kernels, linalg, processes, tucker
from .linalg import NotPositiveDefiniteError

__version__ = "0.1.0"

__all__ = [
    "dkm", "kernels", "linalg", "processes", "tucker", "NotPositiveDefiniteError", "__version__",
]
