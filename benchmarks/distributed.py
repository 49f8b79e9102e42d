"""Strong scaling on torch.distributed: the sparse DKM fit and the sharded NNGP product.

Two workloads, each run with 1 and with K processes (``--procs``, default 1,2; launched
by ``torch.distributed.run``, gloo on CPU, one intra-op thread per process) in one run:

* **DKM training**: a sparse DKM (2 Gram layers, ReLU, ``--inducing`` points) on the
  largest UCI dataset found (kin8nm here), the same global minibatch (``--batch``) split
  across the ranks, for ``--epochs`` epochs; seconds per epoch.
* **Sharded product**: ``(K + s I) @ v`` with the depth-2 ReLU NNGP kernel at ``--n``
  points (``ShardedNNGPOperator``, torch tiles), one product taking seconds on one core;
  seconds per product (median of ``--repeats``).

The table gives seconds, the speed-up T(1)/T(K) and the parallel efficiency
T(1)/(K T(K)); the closing line summarises both at the largest K.

    python benchmarks/distributed.py                 # 1 vs 2 processes
    python benchmarks/distributed.py --procs 1,2,4   # on a machine with more cores
    python benchmarks/distributed.py --quick
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, resolve, row, write_json  # noqa: E402


def _worker(args) -> None:
    """One rank: run both workloads, rank 0 writes the timings."""
    import torch
    import torch.distributed as dist

    from pyro_dkm.datasets import load_uci
    from pyro_dkm.distributed import ShardedNNGPOperator
    from pyro_dkm.dkm import DeepKernelMachine, fit, select_inducing_points
    from pyro_dkm.kernels import Dense, Relu, serial

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, size = dist.get_rank(), dist.get_world_size()
    out = {"world": size}
    d = load_uci(args.dataset, 0, data_dir=args.data_dir / "uci")
    X = torch.cat([d.X_train, torch.ones(d.X_train.shape[0], 1, dtype=d.X_train.dtype)], 1)
    y = d.y_train
    if args.max_train:
        X, y = X[:args.max_train], y[:args.max_train]
    model = DeepKernelMachine(select_inducing_points(X, args.inducing, seed=args.seed),
                              depth=2, nu=1.0)
    res = fit(model, X, y, epochs=args.epochs, batch_size=args.batch, lr=1e-2,
              seed=args.seed, progress=False)
    out["dkm_s_per_epoch"] = res.seconds_per_epoch
    out["dkm_final_loss"] = res.losses[-1]
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.points, 8, generator=g, dtype=torch.float64)
    v = torch.randn(args.points, 1, generator=g, dtype=torch.float64)
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(1.0, 0.05))
    op = ShardedNNGPOperator(kfn, x, noise=0.1, use_keops=False)
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        t0 = time.perf_counter()
        prod = op._matmul(v)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    out["product_s"] = statistics.median(times)
    out["product_norm"] = float(prod.norm())
    if rank == 0:
        Path(args.worker_out).write_text(json.dumps(out))
    dist.destroy_process_group()


def _largest_uci(data_dir: Path) -> str:
    from pyro_dkm.datasets import list_uci_datasets, load_uci

    names = list_uci_datasets(data_dir / "uci")
    if not names:
        raise SystemExit(f"no UCI datasets under {data_dir / 'uci'}")
    return max(names, key=lambda n: load_uci(n, 0, data_dir=data_dir / "uci").X_train.shape[0])


def main(argv=None) -> None:
    p = make_parser(__doc__.splitlines()[0], splits=None)
    p.add_argument("--procs", default="1,2", help="comma-separated process counts")
    p.add_argument("--epochs", type=int, default=5)
    p.add_argument("--batch", type=int, default=4096, help="global minibatch size")
    p.add_argument("--inducing", type=int, default=200)
    p.add_argument("--max-train", type=int, default=0, help="cap the training set (0: all)")
    p.add_argument("--points", type=int, default=8000, help="points of the sharded product")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--worker", action="store_true", help=argparse_hidden())
    p.add_argument("--worker-out", default=None, help=argparse_hidden())
    p.add_argument("--dataset", default=None, help="UCI dataset (default: the largest)")
    args = resolve(p.parse_args(argv))
    if args.worker:
        return _worker(args)
    if args.quick:
        args.epochs, args.batch, args.inducing, args.max_train = 1, 256, 20, 1024
        args.points, args.repeats = 1500, 2
    if args.dataset is None:
        args.dataset = args.datasets[0] if args.datasets else _largest_uci(args.data_dir)
    procs = [int(k) for k in args.procs.split(",") if k]
    if not procs or procs[0] != 1 or procs != sorted(procs):
        raise SystemExit(f"--procs must start at 1 and increase, got {args.procs!r}")
    results = {}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYKEOPS_VERBOSE": "0", "KEOPS_VERBOSE": "0"}
    with tempfile.TemporaryDirectory() as tmp:
        for k in procs:
            out = Path(tmp) / f"w{k}.json"
            cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node", str(k), str(Path(__file__).resolve()), "--worker",
                   "--worker-out", str(out), "--data-dir", str(args.data_dir),
                   "--dataset", args.dataset, "--epochs", str(args.epochs),
                   "--batch", str(args.batch), "--inducing", str(args.inducing),
                   "--max-train", str(args.max_train), "--points", str(args.points),
                   "--repeats", str(args.repeats), "--seed", str(args.seed)]
            print(f"running {k} process(es)...", file=sys.stderr, flush=True)
            res = subprocess.run(cmd, capture_output=True, text=True, env=env)
            if res.returncode != 0:
                raise SystemExit(f"{k} processes failed:\n{res.stderr[-3000:]}")
            results[k] = json.loads(out.read_text())
    rows = []
    base = results[procs[0]]
    workloads = (("DKM training", "dkm_s_per_epoch", "time/epoch"),
                 (f"sharded product N={args.points}", "product_s", "time/product"))
    summary = []
    for name, key, metric in workloads:
        for k in procs:
            t = results[k][key]
            speed = base[key] / t
            rows.append(row(args.dataset if key.startswith("dkm") else "synthetic",
                            f"{name}, {k} proc", metric, [t], unit="s"))
            rows.append(row(args.dataset if key.startswith("dkm") else "synthetic",
                            f"{name}, {k} proc", "speed-up", [speed]))
            rows.append(row(args.dataset if key.startswith("dkm") else "synthetic",
                            f"{name}, {k} proc", "efficiency", [speed / k]))
        kmax = procs[-1]
        summary.append(f"{name}: {base[key] / results[kmax][key]:.2f}x at {kmax} processes "
                       f"(efficiency {base[key] / results[kmax][key] / kmax:.0%})")
    # the same global batches: the losses agree across process counts
    drift = max(abs(results[k]["dkm_final_loss"] - base["dkm_final_loss"]) for k in procs)
    print_table(rows)
    print("Strong scaling (gloo, 1 thread per process): " + "; ".join(summary)
          + f"; DKM final loss equal across process counts to {drift:.1e}")
    if args.json:
        write_json(args.json, rows, procs=procs, dataset=args.dataset, epochs=args.epochs,
                   batch=args.batch, points=args.points)


def argparse_hidden():
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
