"""Dense vs KeOps NNGP kernel: time and peak memory of one matvec and of a full solve.

For each N: "dense" materialises K = kfn(X) (+ noise I) and does K @ v, and solves by
Cholesky; "blocked" does K @ v in torch one tile of K at a time (keops_matmul with
use_keops=False: never holds K whole; of the symmetric K only the upper tiles); "keops"
does the lazy K @ v through KeOps. Both lazy ones solve (K + noise I) a = y by our
preconditioned CG (pyro_dkm.kernels.solvers.cg_solve: pivoted-Cholesky preconditioner of rank
--precond-rank, relative residual --cg-tol). Each measurement runs in a forked child
process; peak memory is the child's peak RSS growth (CPU) or
torch.cuda.max_memory_allocated (GPU). The network is serial(Dense, Relu, Dense, Relu,
Dense) on d = 8 inputs, float64 by default. Optionally (--gp-n) an exact NNGP GP
regression on synthetic data (y = sin(x_1 + x_2) + N(0, 0.1^2)) too big for dense, with
its test RMSE (the noise floor is 0.1).

    python benchmarks/keops.py --sizes 1000,3000,10000 --json out.json
    python benchmarks/keops.py --sizes 1000,10000,100000,1000000 --gp-n 200000 --device cuda
    python benchmarks/keops.py --quick
"""

from __future__ import annotations

import multiprocessing as mp
import os
import resource
import sys
import time
from pathlib import Path

os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, resolve, row, write_json  # noqa: E402

from pyro_dkm.kernels.keops import NNGPOperator, keops_matmul  # noqa: E402
from pyro_dkm.kernels.nngp import Dense, Relu, serial  # noqa: E402
from pyro_dkm.kernels.solvers import cg_solve, exact_predict  # noqa: E402

D = 8
NOISE = 0.1


def _kfn(depth=2):
    """serial(Dense(2, 0.1), Relu) x depth, then Dense(1, 0.05)."""
    return serial(*[m for _ in range(depth) for m in (Dense(2.0, 0.1), Relu())],
                  Dense(1.0, 0.05))


def _data(n, seed, dtype, device):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g, dtype=dtype)
    y = torch.sin(x[:, :2].sum(-1)) + 0.1 * torch.randn(n, generator=g, dtype=dtype)
    return x.to(device), y.to(device)


