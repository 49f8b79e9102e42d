"""A small training helper for deep kernel machines: Adam on the (minibatch) ELBO, an
optional learning-rate schedule, a tqdm progress bar on stderr, early stopping on a
validation split, and the best ``state_dict`` restored at the end."""

from __future__ import annotations

import copy
import math
import time
from typing import Callable

import pyro
import torch
from torch import Tensor

from .._pyro import sync_param_store
from .._training import FitResult, OptimiserSteps, shuffled_minibatches

__all__ = ["fit", "fit_lbfgs", "FitResult", "validation_metric"]


@torch.no_grad()
def validation_metric(model, X: Tensor, y: Tensor) -> float:
    """Mean negative log predictive density of ``y`` (Gaussian: per point and channel
    summed over channels; categorical: cross-entropy of the averaged probabilities)."""
    pred = model.predict(X)
    if isinstance(pred, torch.distributions.Categorical):
        p = pred.probs
        return float(-p.gather(-1, y.long()[:, None]).clamp_min(1e-300).log().mean())
    yy = y.to(pred.mean.dtype).reshape(pred.batch_shape)
    lp = pred.log_prob(yy)
    return float(-(lp.sum(-1) if lp.dim() == 2 else lp).mean())


def _closed_form_ok(model, elbo_name) -> bool:
    """True when ``-TraceMeanField_ELBO`` of ``model`` is its closed-form objective."""
    if elbo_name != "meanfield":
        return False
    if getattr(model, "likelihood_name", "gaussian") != "gaussian" or not getattr(
            model, "analytic_expectation", False):
        return False
    return not any(getattr(m, "_pyro_samples", None) for m in model.modules())


def _make_scheduler(opt, lr_schedule, total_steps):
    if lr_schedule is None:
        return None
    if lr_schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(total_steps, 1))
    if callable(lr_schedule):
        return lr_schedule(opt)
    raise ValueError(f"lr_schedule must be None, 'cosine' or a callable(optimizer) -> "
                     f"scheduler, got {lr_schedule!r}")


