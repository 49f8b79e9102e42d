"""Digits under corruption: SVGP vs sparse variational Student-t process (SVTP) classifiers.

Part (c) of the scale-mixture benchmark. scikit-learn's bundled digits (1797 8x8 images,
10 classes, pixels scaled to [0, 1]); per seed a random 2/3 train / 1/3 test split. Both
models use the same NNGP kernel (depth-2 ReLU network, learnable weight/bias variances),
the same ``M`` inducing inputs (random training images), the same Adam steps, minibatches
and Monte-Carlo noise (one code path, :mod:`pyro_dkm.processes.classification`: the SVGP
is the SVTP with the scale fixed at 1). They are evaluated on the clean test images and
on corrupted copies: additive Gaussian pixel noise (std 0.1, 0.25, 0.5, clipped to [0, 1])
and Gaussian blur (sigma 0.5, 1.0, 1.5 pixels). Rows: accuracy and test NLL (mean +-
standard error over seeds).

Standalone::

    python benchmarks/_digits.py --quick
    python benchmarks/_digits.py --digits-seeds 5 --json /tmp/digits.json

Interface for ``benchmarks/scale_mixtures.py`` (and any other caller)::

    from _digits import add_digits_args, run_digits
    add_digits_args(parser)   # adds the --digits-* options below (no other options)
    rows = run_digits(args)   # list of {dataset, model, metric, mean, se, n[, unit]} rows

``run_digits(args)`` reads ``args.digits_*`` (defaults filled in if absent), ``args.quick``,
``args.seed`` (default 0), ``args.torch_dtype``/``args.dtype`` (default float64) and
``args.torch_device``/``args.device`` (default cpu); nothing else (no data folder). Row
``dataset`` values are ``digits/clean``, ``digits/noise-<std>``, ``digits/blur-<sigma>``;
models ``SVGP`` (learned point scale), ``SVTP`` and, on request, ``SVGP (s=1)``; metrics
``accuracy``, ``NLL``, ``train time`` (unit s) and, for the SVTP, ``q(s) shape a_q`` (the
posterior inverse-gamma shape: the latent predictive is a Student-t with ``2 a_q`` degrees
of freedom); dataset ``digits/learned`` holds the learned kernel ``weight var``/``bias var``
and the amplitude ``E[s]`` per model.
:func:`summary_line` gives the closing comparison line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, resolve, row, write_json  # noqa: E402

from pyro_dkm.processes.classification import (  # noqa: E402
    NNGPCovariance,
    SVGPClassifier,
    SVTPClassifier,
    classification_metrics,
    fit_classifier,
)

NOISE_STDS = (0.1, 0.25, 0.5)
BLUR_SIGMAS = (0.5, 1.0, 1.5)

DEFAULTS = dict(digits_seeds=5, digits_steps=1500, digits_inducing=100, digits_batch=256,
                digits_lr=0.02, digits_a=2.0, digits_b=2.0, digits_samples=8,
                digits_predict_samples=256, digits_train_size=None, digits_models="svgp,svtp")
#: ``--digits-models`` ids -> row names. ``svgp``: the scale s is a learned point estimate
#: (type-II ML, the fair baseline); ``svgp1``: s fixed at 1; ``svtp``: s ~ InvGamma(a, b)
#: integrated under a variational inverse-gamma q(s).
MODELS = {"svgp1": "SVGP (s=1)", "svgp": "SVGP", "svtp": "SVTP"}
QUICK = dict(digits_seeds=1, digits_steps=150, digits_inducing=30)


def add_digits_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``--digits-*`` options (defaults in :data:`DEFAULTS`; ``--quick`` shrinks
    seeds/steps/inducing points unless they are given explicitly)."""
    g = parser.add_argument_group("digits classification (SVGP vs SVTP)")
    g.add_argument("--digits-seeds", type=int, default=None,
                   help=f"number of seeds / random splits (default {DEFAULTS['digits_seeds']})")
    g.add_argument("--digits-steps", type=int, default=None,
                   help=f"Adam steps per model (default {DEFAULTS['digits_steps']})")
    g.add_argument("--digits-inducing", type=int, default=None,
                   help=f"inducing points M (default {DEFAULTS['digits_inducing']})")
    g.add_argument("--digits-batch", type=int, default=None,
                   help=f"minibatch size (default {DEFAULTS['digits_batch']})")
    g.add_argument("--digits-lr", type=float, default=None,
                   help=f"Adam learning rate (default {DEFAULTS['digits_lr']})")
    g.add_argument("--digits-a", type=float, default=None,
                   help="SVTP inverse-gamma prior shape a (df = 2a; default 2)")
    g.add_argument("--digits-b", type=float, default=None,
                   help="SVTP inverse-gamma prior rate b (default 2)")
    g.add_argument("--digits-samples", type=int, default=None,
                   help="Monte-Carlo (s, f) samples per training step (default 8)")
    g.add_argument("--digits-predict-samples", type=int, default=None,
                   help="Monte-Carlo samples for the predictive probabilities (default 256)")
    g.add_argument("--digits-models", default=None,
                   help="comma-separated subset of svgp1 (s = 1), svgp (learned point s), "
                        "svtp (default svgp,svtp)")
    g.add_argument("--digits-train-size", type=int, default=None,
                   help="training images per split (default 2/3 of the 1797; the test set is "
                        "always the last 1/3 of the permutation)")
    return parser


