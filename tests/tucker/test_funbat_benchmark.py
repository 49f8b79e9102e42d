"""Smoke run of ``benchmarks/funbat.py --quick`` (one fold, 2000 entries, rank 2)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_dkm.datasets import default_data_dir

ROOT = Path(__file__).resolve().parents[2]
DATA = default_data_dir()


@pytest.mark.skipif(not (DATA / "tensor" / "beijing_pm25.npz").is_file(),
                    reason="shared tensor data not found")
def test_funbat_benchmark_quick(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "funbat.py"), "--quick", "--data-dir",
         str(DATA), "--datasets", "beijing_pm25", "--json", str(out)],
        capture_output=True, text=True, timeout=300,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    models = {r["model"] for r in rows if r["dataset"] == "beijing_pm25"}
    assert models == {"funbat-tucker-2", "funbat-cp-2", "discrete-tucker-2", "discrete-cp-2",
                      "sgp", "funbat-selected", "discrete-selected", "index-mean-0",
                      "index-mean-1", "index-mean-2", "index-mean-best", "extra-trees"}
    for r in rows:
        if r["dataset"] == "beijing_pm25":
            assert r["metric"] in ("rmse", "mae", "fit_time") and r["n"] == 1
            assert r["mean"] >= 0
    assert {r["model"] for r in rows if r["dataset"] == "synthetic"} == {
        "funbat-tucker-3 N=1000", "funbat-tucker-3 N=4000"}
    assert "Summary: beijing_pm25: best FunBaT" in res.stdout
    assert "validation-selected FunBaT RMSE" in res.stdout
    assert "linear in N" in res.stdout
    # each FunBaT model is fitted from two ALS-start seeds, kept by validation RMSE
    per_restart = [line for line in res.stderr.splitlines()
                   if "validation RMSE per restart:" in line]
    assert len(per_restart) == 2 and all(line.count(",") == 1 for line in per_restart)