def fit(
    model,
    X: Tensor,
    y: Tensor,
    *,
    num_steps: int | None = None,
    epochs: int | None = None,
    batch_size: int | None = None,
    lr: float = 1e-2,
    lr_schedule=None,
    X_val: Tensor | None = None,
    y_val: Tensor | None = None,
    val_fraction: float = 0.0,
    eval_every: int = 50,
    patience: int | None = None,
    elbo: str | pyro.infer.ELBO = "meanfield",
    init_q: bool = True,
    progress: bool = True,
    seed: int | None = None,
    callback: Callable | None = None,
    closed_form_loss: bool = True,
    batch_seed: int | None = None,
    distributed: bool | None = None,
    standardise: bool | None = None,
) -> FitResult:
    """Train a :class:`~pyro_dkm.dkm.DeepKernelMachine` (or an
    :class:`~pyro_dkm.dkm.ExactDeepKernelMachine`) in place.

    Args:
        model: the DKM.
        X, y: training data.
        num_steps / epochs: how long (give one; default 1000 steps). An epoch is
            ``ceil(N / batch_size)`` steps.
        batch_size: minibatch size (``None``: full batch). Minibatches are disjoint
            shuffled slices of the data, passed to ``model.model(..., num_data=N)``.
        lr: Adam learning rate.
        lr_schedule: ``None``, ``"cosine"`` or ``callable(optimizer) -> scheduler``
            (stepped once per step).
        X_val, y_val: validation data; or ``val_fraction`` of ``X`` held out at random.
        eval_every: steps between validation evaluations.
        patience: stop after this many evaluations without improvement (needs
            validation data); the best parameters are restored.
        elbo: ``"meanfield"`` (``TraceMeanField_ELBO``, exact for a Gaussian likelihood),
            ``"trace"`` or an ``ELBO`` instance.
        init_q: first set ``q(u)`` to its closed-form optimum (Gaussian likelihood).
        progress: tqdm progress bar on stderr.
        seed: ``pyro.set_rng_seed`` before training.
        callback: ``callback(step, loss)`` after every step; return True to stop.
        closed_form_loss: with ``elbo="meanfield"``, a Gaussian likelihood, the analytic
            expectation and no ``PyroSample`` priors, ``-TraceMeanField_ELBO`` of the model
            equals the closed-form minibatch objective
            (``-model.objective(X_b, y_b, num_data=N)``, tested to 1e-9); compute that
            directly instead of tracing ``model``/``guide`` (same values and gradients,
            about a quarter less time per step). ``False`` always goes through Pyro.
        batch_seed: draw the minibatches from a private generator with this seed (default:
            torch's global generator); data-parallel fits default it to ``seed`` (or 0).
        distributed: ``None`` (default): data-parallel when a ``torch.distributed`` process
            group of more than one rank is initialised (:mod:`pyro_dkm.distributed`: each
            rank its part of every global minibatch, gradients summed); ``False``: never.
        standardise: model the targets standardised by the training ``y``'s mean and
            standard deviation (:meth:`~pyro_dkm.dkm.DeepKernelMachine.set_target_scaling`;
            predictions come back in ``y``'s units), which makes the fit equivariant to
            ``y``'s units and offset. ``None`` (default): for a Gaussian or Student-t
            likelihood; ``False``: leave the model's scaling as it is. An
            ``ExactDeepKernelMachine`` standardises in its constructor.
    """
    from ..distributed import DataParallel
    from .exact import ExactDeepKernelMachine

    if seed is not None:
        pyro.set_rng_seed(seed)
    exact = isinstance(model, ExactDeepKernelMachine)
    if exact:
        for arg, given, own in (("X", X, model.X_train), ("y", y, model.y_train)):
            if given is None:
                continue
            g = given if not (arg == "y" and given.dim() == 1) else given[:, None]
            if not isinstance(g, Tensor) or g.shape != own.shape or not torch.equal(
                    g.to(own.dtype), own):
                shape = tuple(g.shape) if isinstance(g, Tensor) else type(g).__name__
                raise ValueError(
                    f"an ExactDeepKernelMachine trains on the data it was built with: {arg} "
                    f"must be its training {arg} (shape {tuple(own.shape)}) or None, got a "
                    f"different one ({shape}); build a new model for new data")
        X = model.X_train if X is None else X
        y = model.y_train if y is None else y
        if batch_size is not None:
            raise ValueError("an ExactDeepKernelMachine trains on the full data: batch_size must "
                             "be None")
        if standardise is not None:
            raise ValueError("an ExactDeepKernelMachine standardises its targets in its "
                             "constructor (standardise=...): leave fit's standardise unset")
    else:
        X = model._check_X(X)
        model._check_y(y, X.shape[0])
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if val_fraction > 0:
        if X_val is not None:
            raise ValueError("give X_val/y_val or val_fraction, not both")
        if exact:
            raise ValueError("val_fraction is not supported for an ExactDeepKernelMachine "
                             "(its training set is fixed); pass X_val/y_val")
        perm = torch.randperm(X.shape[0])
        n_val = max(1, int(round(val_fraction * X.shape[0])))
        X_val, y_val = X[perm[:n_val]], y[perm[:n_val]]
        X, y = X[perm[n_val:]], y[perm[n_val:]]
    if (X_val is None) != (y_val is None):
        raise ValueError("give both X_val and y_val")
    if not exact and (standardise or (standardise is None and model.location_scale)):
        model.set_target_scaling(y)  # statistics of the training part only
    if patience is not None and X_val is None:
        raise ValueError("patience (early stopping) needs validation data: X_val/y_val or "
                         "val_fraction")
    N = X.shape[0]
    B = N if batch_size is None else int(batch_size)
    if B < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    B = min(B, N)
    steps_per_epoch = math.ceil(N / B)
    if num_steps is not None and epochs is not None:
        raise ValueError("give num_steps or epochs, not both")
    for arg, value in (("num_steps", num_steps), ("epochs", epochs)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < 1):
            raise ValueError(f"{arg} must be a positive int, got {value!r}")
    total = num_steps if num_steps is not None else (
        epochs * steps_per_epoch if epochs is not None else 1000)
    elbo_name = elbo if isinstance(elbo, str) else None
    if isinstance(elbo, str):
        if elbo not in ("meanfield", "trace"):
            raise ValueError(f"elbo must be 'meanfield', 'trace' or an ELBO, got {elbo!r}")
        elbo = pyro.infer.TraceMeanField_ELBO() if elbo == "meanfield" else pyro.infer.Trace_ELBO()
    if init_q and not exact and model.likelihood_name == "gaussian":
        model.init_q(X, y)
    closed_form = not exact and closed_form_loss and _closed_form_ok(model, elbo_name)
    if closed_form:
        sync_param_store(model)
        y_checked = model._check_y(y, N)

    result = FitResult()
    dp = DataParallel(model.parameters(), distributed)
    if dp.enabled:
        if exact:
            raise ValueError("an ExactDeepKernelMachine has no minibatches to share: fit it "
                             "in one process (distributed=False)")
        if B < dp.size:
            raise ValueError(f"batch_size ({B}) must be at least the number of ranks "
                             f"({dp.size})")
        if batch_seed is None:
            batch_seed = 0 if seed is None else seed
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    best, best_state, bad = math.inf, None, 0
    gen = None if batch_seed is None else torch.Generator().manual_seed(int(batch_seed))
    batches = shuffled_minibatches(N, B, generator=gen)
    t0 = time.perf_counter()
    with OptimiserSteps(opt, total=total, num_data=N, desc=type(model).__name__,
                        progress=progress and dp.is_main,
                        scheduler=_make_scheduler(opt, lr_schedule, total),
                        callback=callback, parallel=dp if dp.enabled else None) as steps:
        try:
            while steps.step < total:
                if exact:
                    loss = -model.objective()
                elif closed_form:
                    idx, w = dp.local(next(batches))  # this rank's part and its weight
                    loss = -model._objective(X[idx], y_checked[idx], N) * w
                else:
                    idx, w = dp.local(next(batches))
                    loss = elbo.differentiable_loss(model.model, model.guide, X[idx], y[idx],
                                                    num_data=N) * w
                if steps(loss):
                    break
                step = steps.step
                if X_val is not None and (step % eval_every == 0 or step == total):
                    metric = dp.broadcast_value(
                        validation_metric(model, X_val, y_val) if dp.is_main else 0.0)
                    result.val.append((step, metric))
                    if metric < best:
                        best, bad, result.best_step = metric, 0, step
                        best_state = copy.deepcopy(model.state_dict())
                    else:
                        bad += 1
                        if patience is not None and bad >= patience:
                            result.stopped_early = True
                            break
        except KeyboardInterrupt:  # keep what was learnt; the best state is restored below
            result.interrupted = True
    result.losses = steps.losses
    result.seconds = time.perf_counter() - t0
    result.steps = steps.step
    result.seconds_per_epoch = result.seconds / max(result.steps, 1) * steps_per_epoch
    if best_state is not None:
        model.load_state_dict(best_state)
    return result


