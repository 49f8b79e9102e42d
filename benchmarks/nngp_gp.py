"""Exact GP regression on the UCI splits: NNGP kernels (ours) vs an ARD RBF kernel.

For each dataset folder under ``<data-dir>/uci`` and each split: standardise with
training statistics, fit each kernel's hyper-parameters (and the noise) by Adam on
GPyTorch's exact marginal likelihood, report test RMSE and test log-likelihood per
point in original units (mean +- standard error over splits) and fit seconds.

    python benchmarks/nngp_gp.py --splits 5
    python benchmarks/nngp_gp.py --quick            # smoke run, < 1 minute
"""

from __future__ import annotations

import os

os.environ.setdefault("PYKEOPS_VERBOSE", "0")  # gpytorch imports pykeops when present
os.environ.setdefault("KEOPS_VERBOSE", "0")

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import gpytorch  # noqa: E402
import torch  # noqa: E402

from pyro_dkm.datasets import (  # noqa: E402
    default_data_dir,
    list_uci_datasets,
    load_uci,
    uci_n_splits,
)
from pyro_dkm.gpytorch import NNGPKernel  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **kw):
        return x


def kernels(d: int) -> dict:
    return {
        "NNGP relu L=2": lambda: NNGPKernel(depth=2, activation="relu"),
        "NNGP erf L=2": lambda: NNGPKernel(depth=2, activation="erf"),
        "RBF ARD": lambda: gpytorch.kernels.ScaleKernel(gpytorch.kernels.RBFKernel(ard_num_dims=d)),
    }


class _GP(gpytorch.models.ExactGP):
    def __init__(self, X, y, kernel):
        super().__init__(X, y, gpytorch.likelihoods.GaussianLikelihood())
        self.mean_module = gpytorch.means.ConstantMean()
        self.covar_module = kernel

    def forward(self, x):
        return gpytorch.distributions.MultivariateNormal(self.mean_module(x),
                                                         self.covar_module(x))


def fit_eval(split, kernel, steps: int, lr: float, max_train: int | None, dtype, device):
    X, y = split.X_train.to(device, dtype), split.y_train.to(device, dtype)
    if max_train is not None and len(y) > max_train:
        idx = torch.randperm(len(y))[:max_train]
        X, y = X[idx], y[idx]
    model = _GP(X, y, kernel).to(device, dtype)
    mll = gpytorch.mlls.ExactMarginalLogLikelihood(model.likelihood, model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    t0 = time.perf_counter()
    with gpytorch.settings.max_cholesky_size(20_000):
        model.train()
        for _ in range(steps):
            opt.zero_grad()
            (-mll(model(X), y)).backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = model.likelihood(model(split.X_test.to(device, dtype)))
    secs = time.perf_counter() - t0
    mean = pred.mean.cpu().double() * split.y_std + split.y_mean
    var = pred.variance.cpu().double() * split.y_std**2
    yt = split.y_test_original
    rmse = (mean - yt).pow(2).mean().sqrt().item()
    ll = (-0.5 * (math.log(2 * math.pi) + var.log() + (yt - mean) ** 2 / var)).mean().item()
    return {"rmse": rmse, "test_ll": ll, "fit_s": secs}


def mean_se(values):
    t = torch.tensor(values, dtype=torch.float64)
    se = (t.std() / math.sqrt(len(t))).item() if len(t) > 1 else float("nan")
    return t.mean().item(), se


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", default=None,
                   help="data folder holding uci/ (default $PYRO_DKM_DATA or ../shared/data)")
    p.add_argument("--datasets", default=None, help="comma-separated subset")
    p.add_argument("--splits", type=int, default=5)
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--max-train", type=int, default=3000,
                   help="subsample larger training sets (exact GP is O(n^3))")
    p.add_argument("--quick", action="store_true", help="1 split, 2 small datasets, 20 steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = p.parse_args(argv)

    uci = Path(args.data_dir) if args.data_dir else default_data_dir()
    uci = uci / "uci" if (uci / "uci").is_dir() else uci
    names = list_uci_datasets(uci)
    if args.datasets:
        wanted = args.datasets.split(",")
        missing = sorted(set(wanted) - set(names))
        if missing:
            p.error(f"--datasets: not found under {uci}: {missing}")
        names = wanted
    if args.quick:
        names = [n for n in names if n in ("yacht", "concrete")][:2] or names[:1]
        args.splits, args.steps, args.max_train = 1, 20, 400
    dtype = getattr(torch, args.dtype)

    rows = []
    jobs = [(n, s) for n in names for s in range(min(args.splits, uci_n_splits(uci / n)))]
    results: dict = {}
    for name, s in tqdm(jobs, desc="splits", file=sys.stderr):
        split = load_uci(name, s, data_dir=uci, dtype=torch.float64)
        for model, make in kernels(split.X_train.shape[1]).items():
            torch.manual_seed(args.seed + s)
            r = fit_eval(split, make(), args.steps, args.lr, args.max_train, dtype, args.device)
            for metric, v in r.items():
                results.setdefault((name, model, metric), []).append(v)
    for (name, model, metric), vals in results.items():
        m, se = mean_se(vals)
        row = {"dataset": name, "model": model, "metric": metric, "mean": m, "se": se,
               "n": len(vals)}
        if metric == "fit_s":
            row["unit"] = "s"
        rows.append(row)

    print("| dataset | model | test log-lik | test RMSE | fit s |")
    print("|---|---|---|---|---|")
    get = {(r["dataset"], r["model"], r["metric"]): r for r in rows}
    wins = 0
    for name in names:
        for model in kernels(1):
            ll, rm, fs = (get[(name, model, m)] for m in ("test_ll", "rmse", "fit_s"))
            print(f"| {name} | {model} | {ll['mean']:.3f} +- {ll['se']:.3f} | "
                  f"{rm['mean']:.3f} +- {rm['se']:.3f} | {fs['mean']:.1f} |")
        best_nngp = max(get[(name, m, "test_ll")]["mean"] for m in kernels(1) if "NNGP" in m)
        wins += best_nngp >= get[(name, "RBF ARD", "test_ll")]["mean"]
    print(f"\nBest NNGP kernel matches or beats the ARD RBF in test log-likelihood on "
          f"{wins} of {len(names)} datasets ({args.splits} splits, {args.steps} steps).")
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(),
                "torch": torch.__version__, "threads": torch.get_num_threads(),
                "cpu_count": os.cpu_count()}
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