def _settings(args) -> dict:
    quick = bool(getattr(args, "quick", False))
    out = {}
    for k, v in DEFAULTS.items():
        given = getattr(args, k, None)
        out[k] = given if given is not None else (QUICK.get(k, v) if quick else v)
    return out


def load_digits_tensor(dtype=torch.float64, device="cpu"):
    """``X (1797, 64)`` in [0, 1] and labels ``y (1797,)``."""
    from sklearn.datasets import load_digits

    d = load_digits()
    X = torch.tensor(d.data / 16.0, dtype=dtype, device=device)
    return X, torch.tensor(d.target, dtype=torch.long, device=device)


def corrupt(X: torch.Tensor, kind: str, level: float, seed: int = 0) -> torch.Tensor:
    """Corrupted copies of 8x8 images ``X (N, 64)`` in [0, 1]: ``"noise"`` (additive
    Gaussian, std ``level``, clipped to [0, 1]) or ``"blur"`` (Gaussian filter, sigma
    ``level`` pixels, zero padding). ``"clean"`` returns ``X``."""
    if kind == "clean":
        return X
    if kind == "noise":
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn(X.shape, generator=g, dtype=X.dtype).to(X.device)
        return (X + level * noise).clamp(0, 1)
    if kind == "blur":
        from scipy.ndimage import gaussian_filter

        imgs = X.detach().cpu().numpy().reshape(-1, 8, 8)
        out = gaussian_filter(imgs, sigma=(0, level, level), mode="constant")
        return torch.as_tensor(out.reshape(-1, 64), dtype=X.dtype, device=X.device)
    raise ValueError(f"kind must be 'clean', 'noise' or 'blur', got {kind!r}")


def conditions() -> list[tuple[str, str, float]]:
    """``(dataset name, kind, level)`` for every test condition."""
    out = [("digits/clean", "clean", 0.0)]
    out += [(f"digits/noise-{s:g}", "noise", s) for s in NOISE_STDS]
    out += [(f"digits/blur-{s:g}", "blur", s) for s in BLUR_SIGMAS]
    return out


def run_one_seed(seed: int, cfg: dict, dtype=torch.float64, device="cpu", progress=True):
    """Train SVGP and SVTP on one split; ``{(dataset, model): (accuracy, nll)}`` and
    ``{model: train seconds}``."""
    X, y = load_digits_tensor(dtype, device)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(X.shape[0], generator=g).to(device)
    n_train = (2 * X.shape[0]) // 3
    tr, te = perm[:n_train], perm[n_train:]
    if cfg.get("digits_train_size"):
        if not 10 <= cfg["digits_train_size"] <= n_train:
            raise ValueError(f"--digits-train-size must be in [10, {n_train}], got "
                             f"{cfg['digits_train_size']}")
        n_train = cfg["digits_train_size"]
        tr = tr[:n_train]
    Xtr, ytr, Xte, yte = X[tr], y[tr], X[te], y[te]
    Z = Xtr[torch.randperm(n_train, generator=g)[:min(cfg["digits_inducing"], n_train)]
            .to(device)]
    tests = {name: corrupt(Xte, kind, level, seed=1000 + seed)
             for name, kind, level in conditions()}
    S = cfg["digits_samples"]
    def kernel():  # depth-2 ReLU NNGP; its amplitude is s (fixed, learned or integrated)
        return NNGPCovariance(depth=2, learn_variance=False)

    makers = {
        "svgp1": lambda: SVGPClassifier(Z, 10, kernel=kernel(), learn_scale=False,
                                        num_likelihood_samples=S),
        "svgp": lambda: SVGPClassifier(Z, 10, kernel=kernel(), learn_scale=True,
                                       num_likelihood_samples=S),
        "svtp": lambda: SVTPClassifier(Z, 10, a=cfg["digits_a"], b=cfg["digits_b"],
                                       kernel=kernel(), num_likelihood_samples=S),
    }
    metrics, seconds = {}, {}
    for mid in model_ids(cfg):
        name, make = MODELS[mid], makers[mid]
        torch.manual_seed(seed)
        model = make()
        res = fit_classifier(model, Xtr, ytr, num_steps=cfg["digits_steps"],
                             batch_size=cfg["digits_batch"], lr=cfg["digits_lr"], seed=seed,
                             progress=progress)
        seconds[name] = res.seconds
        if model.has_scale:  # posterior shape of q(s): the latent t has 2 a_q degrees of freedom
            seconds["q(s) shape"] = float(model.q_concentration.detach())
        with torch.no_grad():  # learned kernel shape and amplitude E[s]
            s_mean = (model.scale_posterior_dist().mean if model.has_scale else
                      model.output_scale if model.learn_scale else torch.ones(()))
            seconds[(name, "weight var")] = float(model.kernel.weight_var)
            seconds[(name, "bias var")] = float(model.kernel.bias_var)
            seconds[(name, "E[s]")] = float(s_mean)
        for ds, Xc in tests.items():
            probs = model.predict_proba(Xc, num_samples=cfg["digits_predict_samples"],
                                        generator=torch.Generator(device=device).manual_seed(
                                            seed))
            metrics[(ds, name)] = classification_metrics(probs, yte)
    return metrics, seconds


