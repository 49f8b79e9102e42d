"""One ``fit`` for every model of the package.

``pyro_dkm.fit(model, X, y, ...)`` trains any pyro_dkm model in place and returns a
:class:`~pyro_dkm._training.FitResult`. The shared options mean the same everywhere;
each model keeps its fast path behind the call:

======================================  ================================================
model                                   how it is fitted
======================================  ================================================
``DeepKernelMachine`` (any likelihood)  Adam on the (minibatch) ELBO, closed form where
                                        exact (:func:`pyro_dkm.dkm.fit`)
``ExactDeepKernelMachine``              Adam on the closed-form objective
``GaussianProcessRegression``,          type-II maximum likelihood, Adam or L-BFGS
``StudentTProcessRegression``,          (:func:`pyro_dkm.processes.fit`)
``ScaleMixtureRegression``
``RobustRegression``                    variational EM (``steps`` = EM sweeps)
``SVGPClassifier``/``SVTPClassifier``   SVI on minibatch ELBOs
``FunctionalTucker``                    conditional EP sweeps (its own settings)
``PyroFunctionalTucker``                SVI with a mean-field guide, minibatches
baselines (``SVGPRegressor``, ...)      their Adam loops (``steps`` = epochs)
======================================  ================================================

An option a model cannot honour raises ``ValueError`` naming it (no silent ignore).
"""

from __future__ import annotations

import time
from typing import Callable

from torch import Tensor

from ._training import FitResult

__all__ = ["fit", "FitResult"]

_SHARED = ("steps", "lr", "optimizer", "batch_size", "lr_schedule", "X_val", "y_val",
           "val_fraction", "eval_every", "patience", "progress", "callback", "seed")


def _check_steps(steps) -> None:
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)
                              or steps < 1):
        raise ValueError(f"steps must be a positive int, got {steps!r}")


def _refuse(kind: str, given: dict, allowed: tuple) -> None:
    bad = sorted(k for k, v in given.items() if v is not None and k not in allowed)
    if bad:
        raise ValueError(f"{kind} does not support the option(s) {', '.join(bad)} in "
                         f"pyro_dkm.fit (supported: {', '.join(allowed) or 'none'})")


def fit(model, X: Tensor | None = None, y: Tensor | None = None, *,
        steps: int | None = None, lr: float | None = None, optimizer: str | None = None,
        batch_size: int | None = None, lr_schedule=None, X_val: Tensor | None = None,
        y_val: Tensor | None = None, val_fraction: float | None = None,
        eval_every: int | None = None, patience: int | None = None,
        progress: bool | None = None, callback: Callable | None = None,
        seed: int | None = None, **options) -> FitResult:
    """Train ``model`` in place on ``(X, y)``; returns a :class:`FitResult`.

    Args:
        model: any pyro_dkm model (table in the module docstring).
        X, y: training data; models that hold their data (exact regression, robust
            regression) take it from here when given (``set_data``), else use their own.
        steps: optimiser steps (EM / CEP sweeps, baseline epochs); default per model.
        lr: learning rate; optimizer: ``"adam"`` or ``"lbfgs"`` (exact regression).
        batch_size: minibatch size (stochastic models); lr_schedule: ``None``,
            ``"cosine"`` or ``callable(optimizer) -> scheduler`` (DKMs).
        X_val, y_val / val_fraction, eval_every, patience: validation and early stopping
            (DKMs: the best-validation parameters are restored).
        progress: tqdm progress bar on stderr; callback: ``callback(step, loss)`` after
            each step, return True to stop; seed: ``pyro.set_rng_seed`` first.
        **options: model-specific options passed through (e.g. ``elbo=`` for a DKM,
            ``learn=``/``tol=`` for robust regression).
    """
    _check_steps(steps)
    if seed is not None:
        import pyro

        pyro.set_rng_seed(seed)
    given = dict(steps=steps, lr=lr, optimizer=optimizer, batch_size=batch_size,
                 lr_schedule=lr_schedule, X_val=X_val, y_val=y_val,
                 val_fraction=val_fraction, eval_every=eval_every, patience=patience,
                 progress=progress, callback=callback)
    from .dkm.exact import ExactDeepKernelMachine
    from .dkm.model import DeepKernelMachine
    from .dkm.training import fit as dkm_fit

    if isinstance(model, (DeepKernelMachine, ExactDeepKernelMachine)):
        _refuse(type(model).__name__, given,
                tuple(k for k in _SHARED if k not in ("optimizer", "seed")))
        kw = {k: v for k, v in given.items() if v is not None}
        if "steps" in kw:
            kw["num_steps"] = kw.pop("steps")
        if isinstance(model, ExactDeepKernelMachine):
            return dkm_fit(model, X, y, **kw, **options)  # X, y: None or its own data
        return dkm_fit(model, X, y, **kw, **options)

    from .processes.robust import RobustRegression

    if isinstance(model, RobustRegression):
        _refuse("RobustRegression", given, ("steps",))
        if X is not None:
            model.set_data(X, y)
        t0 = time.perf_counter()
        rf = model.fit(**({"max_iter": steps} if steps else {}), **options)
        return FitResult(losses=[-v / model.y.shape[0] for v in rf.history],
                         steps=len(rf.history), seconds=time.perf_counter() - t0, details=rf)

    from .processes.regression import _ExactRegression
    from .processes.regression import fit as exact_fit

    if isinstance(model, _ExactRegression):
        _refuse(type(model).__name__, given, ("steps", "lr", "optimizer"))
        if X is not None:
            model.set_data(X, y)
        t0 = time.perf_counter()
        losses = exact_fit(model, steps=steps or 100, lr=lr or 0.05,
                           optimizer=optimizer or "adam", **options)
        return FitResult(losses=losses, steps=len(losses), seconds=time.perf_counter() - t0)

    from .processes.classification import SparseVariationalClassifier, fit_classifier

    if isinstance(model, SparseVariationalClassifier):
        _refuse(type(model).__name__, given, ("steps", "lr", "batch_size", "progress",
                                              "callback"))
        kw = {k: v for k, v in given.items() if v is not None}
        if "steps" in kw:
            kw["num_steps"] = kw.pop("steps")
        r = fit_classifier(model, X, y, **kw, **options)
        return FitResult(losses=r.losses, steps=r.steps, seconds=r.seconds, details=r)

    from .tucker.model import FunctionalTucker
    from .tucker.pyro_model import PyroFunctionalTucker

    if isinstance(model, PyroFunctionalTucker):
        _refuse("PyroFunctionalTucker", given, ("steps", "lr", "batch_size", "progress",
                                                "callback"))
        return _fit_pyro_tucker(model, X, y, steps=steps or 1000, lr=lr or 0.01,
                                batch_size=batch_size, progress=progress, callback=callback,
                                seed=seed, **options)

    if isinstance(model, FunctionalTucker):
        _refuse("FunctionalTucker", given, ())
        t0 = time.perf_counter()
        model.fit(X, y, **options)
        return FitResult(steps=len(getattr(model, "history", []) or []),
                         seconds=time.perf_counter() - t0, details=model)

    from . import baselines

    if isinstance(model, (baselines.SVGPRegressor, baselines.DeepGPRegressor,
                          baselines.NNGPRegressor)):
        _refuse(type(model).__name__, given, ("steps", "lr", "batch_size"))
        kw = {k: v for k, v in dict(epochs=steps, lr=lr, batch_size=batch_size).items()
              if v is not None}
        seconds = model.fit(X, y, **kw, **options)
        return FitResult(steps=steps or 0, seconds=float(seconds))

    raise TypeError(f"pyro_dkm.fit does not know how to fit a {type(model).__name__}")


