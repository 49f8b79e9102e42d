# ruff: noqa: B023
"""FunBaT (functional Tucker / CP with state-space GP factors) vs discrete baselines.

Usage: python benchmarks/funbat.py [--data-dir DIR] [--datasets a,b] [--folds 5]
       [--ranks 2,3,5,7] [--max-iter 40] [--quick] [--seed 0] [--json PATH]
       [--scaling 1e3,1e4,1e5,1e6 | --no-scaling] [--plot PATH]

Per dataset and fold, every model is trained on the same 90% of the fold's training
entries; the other 10% (validation) picks each model's hyper-parameters; the fold's
test entries are used only for the reported RMSE / MAE (original units):

  funbat-{tucker,cp}-R : pyro_dkm.tucker.FunctionalTucker (CEP, ALS start), continuous
      coordinates; per-mode lengthscales picked on validation (one coordinate-wise pass over
      {0.03, 0.1, 0.3, 1} at rank 2 Tucker, --tune-iter sweeps), Matern 3/2. Each is fitted
      from --restarts seeds of its ALS start and the fit with the lowest validation RMSE is
      kept (a degenerate CP start, large cancelling core weights, predicts a few entries
      wildly with a normal training fit; validation catches it); the fit time is the sum.
  discrete-{tucker,cp}-R : ridge ALS with indexes as categories (pyro_dkm.tucker.als);
      L2 penalty picked on validation from {0.1, 1, 10} at each rank.
  sgp : sparse GP regression on the coordinates (DTC/SoR mean, RBF, 500 inducing inputs),
      lengthscale and noise picked on validation.
  index-mean-k : the mean of the training entries with the same index in mode k (the
      global mean where the index is unseen); index-mean-best : the mode whose index mean
      has the lowest validation RMSE.
  extra-trees : scikit-learn ExtraTreesRegressor (300 trees) on the coordinates,
      min_samples_leaf picked on validation from {1, 3, 10}.
  funbat-selected / discrete-selected : the FunBaT (discrete) model of the lowest
      validation RMSE over ranks and cores, refitted on nothing new: its test figures.

With --learn, FunBaT's per-mode Matern lengthscales and variances are learned by the
evidence of the factor messages inside the CEP loop (FunctionalTucker(
learn_hyperparameters=True)), with --rank-lengthscales one per rank component, and no
grid pass is run; --damping sets the CEP message damping.

Plus a scaling run: seconds per CEP sweep vs number of synthetic entries (1e3..1e6).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import default_data_dir, make_parser, print_table, row, write_json  # noqa: E402

from pyro_dkm.datasets import list_tensor_datasets, load_tensor_fold  # noqa: E402
from pyro_dkm.tucker import FunctionalTucker  # noqa: E402
from pyro_dkm.tucker.als import als_fit, als_predict  # noqa: E402

ELL_GRID = (0.03, 0.1, 0.3, 1.0)
REG_GRID = (0.1, 1.0, 10.0)


def _rmse(a, b) -> float:
    return float(((torch.as_tensor(a) - torch.as_tensor(b)) ** 2).mean().sqrt())


def split_validation(d: dict, frac: float, seed: int) -> tuple[dict, dict]:
    """Split the fold's training entries into fit (1 - frac) and validation (frac) parts."""
    n = len(d["train_value"])
    perm = np.random.default_rng(seed).permutation(n)
    nv = int(round(frac * n))
    parts = []
    for ix in (perm[nv:], perm[:nv]):
        parts.append({f: d[f"train_{f}"][ix] for f in ("coord", "index", "value")})
    return parts[0], parts[1]


FUNBAT_OPTIONS: dict = {}  # extra FunctionalTucker options from the command line


def funbat(fit, coords_eval, R, core, ell, max_iter, seed):
    m = FunctionalTucker([R] * 3, nu=FUNBAT_OPTIONS.get("nu", 1.5), lengthscale=list(ell),
                         core=core, max_iter=max_iter, tol=1e-4, progress=False, seed=seed,
                         **{k: v for k, v in FUNBAT_OPTIONS.items() if k != "nu"})
    m.fit(fit["coord"], fit["value"])
    return [m.predict(c)[0] for c in coords_eval], m


def funbat_restarts(fit, val, coords_eval, R, core, ell, max_iter, seed, restarts):
    """Best of ``restarts`` fits (ALS-start seeds ``seed + 1000 r``) by validation RMSE:
    (predictions at ``coords_eval``, validation RMSE of each restart; the best is
    ``min``)."""
    best, vals = None, []
    for r in range(restarts):
        (mv, *mu), _ = funbat(fit, [val["coord"], *coords_eval], R, core, ell, max_iter,
                              seed + 1000 * r)
        vals.append(_rmse(mv, val["value"]))
        if best is None or vals[-1] < best[0]:
            best = (vals[-1], mu)
    return best[1], vals


