"""Loaders for the benchmark data: UCI regression splits and continuous-indexed tensors.

The UCI format is the standard split set (Hernandez-Lobato & Adams 2015): a
folder per dataset holding ``data.txt``, ``index_features.txt``,
``index_target.txt``, ``index_train_<k>.txt``, ``index_test_<k>.txt`` and
``n_splits.txt``. One dataset (concrete, splits 0-4) ships with the package so
the demo needs nothing else; everything else is loaded by path.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

__all__ = [
    "UCISplit",
    "default_data_dir",
    "bundled_uci_dir",
    "list_uci_datasets",
    "uci_n_splits",
    "load_uci",
    "list_tensor_datasets",
    "load_tensor_fold",
]

_UCI_FILES = ("data.txt", "index_features.txt", "index_target.txt")


def default_data_dir() -> Path:
    """``$PYRO_DKM_DATA`` if set, else ``../shared/data`` beside the working directory
    or beside the checkout holding this package."""
    env = os.environ.get("PYRO_DKM_DATA")
    if env:
        return Path(env)
    candidates = [Path.cwd().parent / "shared" / "data",
                  Path(__file__).resolve().parents[2] / "shared" / "data"]
    for c in candidates:
        if c.is_dir():
            return c
    return candidates[0]


def bundled_uci_dir() -> Path:
    """The folder holding the UCI data bundled with the package (concrete)."""
    return Path(__file__).resolve().parent / "data"


def list_uci_datasets(uci_dir: str | os.PathLike) -> list[str]:
    """Names of the sub-folders of ``uci_dir`` that hold a UCI split dataset."""
    uci_dir = Path(uci_dir)
    if not uci_dir.is_dir():
        raise FileNotFoundError(f"UCI data folder {uci_dir} does not exist")
    return sorted(p.name for p in uci_dir.iterdir()
                  if p.is_dir() and all((p / f).is_file() for f in _UCI_FILES))


def uci_n_splits(folder: str | os.PathLike) -> int:
    """Number of splits whose index files exist in a UCI dataset folder."""
    folder = Path(folder)
    k = 0
    while all((folder / f"index_{part}_{k}.txt").is_file() for part in ("train", "test")):
        k += 1
    return k


@dataclass
class UCISplit:
    """One standardised train/test split.

    ``X_*``/``y_*`` are standardised with training statistics; ``y_mean`` and
    ``y_std`` map predictions back to original units (``y * y_std + y_mean``).
    Shapes: ``X_train (n, d)``, ``y_train (n,)``.
    """

    name: str
    split: int
    X_train: Tensor
    y_train: Tensor
    X_test: Tensor
    y_test: Tensor
    y_mean: float
    y_std: float

    @property
    def y_test_original(self) -> Tensor:
        return self.y_test * self.y_std + self.y_mean


def load_uci(
    name: str,
    split: int = 0,
    *,
    data_dir: str | os.PathLike | None = None,
    dtype: torch.dtype = torch.float64,
) -> UCISplit:
    """Load split ``split`` of UCI dataset ``name`` from ``data_dir`` (a folder of
    dataset folders, default: the bundled data), standardised with training
    statistics."""
    root = Path(data_dir) if data_dir is not None else bundled_uci_dir()
    folder = root / name
    if not folder.is_dir():
        raise FileNotFoundError(f"no UCI dataset folder {folder}")
    n_splits = uci_n_splits(folder)
    if not isinstance(split, int) or not 0 <= split < n_splits:
        raise ValueError(f"split must be an int in [0, {n_splits}) for {folder}, got {split!r}")
    data = np.loadtxt(folder / "data.txt")
    feat = np.loadtxt(folder / "index_features.txt", dtype=np.int64, ndmin=1)
    target = int(np.loadtxt(folder / "index_target.txt", dtype=np.int64))
    tr = np.loadtxt(folder / f"index_train_{split}.txt", dtype=np.int64, ndmin=1)
    te = np.loadtxt(folder / f"index_test_{split}.txt", dtype=np.int64, ndmin=1)
    X, y = data[:, feat], data[:, target]
    x_mean, x_std = X[tr].mean(0), X[tr].std(0)
    x_std[x_std == 0] = 1.0
    y_mean, y_std = float(y[tr].mean()), float(y[tr].std())

    def t(a):
        return torch.as_tensor(a, dtype=dtype)

    return UCISplit(
        name=name,
        split=split,
        X_train=t((X[tr] - x_mean) / x_std),
        y_train=t((y[tr] - y_mean) / y_std),
        X_test=t((X[te] - x_mean) / x_std),
        y_test=t((y[te] - y_mean) / y_std),
        y_mean=y_mean,
        y_std=y_std,
    )


def list_tensor_datasets(tensor_dir: str | os.PathLike) -> list[str]:
    """Names (file stems) of the ``.npz`` tensor datasets in ``tensor_dir``."""
    tensor_dir = Path(tensor_dir)
    if not tensor_dir.is_dir():
        raise FileNotFoundError(f"tensor data folder {tensor_dir} does not exist")
    return sorted(p.stem for p in tensor_dir.glob("*.npz"))


def load_tensor_fold(path: str | os.PathLike, fold: int = 0) -> dict:
    """One fold of a continuous-indexed tensor dataset (``.npz``, no pickle).

    Returns a dict of numpy arrays: ``shape``, ``train_coord``, ``train_index``,
    ``train_value``, ``test_coord``, ``test_index``, ``test_value``.
    """
    with np.load(path, allow_pickle=False) as z:
        key = f"train_value_{fold}"
        if key not in z:
            raise ValueError(f"fold {fold} not found in {path}")
        out = {"shape": z["shape"]}
        for part in ("train", "test"):
            for field in ("coord", "index", "value"):
                out[f"{part}_{field}"] = z[f"{part}_{field}_{fold}"]
    return out
