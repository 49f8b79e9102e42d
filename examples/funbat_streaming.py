"""Stream a tensor in time order into FunBaT: forecast each week, absorb it, move on.

python examples/funbat_streaming.py [--beijing --data-dir DIR] [--warmup 0.2] [--week 7]

FunctionalTucker.partial_fit continues the time mode's Kalman filter over each new week's
coordinates (cost linear in the week's entries; the other modes, the core and the noise
are held), and smooth() runs the RTS pass at the end. Printed per week: the RMSE of the
forecast made before the week arrived and the RMSE after absorbing it. At the end the
streamed model is compared with a batch fit of all the data (same hyper-parameters and
sweeps) on held-out entries.

Default data: generated (8 sensors x 24 hours x 120 days, a smooth rank-2 signal plus
noise). --beijing streams fold 0 of Beijing PM2.5 (shared tensor data, not bundled:
--data-dir DIR holding tensor/beijing_pm25.npz, or PYRO_DKM_DATA).
"""

import argparse
import os
import time
from pathlib import Path

import torch

from pyro_dkm.tucker import FunctionalTucker


def generated(seed=0, n=12000):
    g = torch.Generator().manual_seed(seed)
    s = torch.randint(0, 8, (n,), generator=g).double()
    h = torch.randint(0, 24, (n,), generator=g).double()
    d = torch.randint(0, 120, (n,), generator=g).double()
    f = (torch.sin(s / 2) * torch.cos(2 * torch.pi * h / 24) * (1 + torch.sin(d / 9))
         + 0.5 * torch.cos(s / 3) * torch.sin(d / 5))
    y = f + 0.1 * torch.randn(n, generator=g, dtype=torch.float64)
    X = torch.stack([s, h, d / 12.0], 1)  # days scaled to [0, 10]
    test = torch.rand(n, generator=g) < 0.2
    return X[~test], y[~test], X[test], y[test], 1.0 / 12.0, ["sensor", "hour", "day"]


def beijing(data_dir: Path):
    from pyro_dkm.datasets import load_tensor_fold

    path = data_dir / "tensor" / "beijing_pm25.npz"
    if not path.is_file():
        raise SystemExit(f"--beijing needs the Beijing PM2.5 tensor data ({path} not found): "
                         f"pass --data-dir DIR or set PYRO_DKM_DATA")
    d = load_tensor_fold(path, 0)
    t = lambda a: torch.as_tensor(a, dtype=torch.float64)  # noqa: E731
    u = torch.unique(t(d["train_coord"][:, 2]))
    return (t(d["train_coord"]), t(d["train_value"]), t(d["test_coord"]), t(d["test_value"]),
            float(u.diff().median()), ["temperature", "pressure", "day"])


def rmse(p, y):
    return float(((p - y) ** 2).mean().sqrt())


def main():
    p = argparse.ArgumentParser(description=__doc__)
    env = os.environ.get("PYRO_DKM_DATA")
    p.add_argument("--beijing", action="store_true")
    p.add_argument("--data-dir", type=Path,
                   default=Path(env) if env else Path(__file__).resolve().parents[2] / "shared"
                   / "data")
    p.add_argument("--warmup", type=float, default=0.2, help="fraction of days fitted first")
    p.add_argument("--week", type=int, default=7, help="days per streamed chunk")
    p.add_argument("--max-iter", type=int, default=60)
    p.add_argument("--rank", type=int, default=3)
    a = p.parse_args()
    X, y, Xt, yt, day, names = beijing(a.data_dir) if a.beijing else generated()
    order = torch.argsort(X[:, 2], stable=True)
    X, y = X[order], y[order]
    kw = dict(nu=1.5, lengthscale=[1.0, 1.0, 0.3], max_iter=a.max_iter, damping=0.9,
              progress=False, standardise=True)
    t_cut = float(X[:, 2].min() + a.warmup * (X[:, 2].max() - X[:, 2].min()))
    first = X[:, 2] < t_cut
    t0 = time.perf_counter()
    m = FunctionalTucker([a.rank] * 3, **kw).fit(X[first], y[first])
    print(f"warm-up fit on {int(first.sum())} entries (days before {t_cut / day:.0f}): "
          f"{time.perf_counter() - t0:.1f} s")
    print("| week | entries | forecast RMSE | RMSE after absorbing | ms |")
    print("|---|---|---|---|---|")
    Xr, yr = X[~first], y[~first]
    lo, week, stream_s = t_cut, 0, 0.0
    while lo <= float(Xr[:, 2].max()):
        hi = lo + a.week * day
        sel = (Xr[:, 2] >= lo) & (Xr[:, 2] < hi)
        lo = hi
        if not sel.any():
            continue
        week += 1
        fc = rmse(m.predict(Xr[sel]).mean, yr[sel])
        t0 = time.perf_counter()
        m.partial_fit(Xr[sel], yr[sel])
        stream_s += time.perf_counter() - t0
        after = rmse(m.predict(Xr[sel]).mean, yr[sel])
        if week <= 5 or week % 10 == 0:
            print(f"| {week} | {int(sel.sum())} | {fc:.4f} | {after:.4f} | "
                  f"{1e3 * (time.perf_counter() - t0):.0f} |")
    m.smooth()
    streamed = rmse(m.predict(Xt).mean, yt)
    t0 = time.perf_counter()
    batch = FunctionalTucker([a.rank] * 3, **kw).fit(X, y)
    batch_s = time.perf_counter() - t0
    print(f"\n{week} weeks streamed in {stream_s:.1f} s; held-out RMSE after smoothing: "
          f"streamed {streamed:.4f}, batch fit of all data {rmse(batch.predict(Xt).mean, yt):.4f} "
          f"({batch_s:.1f} s); modes: {', '.join(names)}")


if __name__ == "__main__":
    main()
