"""Shared helpers for the ``benchmarks/`` scripts (the interface described in docs/benchmarks.md).

* :func:`make_parser` -- argparse with ``--data-dir --datasets --splits --folds --quick
  --seed --device --dtype --json``;
* :func:`mean_se` -- mean and standard error of a list of numbers;
* :func:`row` / :func:`print_table` / :func:`write_json` / :func:`write_csv` -- result rows
  ``{dataset, model, metric, mean, se, n[, unit]}`` as a Markdown table, JSON or CSV;
* :func:`machine_info` -- CPU model / GPU name and library versions for the JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import sys
from pathlib import Path

import torch


def default_data_dir() -> Path:
    """``$PYRO_DKM_DATA`` if set, else ``../shared/data`` (beside the working directory, or
    beside the checkout holding this script)."""
    env = os.environ.get("PYRO_DKM_DATA")
    if env:
        return Path(env)
    for c in (Path.cwd().parent / "shared" / "data",
              Path(__file__).resolve().parents[2] / "shared" / "data"):
        if c.is_dir():
            return c
    return Path.cwd().parent / "shared" / "data"


def make_parser(description: str, *, splits: int | None = 5, folds: int | None = None
                ) -> argparse.ArgumentParser:
    """The common command line. Scripts add their own options to the returned parser."""
    p = argparse.ArgumentParser(description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="data folder (default: $PYRO_DKM_DATA or ../shared/data)")
    p.add_argument("--datasets", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="comma-separated subset of the datasets found in the data folder")
    p.add_argument("--splits", type=int, default=splits, help="number of splits")
    p.add_argument("--folds", type=int, default=folds, help="number of folds")
    p.add_argument("--quick", action="store_true", help="smoke-sized run (< 1 minute)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="float64", choices=["float64", "float32"])
    p.add_argument("--json", type=Path, default=None, help="also write the rows as JSON")
    return p


def resolve(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``args.data_dir`` and turn ``--device``/``--dtype`` into torch objects
    (``args.torch_device``, ``args.torch_dtype``)."""
    if args.data_dir is None:
        args.data_dir = default_data_dir()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda requested but CUDA is not available")
    args.torch_device = torch.device(args.device)
    args.torch_dtype = getattr(torch, args.dtype)
    return args


def mean_se(values) -> tuple[float, float, int]:
    """Mean, standard error (sample std / sqrt(n); 0 for n = 1) and n of ``values``."""
    v = [float(x) for x in values]
    n = len(v)
    if n == 0:
        return float("nan"), float("nan"), 0
    m = sum(v) / n
    se = math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1) / n) if n > 1 else 0.0
    return m, se, n


def row(dataset: str, model: str, metric: str, values, unit: str | None = None) -> dict:
    """One result row from per-split ``values`` (kept in the row, for paired comparisons)."""
    m, se, n = mean_se(values)
    r = {"dataset": dataset, "model": model, "metric": metric, "mean": m, "se": se, "n": n,
         "values": [float(v) for v in values]}
    if unit is not None:
        r["unit"] = unit
    return r


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return str(x)
    a = abs(x)
    return f"{x:.3g}" if (a >= 1e4 or (a < 1e-2 and a > 0)) else f"{x:.3f}"


def format_table(rows: list[dict]) -> str:
    """Markdown table with one line per (dataset, model) and one column per metric
    (``mean +- se``)."""
    metrics = list(dict.fromkeys(r["metric"] + (f" ({r['unit']})" if r.get("unit") else "")
                                 for r in rows))
    keys = list(dict.fromkeys((r["dataset"], r["model"]) for r in rows))
    cell = {}
    for r in rows:
        name = r["metric"] + (f" ({r['unit']})" if r.get("unit") else "")
        cell[(r["dataset"], r["model"], name)] = f"{_fmt(r['mean'])} ± {_fmt(r['se'])}"
    lines = ["| dataset | model | " + " | ".join(metrics) + " |",
             "|---|---|" + "---|" * len(metrics)]
    for ds, model in keys:
        lines.append(f"| {ds} | {model} | "
                     + " | ".join(cell.get((ds, model, m), "") for m in metrics) + " |")
    return "\n".join(lines)


def print_table(rows: list[dict], file=None) -> None:
    print(format_table(rows), file=file or sys.stdout, flush=True)


def machine_info() -> dict:
    """CPU model / GPU name, thread count and library versions."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "torch": torch.__version__, "python": platform.python_version(),
            "threads": torch.get_num_threads(), "platform": platform.platform()}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    for mod in ("pyro", "gpytorch"):
        try:
            info[mod] = __import__(mod).__version__
        except Exception:  # pragma: no cover
            pass
    return info


def write_json(path, rows: list[dict], **extra) -> None:
    """Write ``{"meta": {**machine_info(), **extra}, "rows": rows}`` to ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump({"meta": {**machine_info(), **extra}, "rows": rows}, f, indent=1)


def write_csv(path, rows: list[dict]) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fields = ["dataset", "model", "metric", "mean", "se", "n", "unit"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for r in rows:
            w.writerow({k: r.get(k, "") for k in fields})
