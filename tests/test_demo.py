"""The demo runs end to end: table, baseline and figure (few steps)."""

import math

from pyro_dkm import demo


def test_demo_prints_both_models_and_writes_its_figure(tmp_path, capsys):
    path = tmp_path / "demo.png"
    assert demo.main(["--steps", "3", "--plot", str(path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "NNGP limit, nu = inf" in out and "sparse DKM" in out
    assert f"figure written to {path}" in out and path.stat().st_size > 1000
    r = demo.run(steps=3, baseline=True)
    assert all(math.isfinite(v) for v in (r["rmse"], r["test_ll"], r["baseline"]["rmse"]))