def tune_lengthscales(fit, val, max_iter, seed, log, R=2):
    """One coordinate-wise pass over ELL_GRID per mode (rank-R Tucker), by validation RMSE."""
    ell = [0.3, 0.3, 0.3]
    best = _rmse(funbat(fit, [val["coord"]], R, "tucker", ell, max_iter, seed)[0][0],
                 val["value"])
    for k in range(3):
        for v in ELL_GRID:
            if v == ell[k]:
                continue
            cand = list(ell)
            cand[k] = v
            r = _rmse(funbat(fit, [val["coord"]], R, "tucker", cand, max_iter, seed)[0][0],
                      val["value"])
            if r < best:
                best, ell = r, cand
    log(f"  lengthscales {ell} (validation RMSE {best:.4f}, standardised)")
    return ell


def discrete(fit, val, test_index, shape, R, core, n_iter, seed):
    """Ridge ALS; the penalty is picked on the validation part."""
    ti = [torch.as_tensor(fit["index"][:, k]) for k in range(3)]
    vi = [torch.as_tensor(val["index"][:, k]) for k in range(3)]
    te = [torch.as_tensor(test_index[:, k]) for k in range(3)]
    y = torch.as_tensor(fit["value"])
    best = None
    for reg in REG_GRID:
        U, w = als_fit(ti, y, [R] * 3, shape, reg=reg, n_iter=n_iter, core=core, seed=seed)
        r = _rmse(als_predict(U, w, vi, cp=core == "cp"), val["value"])
        if best is None or r < best[0]:
            best = (r, U, w)
    r, U, w = best
    return als_predict(U, w, te, cp=core == "cp"), r


def index_means(fit, val, test_index, shape):
    """Per-mode index means: {k: (validation RMSE, test predictions)}."""
    out = {}
    y = np.asarray(fit["value"])
    for k in range(len(shape)):
        s = np.bincount(fit["index"][:, k], y, minlength=shape[k])
        c = np.bincount(fit["index"][:, k], minlength=shape[k])
        mean = np.where(c > 0, s / np.maximum(c, 1), y.mean())
        out[k] = (_rmse(mean[val["index"][:, k]], val["value"]), mean[test_index[:, k]])
    return out


def extra_trees(fit, val, test_coord, seed):
    """ExtraTreesRegressor on the coordinates; min_samples_leaf picked on validation."""
    from sklearn.ensemble import ExtraTreesRegressor

    best = None
    for leaf in (1, 3, 10):
        m = ExtraTreesRegressor(n_estimators=300, min_samples_leaf=leaf, random_state=seed,
                                n_jobs=1).fit(fit["coord"], fit["value"])
        r = _rmse(m.predict(val["coord"]), val["value"])
        if best is None or r < best[0]:
            best = (r, m)
    return best[1].predict(test_coord)


def sgp(fit, val, test_coord, seed, m=500):
    """Subset-of-regressors sparse GP mean (RBF); lengthscale/noise picked on validation."""
    g = torch.Generator().manual_seed(seed)
    X, y = torch.as_tensor(fit["coord"]), torch.as_tensor(fit["value"])
    Z = X[torch.randperm(len(X), generator=g)[:m]]
    best = None
    for ell in (0.3, 1.0, 3.0):
        for noise in (0.03, 0.3):
            def k(a, b, ell=ell):
                return torch.exp(-0.5 * torch.cdist(a / ell, b / ell) ** 2)
            Kzz = k(Z, Z)
            Kxz = k(X, Z)
            A = noise * Kzz + Kxz.T @ Kxz + 1e-8 * len(X) * torch.eye(len(Z), dtype=X.dtype)
            w = torch.linalg.solve(A, Kxz.T @ y)
            r = _rmse(k(torch.as_tensor(val["coord"]), Z) @ w, val["value"])
            if best is None or r < best[0]:
                best = (r, k, w)
    _, k, w = best
    return k(torch.as_tensor(test_coord), Z) @ w


def scaling_run(sizes, seed, iters=5, log=print):
    """Seconds per CEP sweep (rank-3 Tucker, random start) vs number of entries."""
    out = []
    g = torch.Generator().manual_seed(seed)
    for n in sizes:
        X = torch.rand(n, 3, generator=g, dtype=torch.float64) * 10
        X = (X * 100).round() / 100  # <= 1001 unique coordinates per mode
        y = torch.sin(X).sum(1) + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
        m = FunctionalTucker([3, 3, 3], lengthscale=1.0, max_iter=iters, tol=0.0, init="random",
                             progress=False)
        t = time.perf_counter()
        m.fit(X, y)
        out.append((n, (time.perf_counter() - t) / iters))
        log(f"scaling N={n}: {out[-1][1]:.3f} s per sweep")
    return out


