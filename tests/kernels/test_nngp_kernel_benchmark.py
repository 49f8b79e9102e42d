"""benchmarks/nngp_kernel.py runs end to end in --quick mode."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_nngp_kernel_benchmark_quick(tmp_path):
    out = tmp_path / "rows.json"
    res = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "nngp_kernel.py"), "--quick",
                          "--repeats", "1", "--json", str(out)],
                         capture_output=True, text=True, timeout=300,
                         env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr[-2000:]
    rows = json.loads(out.read_text())["rows"]
    models = {r["model"] for r in rows}
    assert {"elementwise", "fused", "elementwise/fused"} <= models
    assert res.stdout.strip().splitlines()[-1].startswith("Summary")
