"""UCI regression: sparse DKM (plain and ARD) vs SVGP vs 2-layer deep GP vs NNGP vs ARD-RBF GP.

For each dataset folder under ``<data-dir>/uci`` (discovered from the folder) and each
standard split: standardise with training statistics, train every model with the same
number of inducing points, epochs, minibatch size and Adam learning rate, and report test
log-likelihood per point and RMSE in original units (mean +- standard error over splits)
and seconds per epoch. The closing line gives the DKM/DGP time-per-epoch ratio and on how
many datasets the DKM's test log-likelihood is >= the deep GP's.

    python benchmarks/uci.py --splits 5 --json /tmp/uci.json --csv /tmp/uci.csv
    python benchmarks/uci.py --quick            # smoke run, < 1 minute

NNGP is exact GP regression (O(N^3)); on training sets larger than ``--nngp-max-train``
it is fitted on a random subset of that size (stated in the model name). GP-ARD is an
exact GP with an ARD RBF kernel and a constant mean (GPyTorch), hyper-parameters by the
exact marginal likelihood (``--gp-steps`` Adam steps, lr 0.1) on at most
``--gp-max-train`` random training points, then conditioned on all of them.
``--depth`` and ``--kernel`` set the DKM's number of Gram layers and its kernel. With
``--json`` partial results are written after every split.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, resolve, row, write_csv, write_json  # noqa: E402

from pyro_dkm.baselines import (  # noqa: E402
    DeepGPRegressor,
    NNGPRegressor,
    SVGPRegressor,
    gaussian_test_metrics,
)
from pyro_dkm.datasets import list_uci_datasets, load_uci, uci_n_splits  # noqa: E402

try:
    from tqdm import tqdm
except ImportError:  # pragma: no cover
    def tqdm(x, **kw):
        return x


DKMS = ("DKM", "DKM-ARD")


def _with_bias(X):  # G_0 = X X^T / d has no bias term: append a constant feature
    return torch.cat([X, torch.ones(X.shape[0], 1, dtype=X.dtype, device=X.device)], 1)


def run_dkm(d, M, epochs, batch, lr, seed, nu, ard=False, depth=2, kernel="relu"):
    from pyro_dkm.dkm import DeepKernelMachine, fit, select_inducing_points
    X = _with_bias(d.X_train)
    model = DeepKernelMachine(select_inducing_points(X, M, seed=seed), depth=depth, nu=nu,
                              kernel=kernel, input_ard=ard, dtype=X.dtype)
    res = fit(model, X, d.y_train, epochs=epochs, batch_size=batch, lr=lr, seed=seed,
              progress=False)
    pred = model.predict(_with_bias(d.X_test))
    ll, rmse = gaussian_test_metrics(pred, d.y_test, d.y_mean, d.y_std)
    return ll, rmse, res.seconds_per_epoch


def parse_grid(text):
    """``"sqexp:10,sqexp:1000:2,relu:100"`` -> ``[("sqexp", 10.0, None), ("sqexp", 1000.0,
    2), ...]``: kernel, nu and an optional number of Gram layers (None: ``--val-depth``)."""
    out = []
    for item in text.split(","):
        parts = item.split(":")
        if len(parts) not in (2, 3):
            raise argparse.ArgumentTypeError(
                f"expected kernel:nu or kernel:nu:depth, got {item!r}")
        depth = int(parts[2]) if len(parts) == 3 else None
        if depth is not None and depth < 1:
            raise argparse.ArgumentTypeError(f"kernel:nu:depth needs depth >= 1, got {item!r}")
        out.append((parts[0], float(parts[1]), depth))
    return out


def _label(kernel, nu, depth, default_depth):
    """``kernel:nu`` (``kernel:nu:depth`` where depth is not ``--val-depth``)."""
    return f"{kernel}:{nu:g}" + (f":{depth}" if depth != default_depth else "")


def _fit_dkm_config(X, y, kernel, nu, depth, args, seed, steps, score=None):
    """One DKM with an ARD input layer and whitened Grams: the exact DKM (every training
    point its own inducing point, a learned output amplitude and constant) when
    ``len(X) <= --exact-max``, else the sparse DKM with ``--num-inducing`` points and
    minibatches. ``score(model)`` is called every ``--val-every`` steps and at the last;
    its values are returned with the model and the seconds per epoch."""
    from pyro_dkm.dkm import DeepKernelMachine, ExactDeepKernelMachine, fit, select_inducing_points
    torch.manual_seed(seed)
    Xb = _with_bias(X)
    scores = {}

    def callback(step, _loss):
        if score is not None and (step % args.val_every == 0 or step == steps):
            scores[step] = score(model)
        return False

    if X.shape[0] <= args.exact_max:  # full batch: one step is one epoch
        model = ExactDeepKernelMachine(Xb, y, depth=depth, nu=nu, kernel=kernel,
                                       input_ard=True, gram_parameterisation="whitened",
                                       output_variance=True, dtype=X.dtype)
        batch = None
    else:
        model = DeepKernelMachine(select_inducing_points(Xb, args.num_inducing, seed=seed),
                                  depth=depth, nu=nu, kernel=kernel, input_ard=True,
                                  gram_parameterisation="whitened", dtype=X.dtype)
        batch = min(args.batch_size, X.shape[0])
    schedule = None if args.dkm_schedule == "constant" else "cosine"
    res = fit(model, Xb, y, num_steps=steps, batch_size=batch, lr=args.dkm_lr, seed=seed,
              lr_schedule=schedule, progress=False, callback=callback)
    return model, res.seconds_per_epoch, scores


def _val_folds(N, args, seed):
    """(held-out, fitted) row indices for DKM-val: ``--val-folds`` folds of a random
    permutation when ``N <= --cv-max-train`` (every training row held out once), else one
    random ``--val-fraction`` held out."""
    perm = torch.randperm(N, generator=torch.Generator().manual_seed(seed))
    if args.val_folds > 1 and N <= args.cv_max_train:
        folds = torch.chunk(perm, args.val_folds)
        return [(f, torch.cat([g for j, g in enumerate(folds) if j != i]))
                for i, f in enumerate(folds)]
    n_val = max(1, int(round(args.val_fraction * N)))
    return [(perm[:n_val], perm[n_val:])]


def choose(fold_scores, rule="1se"):
    """The (kernel, nu, depth, steps) to refit from ``{key: [held-out LL per fold]}``: the
    best mean (``rule="best"``, or one fold), or with ``"1se"`` the one-standard-error rule
    of cross-validation (Hastie et al., ESL 7.10): among the settings whose mean is within
    one standard error (over the folds) of the best, the simplest, i.e. the fewest Gram
    layers, then the largest nu (closest to the fixed-kernel limit), then the fewest steps
    (closest to the prior). Returns the key and its mean."""
    mean = {k: sum(v) / len(v) for k, v in fold_scores.items()}
    best = max(mean, key=mean.get)
    K = len(fold_scores[best])
    if rule == "best" or K < 2:
        return best, mean[best]
    m = mean[best]
    se = (sum((v - m) ** 2 for v in fold_scores[best]) / (K - 1) / K) ** 0.5
    within = [k for k in mean if mean[k] >= m - se]
    pick = min(within, key=lambda k: (k[2], -k[1], k[3]))
    return pick, mean[pick]


def run_dkm_val(d, args, seed):
    """``DKM-val``: the (kernel, nu, depth, number of steps) of ``--val-grid`` x every
    ``--val-every`` steps up to ``--dkm-steps`` chosen by held-out log-likelihood on the
    folds of ``_val_folds`` (``choose`` with ``--val-rule``), refitted on all training rows.
    Only the training split is used to choose."""
    folds = _val_folds(d.X_train.shape[0], args, seed)
    scores = {}
    for iv, it in folds:
        Xv = _with_bias(d.X_train[iv])

        def score(model, Xv=Xv, yv=d.y_train[iv]):
            return gaussian_test_metrics(model.predict(Xv), yv)[0]

        for kernel, nu, depth in args.val_grid:  # depth resolved in main
            _, _, sc = _fit_dkm_config(d.X_train[it], d.y_train[it], kernel, nu, depth, args,
                                       seed, args.dkm_steps, score)
            for step, v in sc.items():
                if args.dkm_schedule == "constant" or step == args.dkm_steps:
                    scores.setdefault((kernel, nu, depth, step), []).append(v)
    (kernel, nu, depth, steps), val = choose(scores, args.val_rule)
    m, spe, _ = _fit_dkm_config(d.X_train, d.y_train, kernel, nu, depth, args, seed, steps)
    ll, rmse = gaussian_test_metrics(m.predict(_with_bias(d.X_test)), d.y_test, d.y_mean,
                                     d.y_std)
    return ll, rmse, spe, f"{_label(kernel, nu, depth, args.val_depth)}:{steps}", val


def run_baseline(name, d, M, epochs, batch, lr, seed, nngp_max, gp_steps=300,
                 gp_max=5000):
    if name == "GP-ARD":
        from pyro_dkm.baselines import ARDGPRegressor
        m = ARDGPRegressor(max_train=gp_max, seed=seed)
        spe = m.fit(d.X_train, d.y_train, epochs=gp_steps)
        ll, rmse = gaussian_test_metrics(m.predict(d.X_test), d.y_test, d.y_mean, d.y_std)
    elif name == "SVGP":
        m = SVGPRegressor(M, seed=seed)
        spe = m.fit(d.X_train, d.y_train, epochs=epochs, batch_size=batch, lr=lr)
        ll, rmse = gaussian_test_metrics(m.predict(d.X_test), d.y_test, d.y_mean, d.y_std)
    elif name == "DGP-2":
        m = DeepGPRegressor(M, seed=seed)
        spe = m.fit(d.X_train, d.y_train, epochs=epochs, batch_size=batch, lr=lr)
        _, rmse = gaussian_test_metrics(m.predict(d.X_test), d.y_test, d.y_mean, d.y_std)
        ll = m.log_predictive(d.X_test, d.y_test, d.y_mean, d.y_std)
    else:
        X, y = d.X_train, d.y_train
        if X.shape[0] > nngp_max:
            g = torch.Generator().manual_seed(seed)
            idx = torch.randperm(X.shape[0], generator=g)[:nngp_max]
            X, y = X[idx], y[idx]
        m = NNGPRegressor(depth=2)
        spe = m.fit(X, y, epochs=min(epochs * 2, 100), lr=0.05)
        ll, rmse = gaussian_test_metrics(m.predict(d.X_test), d.y_test, d.y_mean, d.y_std)
    return ll, rmse, spe


def main(argv=None) -> int:
    p = make_parser(__doc__.splitlines()[0] + "\n\n" + "\n".join(__doc__.splitlines()[2:]))
    p.add_argument("--num-inducing", type=int, default=100, help="inducing points (all models)")
    p.add_argument("--steps", type=int, default=1000,
                   help="target optimiser steps; epochs = ceil(steps / steps per epoch)")
    p.add_argument("--max-epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--nu", type=float, default=1.0, help="DKM nu for both Gram layers")
    p.add_argument("--nngp-max-train", type=int, default=2000)
    p.add_argument("--models", default="DKM,DKM-ARD,SVGP,DGP-2,NNGP,GP-ARD",
                   help="comma-separated from DKM, DKM-ARD (learned input lengthscales), SVGP, "
                        "DGP-2, NNGP, GP-ARD (exact GP, ARD RBF kernel), DKM-val (kernel and "
                        "nu chosen on a validation part of the training split)")
    p.add_argument("--depth", type=int, default=2, help="DKM Gram layers")
    p.add_argument("--kernel", default="relu", help="DKM kernel (relu, sqexp, erf, ...)")
    p.add_argument("--gp-steps", type=int, default=300, help="GP-ARD Adam steps")
    p.add_argument("--gp-max-train", type=int, default=2000,
                   help="GP-ARD: hyper-parameters on at most this many random training rows "
                        "(the posterior conditions on all of them)")
    p.add_argument("--val-grid", type=parse_grid,
                   default=parse_grid("sqexp:10,sqexp:100,sqexp:1000"),
                   help="DKM-val candidates, kernel:nu or kernel:nu:depth (depth: Gram "
                        "layers, else --val-depth)")
    p.add_argument("--val-fraction", type=float, default=0.2,
                   help="DKM-val: share of the training rows held out to choose")
    p.add_argument("--val-folds", type=int, default=5,
                   help="DKM-val: K-fold cross-validation on training sets of at most "
                        "--cv-max-train rows (else one --val-fraction held out)")
    p.add_argument("--val-rule", choices=("1se", "best"), default="1se",
                   help="DKM-val with K-fold CV: the one-standard-error rule (the simplest "
                        "setting within one s.e. of the best) or the best mean")
    p.add_argument("--cv-max-train", type=int, default=500,
                   help="DKM-val: largest training set chosen by K-fold cross-validation")
    p.add_argument("--val-depth", type=int, default=1, help="DKM-val Gram layers")
    p.add_argument("--dkm-steps", type=int, default=400, help="DKM-val: most Adam steps")
    p.add_argument("--val-every", type=int, default=50,
                   help="DKM-val: score the held-out rows every this many steps (the number "
                        "of steps is chosen with the kernel and nu)")
    p.add_argument("--dkm-lr", type=float, default=0.05, help="DKM-val Adam learning rate")
    p.add_argument("--dkm-schedule", choices=("constant", "cosine"), default="constant",
                   help="DKM-val learning rate: constant (the number of steps is chosen too) "
                        "or cosine-annealed to 0 over --dkm-steps (only the last step is a "
                        "candidate)")
    p.add_argument("--exact-max", type=int, default=1000,
                   help="DKM-val: the exact DKM up to this many training rows, else sparse")
    p.add_argument("--csv", type=Path, default=None, help="also write the rows as CSV")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads, the same for every model (default 1)")
    args = resolve(p.parse_args(argv))
    args.val_grid = [(k, nu, dp or args.val_depth) for k, nu, dp in args.val_grid]
    torch.set_num_threads(args.threads)
    if args.quick:
        args.num_inducing, args.steps, args.max_epochs = 10, 6, 3
        args.splits = 1 if args.splits is None else min(args.splits, 1)
        args.nngp_max_train = 100
        args.gp_steps, args.gp_max_train = 5, 100
        args.dkm_steps, args.val_every, args.val_grid = 6, 3, args.val_grid[:2]
        if args.datasets is None:
            args.datasets = ["yacht"]
    torch.manual_seed(args.seed)
    uci_dir = Path(args.data_dir) / "uci"
    names = args.datasets or list_uci_datasets(uci_dir)
    models = [m for m in args.models.split(",") if m]
    rows, ratios, wins, compared, budget = [], {}, {}, {}, {}
    meta = dict(num_inducing=args.num_inducing, steps=args.steps, max_epochs=args.max_epochs,
                batch_size=args.batch_size, lr=args.lr, nu=args.nu, threads=args.threads,
                nngp_max_train=args.nngp_max_train, depth=args.depth, kernel=args.kernel,
                gp_steps=args.gp_steps, gp_max_train=args.gp_max_train,
                val_grid=[_label(*c, args.val_depth) for c in args.val_grid],
                val_fraction=args.val_fraction, val_folds=args.val_folds,
                cv_max_train=args.cv_max_train, val_rule=args.val_rule,
                val_depth=args.val_depth,
                dkm_steps=args.dkm_steps, val_every=args.val_every, dkm_lr=args.dkm_lr,
                dkm_schedule=args.dkm_schedule,
                exact_max=args.exact_max)
    chosen, val_ll = {}, {}  # DKM-val: choices and their validation log-likelihoods
    for name in names:
        n_splits = min(args.splits or 10**9, uci_n_splits(uci_dir / name))
        res = {m: {"ll": [], "rmse": [], "spe": []} for m in models}
        for split in tqdm(range(n_splits), desc=name, file=sys.stderr):
            d = load_uci(name, split, data_dir=uci_dir, dtype=args.torch_dtype)
            for a in ("X_train", "y_train", "X_test", "y_test"):
                setattr(d, a, getattr(d, a).to(args.torch_device))
            N = d.X_train.shape[0]
            B = min(args.batch_size, N)
            epochs = min(args.max_epochs, max(1, math.ceil(args.steps / math.ceil(N / B))))
            seed = args.seed + split
            budget[name] = {"n_train": N, "epochs": epochs, "steps": epochs * math.ceil(N / B)}
            for m in models:
                torch.manual_seed(seed)
                if m == "DKM-val":
                    *out, pick, score = run_dkm_val(d, args, seed)
                    chosen.setdefault(name, []).append(pick)
                    val_ll.setdefault(name, []).append(score)
                elif m in DKMS:
                    out = run_dkm(d, args.num_inducing, epochs, B, args.lr, seed, args.nu,
                                  ard=m == "DKM-ARD", depth=args.depth, kernel=args.kernel)
                else:
                    out = run_baseline(m, d, args.num_inducing, epochs, B, args.lr, seed,
                                       args.nngp_max_train, args.gp_steps, args.gp_max_train)
                for k, v in zip(("ll", "rmse", "spe"), out):
                    res[m][k].append(v)
            if args.json:  # partial results after every split
                part = [row(name, m, met, res[m][k], **kw) for m in models
                        for k, met, kw in (("ll", "test LL", {}), ("rmse", "RMSE", {}),
                                           ("spe", "time/epoch", {"unit": "s"}))]
                write_json(args.json, rows + part, summary=f"partial: {name} split {split}",
                           budget=budget, chosen=chosen, val_ll=val_ll, **meta)
        for m in models:
            label = m if m != "NNGP" else f"NNGP (exact, n<={args.nngp_max_train})"
            rows.append(row(name, label, "test LL", res[m]["ll"]))
            rows.append(row(name, label, "RMSE", res[m]["rmse"]))
            rows.append(row(name, label, "time/epoch", res[m]["spe"], unit="s"))
        for k in (k for k in DKMS if k in models and "DGP-2" in models):
            rows.append(row(name, k, "time ratio DKM/DGP-2",
                            [a / b for a, b in zip(res[k]["spe"], res["DGP-2"]["spe"])]))
        if "DGP-2" in models:
            dgp_ll = sum(res["DGP-2"]["ll"]) / len(res["DGP-2"]["ll"])
            for k in (k for k in DKMS if k in models):
                compared[k] = compared.get(k, 0) + 1
                wins[k] = wins.get(k, 0) + (sum(res[k]["ll"]) / len(res[k]["ll"]) >= dgp_ll)
                ratios.setdefault(k, []).append(sum(res[k]["spe"]) / sum(res["DGP-2"]["spe"]))
    print_table(rows)
    parts = []
    if "DKM-val" in models and "GP-ARD" in models:
        get = {(r["dataset"], r["model"], r["metric"]): r["mean"] for r in rows}
        won = [n for n in names if get[(n, "DKM-val", "test LL")] >= get[(n, "GP-ARD", "test LL")]]
        parts.append(f"DKM-val test LL >= GP-ARD on {len(won)}/{len(names)} datasets "
                     f"({', '.join(won) or 'none'})")
    for k, rs in ratios.items():
        geo = math.exp(sum(math.log(r) for r in rs) / len(rs))
        parts.append(f"{k} test LL >= DGP-2 on {wins[k]}/{compared[k]} datasets; {k}/DGP-2 "
                     f"seconds per epoch: geometric mean {geo:.2f}x (range {min(rs):.2f}-"
                     f"{max(rs):.2f})")
    summary = ("; ".join(parts) + f" at {args.num_inducing} inducing points" if parts
               else "no DKM vs DGP-2 or DKM-val vs GP-ARD comparison run")
    print(summary)
    if args.json:
        write_json(args.json, rows, summary=summary, argv=sys.argv[1:] if argv is None else argv,
                   budget=budget, chosen=chosen, val_ll=val_ll, **meta)
    if args.csv:
        write_csv(args.csv, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
