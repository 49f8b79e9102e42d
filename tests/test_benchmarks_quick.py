"""Smoke runs of the benchmark scripts (``--quick``) and the shared helpers."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from _common import format_table, mean_se, row  # noqa: E402

from pyro_dkm.datasets import default_data_dir  # noqa: E402

DATA = default_data_dir()
needs_data = pytest.mark.skipif(not (DATA / "uci" / "yacht").is_dir(),
                                reason="shared UCI data not found")


def test_mean_se_closed_form():
    # values 1, 2, 3: mean 2, sample std 1, se = 1/sqrt(3)
    m, se, n = mean_se([1, 2, 3])
    assert (m, n) == (2.0, 3)
    assert se == pytest.approx(1 / math.sqrt(3), abs=1e-15)
    assert mean_se([4.0]) == (4.0, 0.0, 1)


def test_table_has_one_line_per_dataset_model():
    rows = [row("a", "m1", "LL", [1, 2]), row("a", "m1", "time", [0.5], unit="s"),
            row("a", "m2", "LL", [3])]
    assert rows[0]["values"] == [1.0, 2.0]  # per split, for paired comparisons
    lines = format_table(rows).splitlines()
    assert lines[0] == "| dataset | model | LL | time (s) |"
    assert len(lines) == 4 and lines[2].startswith("| a | m1 | 1.500 ± 0.500 | 0.500")


def _run(script, *args, tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), "--quick",
                          "--data-dir", str(DATA), "--json", str(out), *args],
                         capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout, json.loads(out.read_text())


@needs_data
def test_uci_quick(tmp_path):
    stdout, data = _run("uci.py", "--csv", str(tmp_path / "rows.csv"), tmp_path=tmp_path)
    rows = data["rows"]
    models = {r["model"].split(" ")[0] for r in rows}
    assert models == {"DKM", "DKM-ARD", "SVGP", "DGP-2", "NNGP", "GP-ARD"}
    assert {r["metric"] for r in rows} == {"test LL", "RMSE", "time/epoch",
                                           "time ratio DKM/DGP-2"}
    # the ratio row is the per-split DKM / DGP-2 seconds per epoch
    get = {(r["model"], r["metric"]): r["mean"] for r in rows}
    assert get[("DKM", "time ratio DKM/DGP-2")] == pytest.approx(
        get[("DKM", "time/epoch")] / get[("DGP-2", "time/epoch")], rel=1e-12)
    assert data["meta"]["threads"] == 1 and data["meta"]["budget"]["yacht"]["epochs"] >= 1
    assert all(set(r) >= {"dataset", "model", "metric", "mean", "se", "n"} for r in rows)
    assert all(math.isfinite(r["mean"]) for r in rows)
    assert "torch" in data["meta"] and "cpu" in data["meta"]
    assert stdout.splitlines()[0].startswith("| dataset | model |")
    assert "DKM/DGP-2 seconds per epoch" in stdout.splitlines()[-1]
    assert (tmp_path / "rows.csv").read_text().startswith("dataset,model,metric")


@needs_data
@pytest.mark.slow
def test_finite_width_quick(tmp_path):
    import importlib.util

    plot = importlib.util.find_spec("matplotlib") is not None  # the "examples" extra
    stdout, data = _run("finite_width.py", *(["--plot", str(tmp_path / "fw.png")] if plot
                                             else []), tmp_path=tmp_path)
    assert all(math.isfinite(r["mean"]) for r in data["rows"])
    # several chains per width: standard errors over chains
    assert all(r["n"] == 2 for r in data["rows"] if r["model"].startswith("N="))
    assert "Gram error" in stdout.splitlines()[-1]
    if plot:
        assert (tmp_path / "fw.png").read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_distributed_quick(tmp_path):
    # 1 and 2 gloo processes: rows for both workloads and process counts, the same DKM loss
    stdout, data = _run("distributed.py", tmp_path=tmp_path)
    models = {r["model"] for r in data["rows"]}
    assert {m.split(",")[1].strip() for m in models} == {"1 proc", "2 proc"}
    assert all(math.isfinite(r["mean"]) for r in data["rows"])
    last = stdout.splitlines()[-1]
    assert last.startswith("Strong scaling") and "DKM final loss equal" in last
    drift = float(last.rsplit(" ", 1)[-1])
    assert drift < 1e-10


def test_conv_dkm_quick(tmp_path):
    pytest.importorskip("mnist1d")
    stdout, data = _run("conv_dkm.py", tmp_path=tmp_path)
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"conv DKM (nu=10)", "conv NNGP (nu=inf)", "FC DKM",
                                         "CNN"}
    assert {r["metric"] for r in rows} == {"accuracy", "test LL", "time/epoch"}
    for r in rows:
        assert math.isfinite(r["mean"])
        if r["metric"] == "accuracy":
            assert 0 <= r["mean"] <= 1
        if r["metric"] == "test LL":
            assert r["mean"] < 0
    assert "conv DKM accuracy" in stdout.splitlines()[-1]


def test_conv_dkm_replot_draws_the_stored_nu_sweep(tmp_path):
    # --replot reads a stored --json file's rows and draws accuracy / LL against nu
    pytest.importorskip("matplotlib")
    rows = [row("mnist1d", f"nu sweep nu={nu:g}", metric, [v])
            for nu, acc in ((1.0, 0.97), (100.0, 0.9), (math.inf, 0.75))
            for metric, v in (("accuracy", acc), ("test LL", math.log(acc)))]
    rows.append(row("mnist1d", "CNN", "accuracy", [0.93]))
    src = tmp_path / "stored.json"
    src.write_text(json.dumps({"meta": {}, "rows": rows}))
    png = tmp_path / "sweep.png"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "conv_dkm.py"),
                          "--replot", str(src), "--plot", str(png)],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    assert png.read_bytes()[:4] == b"\x89PNG"


@needs_data
def test_uci_dkm_val_quick(tmp_path):
    # DKM-val beside GP-ARD: the settings it chose are recorded per split, and the closing
    # line counts the datasets where it is at least as good as the exact ARD GP
    stdout, data = _run("uci.py", "--models", "DKM-val,GP-ARD", "--val-grid",
                        "sqexp:10,sqexp:1000:2", tmp_path=tmp_path)
    rows = data["rows"]
    assert {r["model"] for r in rows} == {"DKM-val", "GP-ARD"}
    assert all(math.isfinite(r["mean"]) for r in rows)
    (choice,) = data["meta"]["chosen"]["yacht"]
    assert data["meta"]["val_grid"] == ["sqexp:10", "sqexp:1000:2"]
    assert choice.rsplit(":", 1)[0] in data["meta"]["val_grid"]  # kernel:nu[:depth]:steps
    assert "DKM-val test LL >= GP-ARD on" in stdout.splitlines()[-1]


def test_uci_dkm_val_folds_hold_every_training_row_out_once():
    # K-fold CV up to --cv-max-train rows: the held-out parts partition the rows and each
    # fit uses exactly the others; above it, one random --val-fraction is held out
    from types import SimpleNamespace

    import torch
    from uci import _val_folds

    args = SimpleNamespace(val_folds=5, cv_max_train=500, val_fraction=0.2)
    folds = _val_folds(277, args, seed=3)
    assert len(folds) == 5
    held = torch.cat([iv for iv, _ in folds])
    assert sorted(held.tolist()) == list(range(277))
    for iv, it in folds:
        assert len(iv) + len(it) == 277 and not set(iv.tolist()) & set(it.tolist())
    ((iv, it),) = _val_folds(691, args, seed=3)
    assert (len(iv), len(it)) == (138, 553)
    assert sorted(torch.cat([iv, it]).tolist()) == list(range(691))
    args.val_folds = 1  # one held-out part whatever the size
    assert len(_val_folds(277, args, seed=3)) == 1


def test_uci_dkm_val_one_standard_error_rule():
    # best mean: nu = 10 at 300 steps, mean 1.0, s.e. over its 4 folds 0.23 (sample std 0.46);
    # within 1.0 - 0.23 = 0.77: (100, 200) at 0.85 and (100, 100) at 0.9, the simplest being
    # the largest nu and then the fewest steps; (1000, 50) at 0.7 is outside; a deeper
    # setting within one s.e. (2 Gram layers, nu = 1000, 0.95) loses to any 1-layer one
    from uci import choose

    scores = {("sqexp", 10.0, 1, 300): [1.4, 0.6, 1.4, 0.6],
              ("sqexp", 100.0, 1, 200): [0.85] * 4,
              ("sqexp", 100.0, 1, 100): [0.9] * 4,
              ("sqexp", 1000.0, 1, 50): [0.7] * 4,
              ("sqexp", 1000.0, 2, 50): [0.95] * 4}
    assert choose(scores, "best") == (("sqexp", 10.0, 1, 300), 1.0)
    assert choose(scores, "1se") == (("sqexp", 100.0, 1, 100), 0.9)
    # one held-out part: no standard error, the best mean whatever the rule
    one = {k: v[:1] for k, v in scores.items()}
    assert choose(one, "1se") == (("sqexp", 10.0, 1, 300), 1.4)
    # the deeper setting is chosen when it is the only one within one s.e. of the best
    deep = {k: v for k, v in scores.items() if k[2] == 2 or k[1] == 10.0}
    deep[("sqexp", 1000.0, 2, 50)] = [1.6] * 4
    assert choose(deep, "1se") == (("sqexp", 1000.0, 2, 50), 1.6)


def test_uci_val_grid_parses_kernel_nu_and_optional_depth():
    import argparse

    import pytest
    from uci import _label, parse_grid

    grid = parse_grid("sqexp:10,relu:0.1:2")
    assert grid == [("sqexp", 10.0, None), ("relu", 0.1, 2)]
    assert [_label(k, nu, dp or 1, 1) for k, nu, dp in grid] == ["sqexp:10", "relu:0.1:2"]
    for bad in ("sqexp", "sqexp:1:2:3", "sqexp:1:0"):
        with pytest.raises(argparse.ArgumentTypeError, match="kernel:nu"):
            parse_grid(bad)


def test_uci_dkm_val_cosine_schedule_only_scores_the_last_step(monkeypatch):
    # with a cosine-annealed learning rate an intermediate step is not a run of that many
    # steps, so only --dkm-steps is a candidate: here the fake fits score step 3 best
    # (constant: chosen) but with cosine the refit must use all 6 steps
    from types import SimpleNamespace

    import torch
    import uci

    fits = []

    def fake_fit(X, y, kernel, nu, depth, args, seed, steps, score=None):
        fits.append((kernel, nu, depth, steps))
        return SimpleNamespace(predict=lambda X: None), 0.1, {3: 1.0, 6: 0.5 - depth}

    monkeypatch.setattr(uci, "_fit_dkm_config", fake_fit)
    monkeypatch.setattr(uci, "gaussian_test_metrics", lambda *a: (0.0, 0.0))
    d = SimpleNamespace(X_train=torch.zeros(50, 2), y_train=torch.zeros(50),
                        X_test=torch.zeros(5, 2), y_test=torch.zeros(5), y_mean=0, y_std=1)
    args = SimpleNamespace(val_folds=5, cv_max_train=500, val_fraction=0.2, val_rule="best",
                           val_depth=1, dkm_steps=6, dkm_schedule="constant",
                           val_grid=[("sqexp", 10.0, 1), ("sqexp", 100.0, 2)])
    assert uci.run_dkm_val(d, args, seed=0)[3] == "sqexp:10:3"
    assert fits[-1] == ("sqexp", 10.0, 1, 3) and len(fits) == 2 * 5 + 1
    args.dkm_schedule = "cosine"
    assert uci.run_dkm_val(d, args, seed=0)[3] == "sqexp:10:6"
    assert fits[-1] == ("sqexp", 10.0, 1, 6)
