"""Bookkeeping shared by the package's stochastic trainers (:func:`pyro_dkm.dkm.fit`,
:func:`pyro_dkm.processes.fit_classifier`): shuffled disjoint minibatches, and one
optimiser step with the loss-per-point history, a finite-loss check, a tqdm progress bar
on stderr and a stop callback."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor


@dataclass
class FitResult:
    """What a fit did, for every model of the package (:func:`pyro_dkm.fit`).

    ``losses``: the training loss per data point, one per optimiser step (or per EM /
    CEP sweep); ``val``: ``(step, validation metric)`` pairs (mean negative log
    predictive density, lower is better); ``best_step``: the step whose parameters were
    kept; ``interrupted``: stopped by ``KeyboardInterrupt`` (the result so far is returned,
    best-validation parameters restored); ``details``: the model-specific record (e.g. a
    ``RobustFit``), if any."""

    losses: list = field(default_factory=list)
    val: list = field(default_factory=list)
    best_step: int | None = None
    stopped_early: bool = False
    seconds: float = 0.0
    steps: int = 0
    seconds_per_epoch: float = float("nan")
    interrupted: bool = False
    details: Any = None


def power_of_ten_scale(y, *, ordinary: tuple[float, float] | None = None) -> float:
    """The power of ten nearest to ``y``'s standard deviation: the unit in which the fits
    work and unset starting values are given, so that a model of ``c * y`` fits as the
    model of ``y`` rescaled. 1 for standardised targets, when it cannot be computed (fewer
    than two values, not floating point, zero or non-finite spread), and, with
    ``ordinary=(lo, hi)``, for spreads inside that range (left as they are)."""
    if not (isinstance(y, Tensor) and y.is_floating_point() and y.numel() > 1):
        return 1.0
    std = float(y.detach().std())
    if not (std > 0 and math.isfinite(std)):
        return 1.0
    if ordinary is not None and ordinary[0] <= std <= ordinary[1]:
        return 1.0
    return 10.0 ** round(math.log10(std))


def shuffled_minibatches(n: int, batch_size: int, *, generator: torch.Generator | None = None,
                         device=None) -> Iterator[Tensor]:
    """Endless minibatch indices: each epoch draws a fresh permutation of ``range(n)`` (from
    ``generator``, default torch's global one) and cuts it into ``ceil(n / batch_size)``
    disjoint slices (the last one shorter when ``batch_size`` does not divide ``n``)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    per_epoch = math.ceil(n / batch_size)
    while True:
        perm = torch.randperm(n, generator=generator, device=device)
        for k in range(per_epoch):
            yield perm[k * batch_size:(k + 1) * batch_size]


class OptimiserSteps:
    """Take optimiser steps on given losses and keep the books.

    ``steps(loss)`` zeroes the gradients, back-propagates ``loss``, steps the optimiser
    (and ``scheduler``), records ``loss / num_data`` in :attr:`losses`, raises
    ``FloatingPointError`` if it is not finite, advances the progress bar, and returns
    True when ``callback(step, loss_per_point)`` asks to stop. Use it as a context
    manager so the progress bar is closed however the loop ends.
    """

    def __init__(self, optimiser: torch.optim.Optimizer, *, total: int, num_data: int,
                 desc: str, progress: bool = True, scheduler=None,
                 callback: Callable[[int, float], bool] | None = None,
                 postfix_every: int = 10, parallel=None):
        self.optimiser, self.scheduler, self.callback = optimiser, scheduler, callback
        # a pyro_dkm.distributed.DataParallel: gradients summed over the ranks before the
        # step, the recorded loss the global one
        self.parallel = parallel
        self.num_data, self.postfix_every = num_data, postfix_every
        self.losses: list[float] = []
        self.bar = None
        if progress:
            from tqdm.auto import tqdm  # noqa: PLC0415

            self.bar = tqdm(total=total, file=sys.stderr, desc=desc, leave=False)

    @property
    def step(self) -> int:
        """Steps taken so far."""
        return len(self.losses)

    def __call__(self, loss: Tensor) -> bool:
        self.optimiser.zero_grad()
        loss.backward()
        value = float(loss.detach())
        if self.parallel is not None:  # gradients and loss summed over the ranks
            value = self.parallel.reduce_gradients(value)
        self.optimiser.step()
        if self.scheduler is not None:
            self.scheduler.step()
        value = value / self.num_data
        if not math.isfinite(value):
            last = f"{self.losses[-1]:.6g} per point" if self.losses else "none yet"
            raise FloatingPointError(f"the training loss became {value} at step "
                                     f"{self.step + 1} (last finite loss: {last}); lower the "
                                     f"learning rate or check the data")
        self.losses.append(value)
        if self.bar is not None:
            self.bar.update(1)
            if self.step % self.postfix_every == 0:
                self.bar.set_postfix(loss=f"{value:.4f}")
        return bool(self.callback is not None and self.callback(self.step, value))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "OptimiserSteps":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def target_statistics(Y: Tensor) -> tuple[Tensor, Tensor]:
    """Per-column mean and standard deviation (``ddof=0``) of targets ``Y`` ``(N, C)``
    for standardisation; a zero or undefined deviation gives 1, and targets already
    standardised (to 1e-12) give exactly ``(0, 1)``, so they pass through unrounded."""
    Y = Y.to(torch.float64)
    loc = Y.mean(0)
    scale = Y.std(0, correction=0) if Y.shape[0] > 1 else torch.ones_like(loc)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    if bool((loc.abs() < 1e-12).all() and ((scale - 1).abs() < 1e-12).all()):
        return torch.zeros_like(loc), torch.ones_like(scale)
    return loc, scale