def _measure(task, n, args, q):
    x, y = _data(n, args.seed, args.torch_dtype, args.torch_device)
    device = args.torch_device
    calls = [0]
    kfn = _kfn()
    v = y[:, None]
    if task.startswith("keops"):  # compile/warm up outside the timing
        keops_matmul(kfn, x[:2000], x[:2000], v[:2000], use_keops=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t = time.perf_counter()
    if task == "dense_matvec":
        out = kfn(x) @ v
    elif task == "keops_matvec":
        out = keops_matmul(kfn, x, None, v, use_keops=True)
    elif task == "blocked_matvec":  # torch, tiles of K (upper ones for K(x, x)): never K whole
        out = keops_matmul(kfn, x, None, v, use_keops=False)
    elif task == "dense_solve":
        Kd = kfn(x)
        Kd.diagonal().add_(NOISE)
        out = torch.cholesky_solve(v, torch.linalg.cholesky(Kd))
    else:  # keops_solve / blocked_solve: our preconditioned CG on the lazy operator
        info = {}
        op = NNGPOperator(kfn, x, noise=NOISE, use_keops=task == "keops_solve")
        out = cg_solve(op, v, tol=args.cg_tol, max_iter=args.cg_iters,
                       precond_rank=args.precond_rank, info=info)
        calls[0] = info["iterations"]
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t
    mem = (torch.cuda.max_memory_allocated() if device.type == "cuda"
           else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
    assert bool(torch.isfinite(out).all())
    q.put((dt, mem / 2**20, calls[0] if task in ("keops_solve", "blocked_solve") else None))


def measure(task, n, args):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(task, n, args, q))
    p.start()
    p.join()
    if p.exitcode != 0:
        return None
    return q.get()


def gp_regression(n, args):
    """Exact NNGP GP regression (preconditioned CG) on n synthetic training points; returns
    (test RMSE, seconds, CG iterations, final relative residual)."""
    x, y = _data(n + 2000, args.seed, args.torch_dtype, args.torch_device)
    kfn = _kfn(args.gp_depth)
    info = {}
    t = time.perf_counter()
    mean, _, _ = exact_predict(kfn, x[:n], y[:n], x[n:], noise=NOISE,
                               use_keops={"keops": True, "torch": False}[args.gp_backend],
                               tol=args.gp_cg_tol, max_iter=args.gp_cg_iters,
                               precond_rank=args.gp_precond_rank, info=info, progress=True)
    rmse = float((mean - y[n:]).pow(2).mean().sqrt())
    return rmse, time.perf_counter() - t, info["iterations"], info["residual"]


def main(argv=None):
    p = make_parser(__doc__.splitlines()[0], splits=None)
    p.add_argument("--sizes", default="1000,3000,10000")
    p.add_argument("--max-dense-n", type=int, default=10000,
                   help="largest N for the dense path (memory: ~8 N^2 bytes per live matrix)")
    p.add_argument("--max-solve-n", type=int, default=10000)
    p.add_argument("--max-blocked-n", type=int, default=10 ** 9,
                   help="largest N for the tiled torch matvec (memory O(N), time O(N^2))")
    p.add_argument("--cg-tol", type=float, default=1e-6)
    p.add_argument("--cg-iters", type=int, default=1000)
    p.add_argument("--precond-rank", type=int, default=100,
                   help="rank of the pivoted-Cholesky CG preconditioner (0: none)")
    p.add_argument("--gp-n", type=int, default=0, help="N of the large GP regression (0: skip)")
    p.add_argument("--gp-cg-tol", type=float, default=1e-2)
    p.add_argument("--gp-cg-iters", type=int, default=100)
    p.add_argument("--gp-depth", type=int, default=2, help="ReLU layers of the GP's network")
    p.add_argument("--gp-backend", choices=("keops", "torch"), default="keops",
                   help="lazy products of the GP run: KeOps, or torch tiles (faster on CPU)")
    p.add_argument("--gp-precond-rank", type=int, default=100)
    args = resolve(p.parse_args(argv))
    sizes = [1000, 2000] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    rows, ratios = [], []
    from tqdm import tqdm

    for n in tqdm(sizes, file=sys.stderr):
        res = {}
        for task in ("dense_matvec", "blocked_matvec", "keops_matvec", "dense_solve",
                     "blocked_solve", "keops_solve"):
            if task.startswith("dense") and n > args.max_dense_n:
                continue
            if task.startswith("blocked") and n > args.max_blocked_n:
                continue
            if task.endswith("solve") and n > args.max_solve_n:
                continue
            r = measure(task, n, args)
            if r is None:
                continue
            res[task] = r
            method, what = task.split("_")
            rows.append(row(f"N={n}", method, f"{what} time", [r[0]], unit="s"))
            rows.append(row(f"N={n}", method, f"{what} peak mem", [r[1]], unit="MiB"))
            if r[2] is not None:
                rows.append(row(f"N={n}", method, "CG iterations", [r[2]]))
        for base, lazy, what in (("dense", "keops", "matvec"), ("blocked", "keops", "matvec"),
                                 ("dense", "blocked", "matvec"), ("dense", "keops", "solve"),
                                 ("dense", "blocked", "solve")):
            if f"{base}_{what}" in res and f"{lazy}_{what}" in res:
                ratio = res[f"{base}_{what}"][0] / res[f"{lazy}_{what}"][0]
                rows.append(row(f"N={n}", f"{base}/{lazy}", f"{what} time", [ratio]))
                ratios.append((n, f"{what} {base}/{lazy}", ratio))
    if args.gp_n:
        rmse, secs, iters, resid = gp_regression(args.gp_n, args)
        name = f"{args.gp_backend} exact NNGP GP (depth {args.gp_depth})"
        rows.append(row(f"synthetic N={args.gp_n}", name, "test RMSE", [rmse]))
        rows.append(row(f"synthetic N={args.gp_n}", name, "time", [secs], unit="s"))
        rows.append(row(f"synthetic N={args.gp_n}", name, "CG iterations", [iters]))
        rows.append(row(f"synthetic N={args.gp_n}", name, "CG relative residual", [resid]))
    print_table(rows)
    if args.json:
        write_json(args.json, rows, benchmark="keops")
    best = [f"N={n} {w} {r:.2f}x" for n, w, r in ratios if n == max(
        m for m, _, _ in ratios)]
    print(f"Summary ({args.device}): " + ("; ".join(best) if best else "no dense comparison")
          + f"; KeOps up to N={max(sizes)}")


if __name__ == "__main__":
    main()
