"""benchmarks/scale_mixtures.py runs end to end in --quick mode."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_dkm.datasets import default_data_dir

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(not (default_data_dir() / "uci" / "yacht").is_dir(),
                    reason="shared UCI data not found (set PYRO_DKM_DATA)")
def test_scale_mixtures_benchmark_quick(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "scale_mixtures.py"),
                          "--quick", "--no-digits", "--json", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
                              "PATH": "/usr/bin:/bin", "PYRO_DKM_DATA": str(default_data_dir())})
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("| dataset | model |")
    assert "Test NLL wins vs NNGP-GP" in res.stdout.splitlines()[-1]
    rows = json.loads(out.read_text())["rows"]
    models = {r["model"] for r in rows if r["metric"] == "test NLL"}
    assert models == {"NNGP-GP", "NNGP-GP (s=1)", "Student-t", "Student-t (a fixed)",
                      "Burr XII", "GP + t-noise", "Student-t + t-noise"}
    # the held-shape Student-t is the GP's predictive with t tails: its NLL difference is
    # the first-order tail term -(E z^4 - 2 E z^2 - 1) / (4 (2a + n)) up to O(n^-2)
    get = {(r["dataset"], r["model"], r["metric"]): r["mean"] for r in rows}
    for v in ("standard", "shifted", "cauchy"):
        d = f"yacht/{v}"
        measured = get[(d, "Student-t (a fixed)", "NLL - GP's")]
        assert measured == pytest.approx(get[(d, "Student-t (a fixed)", "test NLL")]
                                         - get[(d, "NNGP-GP", "test NLL")], abs=1e-12)
        assert measured == pytest.approx(get[(d, "Student-t (a fixed)",
                                              "first-order NLL - GP's")], rel=0.05, abs=2e-5)
        assert get[(d, "Student-t (a fixed)", "RMSE")] == pytest.approx(
            get[(d, "NNGP-GP", "RMSE")], rel=1e-8)
    datasets = {r["dataset"] for r in rows if r["metric"] == "test NLL"}
    assert datasets == {"yacht/standard", "yacht/shifted", "yacht/cauchy"}
    assert all(math.isfinite(r["mean"]) for r in rows)
    # yacht in original units: test NLL of a fitted model is in a plausible range
    nll = [r["mean"] for r in rows
           if r["dataset"] == "yacht/standard" and r["metric"] == "test NLL"]
    assert all(-2 < v < 4 for v in nll)
    assert "GP+t < GP on" in res.stdout.splitlines()[-1]
    # the high-order quadrature is (near) exact against its own reference
    quad = [r["mean"] for r in rows if r["model"] == "quadrature (128 nodes)"
            and r["metric"] == "mean log pred. abs. error"]
    assert quad and quad[0] < 1e-8
