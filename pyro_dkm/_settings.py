"""Package settings with one meaning everywhere, read at call time.

``pyro_dkm.settings`` is both a namespace of current values and a context manager
(as ``gpytorch.settings``)::

    with pyro_dkm.settings(use_keops=False, cg_tol=1e-8):
        ...                                  # restored on exit
    pyro_dkm.settings.set(cholesky_jitter=1e-8)   # process-wide

========================  =======================================================
``use_keops``             backend of every *lazy* kernel product
                          (:func:`~pyro_dkm.kernels.keops.keops_matmul`,
                          ``NNGPOperator``, ``exact_predict``, a lazy
                          ``NNGPKernel``): ``"auto"`` (KeOps on CUDA from
                          ``keops_threshold`` rows, else the torch tiles, which are
                          faster on CPU), ``True`` (KeOps; warn and fall back if
                          impossible) or ``False`` (torch tiles)
``keops_threshold``       rows from which ``"auto"`` picks KeOps on CUDA (20000)
``lazy_kernels``          whether ``NNGPKernel`` returns a lazy operator instead of
                          a dense matrix: ``False`` (default), ``True`` or
                          ``"auto"`` (from ``lazy_threshold`` rows)
``lazy_threshold``        rows from which ``lazy_kernels="auto"`` is lazy (20000)
``cholesky_jitter``       first relative jitter of :func:`pyro_dkm.linalg.cholesky`
                          (``None``: 1e-10 in float64, 1e-6 in float32)
``cg_tol``                relative residual at which :func:`cg_solve` stops (1e-6)
========================  =======================================================

An explicit argument to a function always wins over the setting.
"""

from __future__ import annotations

import copy

__all__ = ["settings"]

_DEFAULTS = dict(use_keops="auto", keops_threshold=20000, lazy_kernels=False,
                 lazy_threshold=20000, cholesky_jitter=None, cg_tol=1e-6)


def _check(name: str, value) -> None:
    if name not in _DEFAULTS:
        raise ValueError(f"unknown pyro_dkm setting {name!r}; known: {sorted(_DEFAULTS)}")
    if name in ("use_keops", "lazy_kernels") and value not in (True, False, "auto"):
        raise ValueError(f"{name} must be True, False or 'auto', got {value!r}")
    if name in ("keops_threshold", "lazy_threshold") and (
            isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    if name in ("cholesky_jitter", "cg_tol") and value is not None and not (
            isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"{name} must be a positive float, got {value!r}")
    if name == "cg_tol" and value is None:
        raise ValueError("cg_tol must be a positive float, got None")


class _Settings:
    def __init__(self):
        object.__setattr__(self, "_values", dict(_DEFAULTS))
        object.__setattr__(self, "_stack", [])
        object.__setattr__(self, "_pending", None)

    def __getattr__(self, name):
        values = object.__getattribute__(self, "_values")
        if name in values:
            return values[name]
        raise AttributeError(f"unknown pyro_dkm setting {name!r}; known: {sorted(values)}")

    def __setattr__(self, name, value):
        self.set(**{name: value})

    def set(self, **values) -> None:
        """Change settings process-wide."""
        for k, v in values.items():
            _check(k, v)
        self._values.update(values)

    def reset(self) -> None:
        """Back to the defaults."""
        self._values.clear()
        self._values.update(_DEFAULTS)

    def __call__(self, **values) -> "_Settings":
        for k, v in values.items():
            _check(k, v)
        object.__setattr__(self, "_pending", values)
        return self

    def __enter__(self) -> "_Settings":
        pending = self._pending or {}
        object.__setattr__(self, "_pending", None)
        self._stack.append(copy.copy(self._values))
        self._values.update(pending)
        return self

    def __exit__(self, *exc) -> None:
        saved = self._stack.pop()
        self._values.clear()
        self._values.update(saved)

    def __repr__(self) -> str:
        return "pyro_dkm.settings(" + ", ".join(f"{k}={v!r}" for k, v in
                                                self._values.items()) + ")"


#: the package's settings (see the module docstring)
settings = _Settings()
