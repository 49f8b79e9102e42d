"""Fit loops: non-finite losses name the step, interrupts keep the result, bad steps refused."""

import pytest
import torch

from pyro_dkm import DeepKernelMachine, GaussianProcessRegression
from pyro_dkm.dkm import fit as dkm_fit
from pyro_dkm.processes import fit as exact_fit

F64 = torch.float64


def _data(n=30):
    g = torch.Generator().manual_seed(0)
    X = torch.randn(n, 2, generator=g, dtype=F64)
    return X, torch.sin(X[:, 0]) + 0.1 * torch.randn(n, generator=g, dtype=F64)


def test_keyboard_interrupt_returns_the_result_so_far_with_the_best_state():
    X, y = _data()
    m = DeepKernelMachine(X[:6], depth=1)

    def interrupt(step, loss):
        if step == 30:
            raise KeyboardInterrupt
        return False

    res = dkm_fit(m, X, y, num_steps=100, progress=False, callback=interrupt, X_val=X[:10],
                  y_val=y[:10], eval_every=10)
    assert res.interrupted and res.steps == 30 and len(res.losses) == 30
    assert res.best_step in (10, 20, 30)


def test_non_finite_loss_names_the_step_and_the_last_finite_loss():
    X, y = _data()
    m = DeepKernelMachine(X[:6], depth=1)

    def poison(step, loss):  # a NaN in a parameter after 3 steps
        if step == 3:
            with torch.no_grad():
                m.output.u_loc_unconstrained[0, 0] = float("nan")
        return False

    with pytest.raises(FloatingPointError, match=r"at step 4 \(last finite loss: [0-9.e-]+ per"):
        dkm_fit(m, X, y, num_steps=10, progress=False, callback=poison, init_q=False)
    gp = GaussianProcessRegression(*_data())
    with torch.no_grad():
        gp.y[0] = float("nan")
    with pytest.raises(FloatingPointError, match="at evaluation 1"):
        exact_fit(gp, steps=3)


def test_invalid_step_counts_are_rejected():
    X, y = _data()
    m = DeepKernelMachine(X[:6], depth=1)
    for bad in (-5, 0, 2.5, True):
        with pytest.raises(ValueError, match="num_steps must be a positive int"):
            dkm_fit(m, X, y, num_steps=bad, progress=False)
        with pytest.raises(ValueError, match="steps must be a positive int"):
            exact_fit(GaussianProcessRegression(X, y), steps=bad)
