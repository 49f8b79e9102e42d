"""Sparse deep kernel machines on a UCI split: representation learning vs the NNGP.

Trains sparse DKMs (two learned Gram layers, ReLU Gram kernels) with nu in {0.1, 1}
by Adam on the closed-form sparse objective and prints test RMSE and log-likelihood in
original units, next to the nu -> infinity limit: the same model with whitened Grams
G = L_K V V^T L_K^T frozen at V = I, i.e. G = K at every layer (the depth-2 ReLU NNGP;
a sparse variational GP with learned inducing inputs and noise). ``--float32-check`` also
runs 2000 float32 steps with nu = 1e-3 and asserts no NaN and non-negative propagated
diagonals; ``--plot PATH`` draws the training curves.

    python examples/dkm_regression.py                           # bundled concrete
    python examples/dkm_regression.py --data-dir ../shared/data/uci --dataset yacht
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from pyro_dkm.datasets import load_uci
from pyro_dkm.dkm import DeepKernelMachine, fit, select_inducing_points


def with_bias(X):
    """G_0 = X X^T / d has no bias: append a constant feature."""
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype)], 1)


def evaluate(model, data):
    pred = model.predict(with_bias(data.X_test))
    mean = pred.loc * data.y_std + data.y_mean
    var = pred.variance * data.y_std**2
    y = data.y_test_original
    rmse = (mean - y).pow(2).mean().sqrt().item()
    ll = (-0.5 * (math.log(2 * math.pi) + var.log() + (y - mean) ** 2 / var)).mean().item()
    return rmse, ll


def float32_check(data, steps=2000, num_inducing=32, batch_size=128):
    """2000 Adam steps in float32 with nu = 1e-3: assert finite losses, positive learned
    Cholesky diagonals and non-negative propagated diagonals at every step."""
    X = with_bias(data.X_train).float()
    y = data.y_train.float()
    model = DeepKernelMachine(select_inducing_points(X, num_inducing), depth=2, nu=1e-3,
                              dtype=torch.float32)
    state = {"min_diag": math.inf}

    def check(step, loss):
        if not math.isfinite(loss):
            raise AssertionError(f"float32 check: loss {loss} at step {step}")
        if step % 20 == 0 or step == steps:
            with torch.no_grad():
                G = model.input_layer(X)
                for kern, layer in zip(model.kernel_layers, model.gram_layers):
                    G, kl = layer(kern(G))
                    ok = (torch.isfinite(kl) and torch.isfinite(G.t_diag).all()
                          and bool((G.t_diag >= 0).all())
                          and bool((layer.gram_tril.diagonal() > 0).all()))
                    if not ok:
                        raise AssertionError(f"float32 check failed at step {step}")
                    state["min_diag"] = min(state["min_diag"], float(G.t_diag.min()))
        return False

    t0 = time.perf_counter()
    res = fit(model, X, y, num_steps=steps, batch_size=batch_size, lr=1e-2, seed=0,
              callback=check, init_q=False, progress=True)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    return res, state["min_diag"], time.perf_counter() - t0


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None, help="folder of UCI dataset folders "
                   "(default: the data bundled with the package)")
    p.add_argument("--dataset", default="concrete")
    p.add_argument("--split", type=int, default=0)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--num-inducing", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=None, help="default: full batch")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--float32-check", action="store_true")
    p.add_argument("--plot", default=None, help="write training curves (PNG) here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    data = load_uci(args.dataset, args.split, data_dir=args.data_dir)
    X, y = with_bias(data.X_train), data.y_train
    Z = select_inducing_points(X, min(args.num_inducing, X.shape[0]), seed=0)
    print(f"{args.dataset} split {args.split}: {len(y)} train / {len(data.y_test)} test, "
          f"{Z.shape[0]} inducing points, {args.steps} Adam steps\n")
    print("| model | test RMSE | test log-lik | fit s |")
    print("|---|---|---|---|")
    curves = {}
    for nu, name in ((math.inf, "sparse NNGP (nu = inf)"), (1.0, "DKM nu=1"),
                     (0.1, "DKM nu=0.1")):
        # nu = inf: every Gram held at its prior, G_l = K(G_{l-1}) exactly
        model = DeepKernelMachine(Z, depth=2, nu=nu)
        res = fit(model, X, y, num_steps=args.steps, batch_size=args.batch_size, lr=1e-2,
                  seed=0, progress=True)
        rmse, ll = evaluate(model, data)
        curves[name] = res.losses
        print(f"| {name} | {rmse:.3f} | {ll:.3f} | {res.seconds:.1f} |")
    if args.float32_check:
        res, min_diag, secs = float32_check(data)
        print(f"\nfloat32 check (nu=1e-3, {res.steps} steps, {secs:.1f} s): OK, final loss "
              f"{res.losses[-1]:.4f}, min propagated diagonal {min_diag:.3g}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        for name, losses in curves.items():
            line, = ax.plot(losses, lw=0.6, alpha=0.4)
            w = 15  # a moving average shows the trend under the minibatch noise
            smooth = np.convolve(losses, np.ones(w) / w, mode="valid")
            ax.plot(np.arange(w - 1, len(losses)), smooth, color=line.get_color(), label=name)
        ax.set_xlabel("step")
        ax.set_ylabel("negative objective per point (standardised y)")
        ax.set_title("concrete: training curves (faint: per step; solid: 15-step mean)")
        ax.legend()
        ax.grid(alpha=0.3)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"\nwrote {args.plot}")


if __name__ == "__main__":
    main()