def _fit_pyro_tucker(model, index, values, *, steps, lr, batch_size, progress, callback,
                     seed, guide=None, elbo=None, distributed=None) -> FitResult:
    """SVI for the Pyro FunBaT: Adam on minibatch ELBOs (``index`` (N, K) into the grids,
    ``values`` (N,)), data-parallel inside a process group (:mod:`pyro_dkm.distributed`).
    ``guide``: default a :class:`~pyro_dkm.tucker.pyro_model.TuckerMeanFieldGuide`
    (returned in ``details``); ``elbo``: default ``Trace_ELBO()``."""
    import pyro
    import torch

    from ._training import OptimiserSteps, shuffled_minibatches
    from .distributed import DataParallel
    from .tucker.pyro_model import TuckerMeanFieldGuide

    if index is None or values is None:
        raise ValueError("fitting a PyroFunctionalTucker needs index (N, K) and values (N,)")
    N = index.shape[0]
    B = N if batch_size is None else min(int(batch_size), N)
    guide = guide if guide is not None else TuckerMeanFieldGuide(model)
    elbo = elbo if elbo is not None else pyro.infer.Trace_ELBO()
    guide(index[:1], values[:1], None, N)  # create the guide's parameters before the optimiser
    params = list(model.parameters()) + list(guide.parameters())
    dp = DataParallel(params, distributed)
    if dp.enabled and B < dp.size:
        raise ValueError(f"batch_size ({B}) must be at least the number of ranks ({dp.size})")
    opt = torch.optim.Adam(params, lr=lr)
    batches = shuffled_minibatches(N, B, generator=torch.Generator().manual_seed(
        0 if seed is None else seed))
    t0 = time.perf_counter()
    with OptimiserSteps(opt, total=steps, num_data=N, desc="PyroFunctionalTucker",
                        progress=(True if progress is None else progress) and dp.is_main,
                        callback=callback, parallel=dp if dp.enabled else None) as track:
        try:
            for _ in range(steps):
                idx, w = dp.local(next(batches))
                loss = elbo.differentiable_loss(model.model, guide, index[idx], values[idx],
                                                None, N) * w
                if track(loss):
                    break
        except KeyboardInterrupt:
            pass
    return FitResult(losses=track.losses, steps=track.step, seconds=time.perf_counter() - t0,
                     details=guide)
