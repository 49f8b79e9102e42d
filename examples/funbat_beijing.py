"""Fit FunBaT to Beijing PM2.5 (temperature x pressure x time) and plot the latent functions.

python examples/funbat_beijing.py [--data-dir DIR] [--rank 3] [--max-iter 200] [--plot PATH]
Prints test RMSE / MAE on fold 0 beside the per-day mean of the training entries; the Matern
lengthscales and variances are learned by the evidence inside the CEP loop; with --plot,
draws each mode's learned factors with +-2 sd bands.
"""

import argparse
import os
import time
from pathlib import Path

import torch

from pyro_dkm.datasets import load_tensor_fold
from pyro_dkm.tucker import FunctionalTucker


def main():
    p = argparse.ArgumentParser(description=__doc__)
    env = os.environ.get("PYRO_DKM_DATA")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data",
    )
    p.add_argument("--rank", type=int, default=3)
    p.add_argument("--max-iter", type=int, default=200)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args()
    path = a.data_dir / "tensor" / "beijing_pm25.npz"
    if not path.is_file():
        raise SystemExit(
            f"this example needs the Beijing PM2.5 tensor data ({path} not found); it is not "
            f"bundled with the package. Pass --data-dir DIR (a folder holding "
            f"tensor/beijing_pm25.npz, the format described in docs/tucker.md) or set "
            f"PYRO_DKM_DATA. examples/funbat_poisson.py runs on generated data instead.")
    d = load_tensor_fold(path, 0)
    m = FunctionalTucker([a.rank] * 3, nu=1.5, lengthscale=[0.3, 0.3, 0.03], max_iter=a.max_iter,
                         damping=0.9, learn_hyperparameters=True, hyper_every=40,
                         hyper_rounds=3, rank_lengthscales=True)
    t = time.perf_counter()
    m.fit(d["train_coord"], d["train_value"])
    fit_s = time.perf_counter() - t
    mu, var = m.predict(d["test_coord"])
    y = torch.as_tensor(d["test_value"])
    stop = ("converged" if m.converged else
            f"stopped at the sweep cap, last relative change {m.history[-1]['delta']:.1e}")
    print(
        f"fit {fit_s:.1f}s ({m.n_iter} sweeps, {stop})  test RMSE "
        f"{((mu - y) ** 2).mean().sqrt():.4f}  MAE {(mu - y).abs().mean():.4f}  noise sd "
        f"{m.noise_variance**0.5:.3f}"
    )
    day = torch.as_tensor(d["train_index"][:, 2])
    yt = torch.as_tensor(d["train_value"])
    n = int(d["shape"][2])
    s_, c_ = torch.zeros(n, dtype=yt.dtype), torch.zeros(n, dtype=yt.dtype)
    s_.index_add_(0, day, yt)
    c_.index_add_(0, day, torch.ones_like(yt))
    per_day = torch.where(c_ > 0, s_ / c_.clamp_min(1), yt.mean())[d["test_index"][:, 2]]
    print(f"per-day mean of the training entries: test RMSE "
          f"{((per_day - y) ** 2).mean().sqrt():.4f}; learned lengthscales "
          f"{', '.join(f'{v:.3g}' for v in m.lengthscale)} (geometric mean over the rank)")
    if a.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        names = ["temperature", "pressure", "time (day)"]
        fig, axes = plt.subplots(1, 3, figsize=(12, 3))
        for k, ax in enumerate(axes):
            u = m.unique_coords[k]
            x = torch.linspace(float(u.min()), float(u.max()), 600, dtype=torch.float64)
            mean, v = m.factor_posterior(k, x)
            for r in range(mean.shape[1]):
                ax.plot(x, mean[:, r], lw=1, label=f"factor {r + 1}")
                ax.fill_between(
                    x, mean[:, r] - 2 * v[:, r].sqrt(), mean[:, r] + 2 * v[:, r].sqrt(), alpha=0.2
                )
            ax.set_title(f"mode {k}: {names[k]}")
            ax.set_xlabel("coordinate (scaled to [0, 10])")
            ax.set_ylabel("latent function (mean, +-2 sd band)")
            ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
