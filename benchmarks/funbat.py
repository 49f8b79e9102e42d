# ruff: noqa: B023, E501
"""FunBaT (functional Tucker / CP with state-space GP factors) vs discrete baselines.

Usage: python benchmarks/funbat.py [--data-dir DIR] [--datasets a,b] [--folds 5]
       [--ranks 2,3,5,7] [--max-iter 40] [--quick] [--seed 0] [--json PATH] [--plot PATH]

Models per dataset and fold (same train/test split):
  funbat-tucker-R / funbat-cp-R : pyro_dkm.tucker.FunctionalTucker (CEP), continuous coordinates
  discrete-tucker-R / discrete-cp-R : per-index embeddings (indexes as categories) + core,
      least squares with L2 (full-batch Adam in torch)
  sgp : sparse GP regression (subset-of-regressors / DTC mean, RBF on coordinates, 500 inducing)
Plus a scaling run: FunBaT time per CEP sweep vs number of synthetic entries.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from pyro_dkm.datasets import list_tensor_datasets, load_tensor_fold
from pyro_dkm.tucker import FunctionalTucker

# kernel lengthscales per mode (coordinates scaled to [0, 10]); Beijing picked on a held-out
# 1/8 of fold-0 training data (grid {0.3, 1} x {0.01, 0.03, 0.1}); others: untuned default
LENGTHSCALES = {"beijing_pm25": [1.0, 1.0, 0.01], "us_temp": [1.0, 1.0, 0.3]}


def default_data_dir() -> Path:
    env = os.environ.get("PYRO_DKM_DATA")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared" / "data"


def discrete_fit_predict(d, ranks, core, seed, steps=400, wd=1e-3):
    torch.manual_seed(seed)
    idx = torch.as_tensor(d["train_index"])
    y = torch.as_tensor(d["train_value"])
    shape = [int(s) for s in d["shape"]]
    U = [
        torch.nn.Parameter(0.5 * torch.randn(n, r, dtype=torch.float64))
        for n, r in zip(shape, ranks)
    ]
    W = torch.nn.Parameter(
        torch.randn(*ranks, dtype=torch.float64)
        if core == "tucker"
        else torch.ones(ranks[0], dtype=torch.float64)
    )
    opt = torch.optim.Adam(U + [W], lr=0.05)

    def pred(ix):
        a, b, c = (U[k][ix[:, k]] for k in range(3))
        if core == "tucker":
            return torch.einsum("abc,na,nb,nc->n", W, a, b, c)
        return (a * b * c * W).sum(1)

    for _ in range(steps):
        opt.zero_grad()
        loss = ((pred(idx) - y) ** 2).mean() + wd * sum((u**2).sum() for u in U) / len(y) * 10
        loss.backward()
        opt.step()
    with torch.no_grad():
        return pred(torch.as_tensor(d["test_index"]))


def sgp_fit_predict(d, seed, m=500, ell=1.0, noise=0.1):
    g = torch.Generator().manual_seed(seed)
    X = torch.as_tensor(d["train_coord"])
    y = torch.as_tensor(d["train_value"])
    Z = X[torch.randperm(len(X), generator=g)[:m]]

    def k(a, b):
        return torch.exp(-0.5 * torch.cdist(a / ell, b / ell) ** 2)

    Kzz = k(Z, Z) + 1e-6 * torch.eye(m, dtype=X.dtype)
    Kxz = k(X, Z)
    A = noise * Kzz + Kxz.T @ Kxz
    w = torch.linalg.solve(A + 1e-8 * torch.eye(m, dtype=X.dtype), Kxz.T @ y)
    return k(torch.as_tensor(d["test_coord"]), Z) @ w


def scaling_run(sizes, seed, iters=5):
    rows = []
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        X = torch.rand(n, 3, generator=g, dtype=torch.float64) * 10
        X = (X * 100).round() / 100  # <= 1001 unique coordinates per mode: fixed Kalman cost
        y = torch.sin(X).sum(1) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        m = FunctionalTucker([3, 3, 3], lengthscale=1.0, max_iter=iters, tol=0.0, progress=False)
        t = time.perf_counter()
        m.fit(X, y)
        rows.append((n, (time.perf_counter() - t) / iters))
        print(f"scaling n={n}: {rows[-1][1]:.3f} s per sweep", file=sys.stderr, flush=True)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.add_argument("--datasets", default=None)
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--ranks", default="2,3,5,7")
    p.add_argument("--max-iter", type=int, default=40)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu"])
    p.add_argument("--dtype", default="float64", choices=["float64"])
    p.add_argument("--scaling", default="1e3,1e4,1e5,1e6")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--plot", type=Path, default=None)
    a = p.parse_args(argv)
    tdir = a.data_dir / "tensor"
    names = list_tensor_datasets(tdir) if a.datasets is None else a.datasets.split(",")
    ranks = [int(r) for r in a.ranks.split(",")]
    folds, max_iter, scaling = a.folds, a.max_iter, [int(float(s)) for s in a.scaling.split(",")]
    if a.quick:
        folds, ranks, max_iter, scaling = 1, [2], 3, [1000, 4000]
    results = {}
    from tqdm.auto import tqdm

    for name in names:
        ell = LENGTHSCALES.get(name, [1.0, 1.0, 1.0])
        for fold in tqdm(range(folds), desc=name, file=sys.stderr):
            d = load_tensor_fold(tdir / f"{name}.npz", fold)
            if a.quick:
                n = 2000
                for part in ("train", "test"):
                    for f in ("coord", "index", "value"):
                        d[f"{part}_{f}"] = d[f"{part}_{f}"][: n if part == "train" else n // 4]
            yt = torch.as_tensor(d["test_value"])
            # standardise the values with training statistics (zero-mean factors); report original units
            y_mu, y_sd = float(d["train_value"].mean()), float(d["train_value"].std())
            d["train_value"] = (d["train_value"] - y_mu) / y_sd
            fits = []
            for R in ranks:
                for core in ("tucker", "cp"):
                    fits.append(
                        (
                            f"funbat-{core}-{R}",
                            lambda R=R, core=core: (
                                FunctionalTucker(
                                    [R] * 3,
                                    nu=1.5,
                                    lengthscale=ell,
                                    core=core,
                                    max_iter=max_iter,
                                    tol=1e-4,
                                    progress=False,
                                    seed=a.seed + fold,
                                )
                                .fit(d["train_coord"], d["train_value"])
                                .predict(d["test_coord"])[0]
                            ),
                        )
                    )
                    fits.append(
                        (
                            f"discrete-{core}-{R}",
                            lambda R=R, core=core: discrete_fit_predict(
                                d, [R] * 3, core, a.seed + fold
                            ),
                        )
                    )
            fits.append(("sgp", lambda: sgp_fit_predict(d, a.seed + fold)))
            for model, fn in fits:
                t = time.perf_counter()
                mu = fn() * y_sd + y_mu
                dt = time.perf_counter() - t
                r = results.setdefault((name, model), {"rmse": [], "mae": [], "fit_time": []})
                r["rmse"].append(float(((mu - yt) ** 2).mean().sqrt()))
                r["mae"].append(float((mu - yt).abs().mean()))
                r["fit_time"].append(dt)
                print(
                    f"{name} fold {fold} {model}: rmse {r['rmse'][-1]:.4f} time {dt:.1f}s",
                    file=sys.stderr,
                    flush=True,
                )
    rows = []
    for (name, model), r in results.items():
        for metric, vals in r.items():
            v = np.array(vals)
            se = float(v.std(ddof=1) / math.sqrt(len(v))) if len(v) > 1 else float("nan")
            row = {
                "dataset": name,
                "model": model,
                "metric": metric,
                "mean": float(v.mean()),
                "se": se,
                "n": len(v),
            }
            if metric == "fit_time":
                row["unit"] = "s"
            rows.append(row)
    scal = [] if a.no_scaling else scaling_run(scaling, a.seed)
    for n, s in scal:
        rows.append(
            {
                "dataset": "synthetic",
                "model": "funbat-tucker-3",
                "metric": f"sweep_time_n{n}",
                "mean": s,
                "se": float("nan"),
                "n": 1,
                "unit": "s",
            }
        )
    print("| dataset | model | metric | mean | se | n |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['dataset']} | {r['model']} | {r['metric']} | {r['mean']:.4f} | {r['se']:.4f} | {r['n']} |"
        )
    summary = []
    for name in names:
        best = lambda pre: min(
            ((m, results[(nm, m)]) for (nm, m) in results if nm == name and m.startswith(pre)),
            key=lambda t: np.mean(t[1]["rmse"]),
            default=None,
        )  # noqa: E731
        fb, db = best("funbat"), best("discrete")
        if fb and db:
            summary.append(
                f"{name}: best FunBaT {fb[0]} RMSE {np.mean(fb[1]['rmse']):.3f} vs best discrete {db[0]} {np.mean(db[1]['rmse']):.3f}"
            )
    if len(scal) > 1:
        slope = np.polyfit(np.log([n for n, _ in scal]), np.log([s for _, s in scal]), 1)[0]
        summary.append(f"scaling exponent (log time vs log N) {slope:.2f}")
    print("Summary: " + "; ".join(summary))
    if a.json:
        meta = {
            "machine": platform.processor() or platform.machine(),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
        }
        a.json.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    if a.plot and scal:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(4, 3))
        ns, ts = zip(*scal)
        ax.loglog(ns, ts, "o-", label="FunBaT sweep")
        ax.loglog(ns, [ts[0] * n / ns[0] for n in ns], "k--", label="linear")
        ax.set_xlabel("entries N")
        ax.set_ylabel("seconds per CEP sweep")
        ax.legend()
        fig.tight_layout()
        fig.savefig(a.plot)


if __name__ == "__main__":
    main()