def table_rows(results: dict) -> list[dict]:
    rows = []
    for (name, model), r in sorted(results.items()):
        rows.append(row(name, model, "rmse", r["rmse"]))
        rows.append(row(name, model, "mae", r["mae"]))
        rows.append(row(name, model, "fit_time", r["fit_time"], unit="s"))
    return rows


def main(argv=None):
    p = make_parser(__doc__, splits=None, folds=5)
    p.add_argument("--ranks", default="2,3,5,7")
    p.add_argument("--max-iter", type=int, default=40, help="CEP sweeps (after the ALS start)")
    p.add_argument("--als-iter", type=int, default=20, help="ALS sweeps of the baselines")
    p.add_argument("--val-frac", type=float, default=0.1)
    p.add_argument("--tune-iter", type=int, default=15, help="CEP sweeps of the tuning fits")
    p.add_argument("--restarts", type=int, default=2,
                   help="ALS-start seeds per FunBaT model; the best by validation RMSE is kept")
    p.add_argument("--scaling", default="1e3,1e4,1e5,1e6")
    p.add_argument("--no-scaling", action="store_true")
    p.add_argument("--no-datasets", action="store_true", help="only the scaling run")
    p.add_argument("--plot", type=Path, default=None, help="scaling plot (PNG)")
    p.add_argument("--learn", action="store_true",
                   help="learn FunBaT lengthscales/variances by evidence (no grid pass)")
    p.add_argument("--rank-lengthscales", action="store_true",
                   help="with --learn: one lengthscale per rank component")
    p.add_argument("--damping", type=float, default=0.5, help="CEP message damping")
    p.add_argument("--hyper-every", type=int, default=20,
                   help="with --learn: sweeps between evidence steps")
    p.add_argument("--nu", type=float, default=1.5, help="FunBaT Matern smoothness")
    p.add_argument("--hyper-rounds", type=int, default=None,
                   help="with --learn: number of evidence steps (default: every --hyper-every "
                        "sweeps to the end)")
    p.add_argument("--only-folds", default=None,
                   help="comma-separated fold numbers to run (default: 0 .. --folds - 1)")
    a = p.parse_args(argv)
    FUNBAT_OPTIONS.clear()
    FUNBAT_OPTIONS.update(damping=a.damping, nu=a.nu)
    if a.learn:
        FUNBAT_OPTIONS.update(learn_hyperparameters=True, hyper_every=a.hyper_every,
                              hyper_rounds=a.hyper_rounds,
                              rank_lengthscales=a.rank_lengthscales)
    if a.restarts < 1:
        p.error(f"--restarts must be >= 1, got {a.restarts}")
    torch.set_num_threads(1)
    data_dir = a.data_dir or default_data_dir()
    tdir = data_dir / "tensor"

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    names = [] if a.no_datasets else (a.datasets or list_tensor_datasets(tdir))
    ranks = [int(r) for r in a.ranks.split(",")]
    folds, max_iter, als_iter = a.folds, a.max_iter, a.als_iter
    scaling = [int(float(s)) for s in a.scaling.split(",")]
    if a.quick:
        folds, ranks, max_iter, als_iter, scaling = 1, [2], 5, 5, [1000, 4000]
        a.tune_iter = 3
    results: dict = {}
    for name in names:
        fold_list = (range(folds) if a.only_folds is None or a.quick
                     else [int(f) for f in a.only_folds.split(",")])
        for fold in fold_list:
            d = load_tensor_fold(tdir / f"{name}.npz", fold)
            if a.quick:
                for part, n in (("train", 2000), ("test", 500)):
                    for f in ("coord", "index", "value"):
                        d[f"{part}_{f}"] = d[f"{part}_{f}"][:n]
            shape = [int(s) for s in d["shape"]]
            yt = torch.as_tensor(d["test_value"])
            # standardise with training statistics; report original units
            y_mu, y_sd = float(d["train_value"].mean()), float(d["train_value"].std())
            d["train_value"] = (d["train_value"] - y_mu) / y_sd
            fit, val = split_validation(d, a.val_frac, a.seed + fold)
            seed = a.seed + fold

            def record(model, mu, dt):
                mu = torch.as_tensor(mu) * y_sd + y_mu
                r = results.setdefault((name, model), {"rmse": [], "mae": [], "fit_time": []})
                r["rmse"].append(_rmse(mu, yt))
                r["mae"].append(float((mu - yt).abs().mean()))
                r["fit_time"].append(dt)
                log(f"{name} fold {fold} {model}: RMSE {r['rmse'][-1]:.4f} ({dt:.1f} s)")

            t = time.perf_counter()
            if a.learn:  # the evidence sets the lengthscales; start from the old default
                ell = [0.3, 0.3, 0.3]
            else:
                ell = tune_lengthscales(fit, val, a.tune_iter, seed, log)
                log(f"  tuning took {time.perf_counter() - t:.0f} s")
            tune_s = time.perf_counter() - t
            selected = {"funbat": None, "discrete": None}  # (validation RMSE, preds, time)
            for R in ranks:
                for core in ("tucker", "cp"):
                    t = time.perf_counter()
                    (mu,), vals = funbat_restarts(fit, val, [d["test_coord"]], R, core, ell,
                                                  max_iter, seed, a.restarts)
                    dt = time.perf_counter() - t + tune_s
                    record(f"funbat-{core}-{R}", mu, dt)
                    log("  validation RMSE per restart: " + ", ".join(f"{v:.4f}" for v in vals))
                    if selected["funbat"] is None or min(vals) < selected["funbat"][0]:
                        selected["funbat"] = (min(vals), mu, dt)
                    t = time.perf_counter()
                    mu, vr = discrete(fit, val, d["test_index"], shape, R, core, als_iter, seed)
                    record(f"discrete-{core}-{R}", mu, time.perf_counter() - t)
                    if selected["discrete"] is None or vr < selected["discrete"][0]:
                        selected["discrete"] = (vr, mu, time.perf_counter() - t)
            for kind, (_, mu, dt) in selected.items():
                record(f"{kind}-selected", mu, dt)
            t = time.perf_counter()
            im = index_means(fit, val, d["test_index"], shape)
            dt = time.perf_counter() - t
            for k, (_, mu) in im.items():
                record(f"index-mean-{k}", mu, dt / len(im))
            record("index-mean-best", min(im.values(), key=lambda v: v[0])[1], dt)
            t = time.perf_counter()
            record("extra-trees", extra_trees(fit, val, d["test_coord"], seed),
                   time.perf_counter() - t)
            t = time.perf_counter()
            record("sgp", sgp(fit, val, d["test_coord"], seed), time.perf_counter() - t)
            if a.json:  # partial results after every fold
                write_json(a.json, table_rows(results), script="benchmarks/funbat.py",
                           argv=sys.argv[1:], partial=True)
    rows = table_rows(results)
    scal = [] if a.no_scaling else scaling_run(scaling, a.seed, log=log)
    for n, s in scal:
        rows.append(row("synthetic", f"funbat-tucker-3 N={n}", "sweep_time", [s], unit="s"))
    print_table(rows)
    summary = []
    for name in names:
        def best(prefix, name=name):
            c = [(m, np.mean(r["rmse"])) for (nm, m), r in results.items()
                 if nm == name and m.startswith(prefix)]
            return min(c, key=lambda t: t[1]) if c else None
        fb, db = best("funbat"), best("discrete")
        if fb and db:
            summary.append(f"{name}: best FunBaT {fb[0]} RMSE {fb[1]:.4f} vs best discrete "
                           f"{db[0]} {db[1]:.4f} (ratio {fb[1] / db[1]:.3f})")
        sel, im = best("funbat-selected"), best("index-mean-best")
        if sel and im:
            summary.append(f"{name}: validation-selected FunBaT RMSE {sel[1]:.4f} vs "
                           f"validation-selected index mean {im[1]:.4f}")
    if len(scal) > 1:
        c0, c1 = affine_fit(scal)
        summary.append(f"sweep time ~ {c0:.3f} s + {c1 * 1e6:.1f} us x N (linear in N)")
    print("Summary: " + "; ".join(summary))
    if a.json:
        write_json(a.json, rows, script="benchmarks/funbat.py", argv=sys.argv[1:])
    if a.plot and scal:
        plot_scaling(scal, a.plot)


def affine_fit(scal) -> tuple[float, float]:
    """Least-squares fit (relative errors) of sweep time = a + b N."""
    n = np.array([x for x, _ in scal], dtype=float)
    t = np.array([y for _, y in scal], dtype=float)
    A = np.stack([np.ones_like(n), n], 1) / t[:, None]
    (c0, c1), *_ = np.linalg.lstsq(A, np.ones_like(t), rcond=None)
    return float(c0), float(c1)


def plot_scaling(scal, path: Path) -> None:
    """Log-log plot of seconds per sweep vs N with the fitted a + b N line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    c0, c1 = affine_fit(scal)
    ns, ts = zip(*scal)
    grid = np.geomspace(ns[0], ns[-1], 50)
    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    ax.loglog(ns, ts, "o-", label="FunBaT CEP sweep (R=3 Tucker)")
    ax.loglog(grid, c0 + c1 * grid, "k--",
              label=f"{c0:.2f} s + {c1 * 1e6:.0f} us x N")
    ax.loglog(grid, c1 * grid, ":", color="gray", label="linear part")
    ax.set_xlabel("entries N")
    ax.set_ylabel("seconds per sweep")
    ax.legend(fontsize=8)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