def fit_lbfgs(model, X: Tensor | None = None, y: Tensor | None = None, *,
              rounds: int = 5, max_iter: int = 200, grams_only: bool = False,
              tolerance_grad: float = 1e-10) -> float:
    """Maximise a deterministic full-batch objective with L-BFGS (strong Wolfe line
    search): ``model.objective()`` of an :class:`~pyro_dkm.dkm.ExactDeepKernelMachine`,
    or ``model.objective(X, y)`` of a Gaussian sparse DKM. Use it to reach the DKM
    optimum precisely (e.g. to compare with sampled finite-width Grams).

    Args:
        grams_only: optimise only the learned Grams (hyper-parameters fixed).

    Returns:
        the final objective value.
    """
    from .exact import ExactDeepKernelMachine

    exact = isinstance(model, ExactDeepKernelMachine)
    if not exact and (X is None or y is None):
        raise ValueError("fit_lbfgs of a sparse DKM needs X and y")
    params = [p for n, p in model.named_parameters()
              if p.requires_grad and ("gram" in n or not grams_only)]
    opt = torch.optim.LBFGS(params, lr=1, max_iter=max_iter, tolerance_grad=tolerance_grad,
                            tolerance_change=1e-14, history_size=50,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = -(model.objective() if exact else model.objective(X, y))
        loss.backward()
        return loss

    for _ in range(rounds):
        opt.step(closure)
    with torch.no_grad():
        return float(model.objective() if exact else model.objective(X, y))
