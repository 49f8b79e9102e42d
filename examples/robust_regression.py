"""Robust regression with Student-t noise on the bundled UCI concrete data.

Adds Cauchy noise (scale 0.1 std(y)) to the training targets, as the ``cauchy`` variant of
``benchmarks/scale_mixtures.py`` does, keeps the test targets clean, and compares an exact
NNGP-GP (Gaussian noise; kernel variances, amplitude and noise by type-II ML with L-BFGS)
with ``RobustRegression`` (the same NNGP kernel at its defaults, Student-t noise: amplitude,
noise and dof by variational EM, ``pyro_dkm.processes.robust``). Prints test RMSE and NLL
in original units (MPa), the fitted noise and dof, and how many training points the robust
model down-weights (``E[1/lam_i] < 0.5``). Also on the clean data, where the robust model
should do no harm.

    python examples/robust_regression.py        # < 1 minute on one core
"""

from __future__ import annotations

import argparse
import math
import time

import torch

from pyro_dkm.datasets import load_uci
from pyro_dkm.processes import GaussianProcessRegression, RobustRegression, fit


def evaluate(pred, point, data):
    rmse = float((point * data.y_std + data.y_mean - data.y_test_original).pow(2).mean().sqrt())
    nll = float(-pred.log_prob(data.y_test).mean()) + math.log(data.y_std)
    return rmse, nll


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--cauchy-scale", type=float, default=0.1)
    p.add_argument("--steps", type=int, default=10, help="L-BFGS iterations for the GP")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    g = torch.Generator().manual_seed(0)

    data = load_uci("concrete", args.split)  # bundled, standardised with train mean/std
    X, y_clean = data.X_train, data.y_train
    cauchy = torch.distributions.Cauchy(0.0, 1.0).icdf(
        torch.rand(len(y_clean), generator=g, dtype=torch.float64).clamp(1e-12, 1 - 1e-12))
    y_noisy = y_clean + args.cauchy_scale * cauchy
    print(f"UCI concrete, split {args.split}: {len(y_clean)} train / {len(data.y_test)} test; "
          f"training targets + Cauchy noise of scale {args.cauchy_scale} std(y) (test clean)")
    print(f"{'targets':8s} {'model':14s} {'test RMSE':>9s} {'test NLL':>8s} {'noise':>8s} "
          f"{'dof':>8s} {'flagged':>7s} {'fit s':>6s}")
    for label, y in (("clean", y_clean), ("cauchy", y_noisy)):
        gp = GaussianProcessRegression(X, y)
        t0 = time.perf_counter()
        fit(gp, steps=args.steps, optimizer="lbfgs")
        secs = time.perf_counter() - t0
        with torch.no_grad():
            pred = gp.predict(data.X_test)
            rmse, nll = evaluate(pred, pred.mean, data)
        print(f"{label:8s} {'GP':14s} {rmse:9.3f} {nll:8.3f} {float(gp.noise.detach()):8.4f} "
              f"{'inf':>8s} {'-':>7s} {secs:6.1f}")

        rr = RobustRegression(X, y)
        t0 = time.perf_counter()
        st = rr.fit(tol=1e-6)
        secs = time.perf_counter() - t0
        with torch.no_grad():
            pred = rr.predict(data.X_test)
            rmse, nll = evaluate(pred, pred.loc, data)
        flagged = int((st.noise_weights < 0.5).sum())
        print(f"{label:8s} {'GP + t-noise':14s} {rmse:9.3f} {nll:8.3f} {st.params['noise']:8.4f} "
              f"{st.params['df']:8.3g} {flagged:7d} {secs:6.1f}")
        print(f"{'':8s} variational EM: {len(st.history)} sweeps, lower bound / n = "
              f"{st.elbo / len(y):.4f}, converged = {st.converged}")


if __name__ == "__main__":
    main()