def model_ids(cfg: dict) -> list[str]:
    ids = [m.strip() for m in str(cfg["digits_models"]).split(",") if m.strip()]
    bad = [m for m in ids if m not in MODELS]
    if bad or not ids:
        raise ValueError(f"--digits-models must be a comma-separated subset of "
                         f"{', '.join(MODELS)}, got {cfg['digits_models']!r}")
    return ids


def run_digits(args) -> list[dict]:
    """Run the benchmark; returns result rows (see the module docstring)."""
    cfg = _settings(args)
    dtype = getattr(args, "torch_dtype", None) or getattr(torch, getattr(args, "dtype",
                                                                         "float64"))
    device = getattr(args, "torch_device", None) or torch.device(getattr(args, "device", "cpu"))
    base = int(getattr(args, "seed", 0) or 0)
    per_seed = []
    for k in range(cfg["digits_seeds"]):
        per_seed.append(run_one_seed(base + k, cfg, dtype, device,
                                     progress=getattr(args, "progress", True)))
    names = [MODELS[m] for m in model_ids(cfg)]
    rows = []
    for ds, _, _ in conditions():
        for model in names:
            acc = [m[(ds, model)][0] for m, _ in per_seed]
            nll = [m[(ds, model)][1] for m, _ in per_seed]
            rows.append(row(ds, model, "accuracy", acc))
            rows.append(row(ds, model, "NLL", nll))
    for model in names:
        rows.append(row("digits/clean", model, "train time", [s[model] for _, s in per_seed],
                        unit="s"))
    if "SVTP" in names:
        rows.append(row("digits/clean", "SVTP", "q(s) shape a_q",
                        [s["q(s) shape"] for _, s in per_seed]))
    for model in names:
        for k in ("weight var", "bias var", "E[s]"):
            rows.append(row("digits/learned", model, k, [s[(model, k)] for _, s in per_seed]))
    return rows


def summary_line(rows: list[dict]) -> str:
    """``SVTP vs SVGP on digits: lower NLL on k/7 conditions, higher accuracy on j/7; mean
    NLL over corrupted conditions a vs b`` (against ``SVGP (s=1)`` if there is no ``SVGP``)."""
    get = {(r["dataset"], r["model"], r["metric"]): r["mean"] for r in rows}
    models = {r["model"] for r in rows}
    base = "SVGP" if "SVGP" in models else "SVGP (s=1)"
    if "SVTP" not in models or base not in models:
        return "digits: no SVTP/SVGP pair to compare"
    get = {(d, "SVGP" if m == base else m, k): v for (d, m, k), v in get.items()
           if m in (base, "SVTP")}
    names = [c[0] for c in conditions() if (c[0], "SVGP", "NLL") in get]
    nll_wins = sum(get[(d, "SVTP", "NLL")] < get[(d, "SVGP", "NLL")] for d in names)
    acc_wins = sum(get[(d, "SVTP", "accuracy")] > get[(d, "SVGP", "accuracy")] for d in names)
    corrupted = [d for d in names if d != "digits/clean"]
    mean = {m: sum(get[(d, m, "NLL")] for d in corrupted) / max(len(corrupted), 1)
            for m in ("SVGP", "SVTP")}
    return (f"SVTP vs {base} on digits: lower NLL on {nll_wins}/{len(names)} conditions, higher "
            f"accuracy on {acc_wins}/{len(names)}; mean NLL over the corrupted conditions "
            f"{mean['SVTP']:.3f} (SVTP) vs {mean['SVGP']:.3f} ({base}), ratio "
            f"{mean['SVTP'] / mean['SVGP']:.3f}")


def main(argv=None) -> None:
    parser = make_parser(__doc__.split("\n\n")[0], splits=None)
    add_digits_args(parser)
    args = resolve(parser.parse_args(argv))
    rows = run_digits(args)
    print_table(rows)
    print(summary_line(rows), flush=True)
    if args.json is not None:
        write_json(args.json, rows, benchmark="digits", settings=_settings(args))


if __name__ == "__main__":
    main()
