"""The NNGP-vs-RBF benchmark script runs end to end in --quick mode."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from pyro_dkm.datasets import default_data_dir

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(not (default_data_dir() / "uci").is_dir(),
                    reason="shared UCI data not found (set PYRO_DKM_DATA)")
def test_nngp_gp_benchmark_quick(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nngp_gp.py"), "--quick",
                          "--json", str(out)], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.startswith("| dataset | model |")
    rows = json.loads(out.read_text())["rows"]
    lls = [r["mean"] for r in rows if r["metric"] == "test_ll"]
    # standardised-target GP log-likelihoods in original units: finite and plausible
    assert lls and all(-10 < v < 5 for v in lls)
