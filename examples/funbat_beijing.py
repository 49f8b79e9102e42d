"""Fit FunBaT to Beijing PM2.5 (temperature x pressure x time) and plot the latent functions.

python examples/funbat_beijing.py [--data-dir DIR] [--rank 3] [--max-iter 30] [--plot PATH]
Prints test RMSE / MAE on fold 0; with --plot, draws each mode's learned factors with +-2 sd bands.
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
    p.add_argument("--max-iter", type=int, default=30)
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
    m = FunctionalTucker([a.rank] * 3, nu=1.5, lengthscale=[0.3, 0.3, 0.03], max_iter=a.max_iter)
    t = time.perf_counter()
    m.fit(d["train_coord"], d["train_value"])
    fit_s = time.perf_counter() - t
    mu, var = m.predict(d["test_coord"])
    y = torch.as_tensor(d["test_value"])
    print(
        f"fit {fit_s:.1f}s ({m.n_iter} sweeps)  test RMSE {((mu - y) ** 2).mean().sqrt():.4f}  "
        f"MAE {(mu - y).abs().mean():.4f}  noise sd {m.noise_variance**0.5:.3f}"
    )
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
                ax.plot(x, mean[:, r], lw=1)
                ax.fill_between(
                    x, mean[:, r] - 2 * v[:, r].sqrt(), mean[:, r] + 2 * v[:, r].sqrt(), alpha=0.2
                )
            ax.set_title(f"mode {k}: {names[k]}")
            ax.set_xlabel("scaled coordinate")
        fig.tight_layout()
        fig.savefig(a.plot, dpi=120)
        print(f"wrote {a.plot}")


if __name__ == "__main__":
    main()
