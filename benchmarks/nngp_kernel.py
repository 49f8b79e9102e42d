"""Dense NNGP kernel K(X, X): the plain elementwise composition vs the fused/blocked path.

"elementwise" applies the layers through relu_expectations / erf_expectations (the dense
path before the fused forms: ~10 kernel-sized temporaries per activation, autograd over
each); "fused" is kfn(X) as it is now: without grad, in place in row blocks (peak memory
~ the output); with grad, one autograd node per ReLU with a hand-derived backward.
"grad" times the forward and the backward of K.sum() w.r.t. X and the weight variances.
Each measurement runs in a forked child; peak memory is the child's peak RSS growth over
its --repeats calls (CPU; allocator noise below a few MiB, so no memory ratio there) or
the growth of torch.cuda.max_memory_allocated (GPU). Network serial(Dense(2, .1), Relu,
Dense(2, .1), Relu, Dense(1, .05)) (--depth ReLU layers), d = 8, float64 by default.

    python benchmarks/nngp_kernel.py --sizes 1000,3000,10000 --json out.json
    python benchmarks/nngp_kernel.py --quick
"""

from __future__ import annotations

import multiprocessing as mp
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, print_table, resolve, row, write_json  # noqa: E402

from pyro_dkm.kernels._blocked import elementwise_kernel  # noqa: E402
from pyro_dkm.kernels.nngp import Dense, Relu, serial  # noqa: E402

D = 8
METHODS = ("elementwise", "fused")


def _kfn(depth, weight_var):
    layers = []
    for _ in range(depth):
        layers += [Dense(weight_var, 0.1), Relu()]
    return serial(*layers, Dense(1.0, 0.05))


def _measure(method, n, grad, args, q):
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(n, D, generator=g, dtype=args.torch_dtype).to(args.torch_device)
    w = torch.tensor(2.0, dtype=args.torch_dtype, device=args.torch_device)
    if grad:
        x.requires_grad_()
        w.requires_grad_()
    kfn = _kfn(args.depth, w)
    get = ("nngp", "ntk") if args.get == "both" else args.get

    def call():
        out = kfn(x, get=get) if method == "fused" else elementwise_kernel(kfn, x, get=get)
        out = out if isinstance(out, tuple) else (out,)
        if grad:
            sum(o.sum() for o in out).backward()
        return out

    cuda = args.torch_device.type == "cuda"
    best, mem = float("inf"), 0.0
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated() if cuda else 0
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for _ in range(args.repeats):
        t = time.perf_counter()
        with torch.set_grad_enabled(grad):
            out = call()
        if cuda:
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
        mem = max(mem, torch.cuda.max_memory_allocated() - base if cuda
                  else (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) * 1024)
        # (a sum is finite iff every entry is; torch.isfinite(K) would allocate ~1.1 K here)
        assert all(bool(torch.isfinite(o.sum())) for o in out)
        del out
        x.grad = w.grad = None
    q.put((best, mem / 2**20))


def measure(method, n, grad, args):
    ctx = mp.get_context("fork")
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(method, n, grad, args, q))
    p.start()
    p.join()
    return q.get() if p.exitcode == 0 else None


def main(argv=None):
    p = make_parser(__doc__.splitlines()[0], splits=None)
    p.add_argument("--sizes", default="1000,3000,10000")
    p.add_argument("--depth", type=int, default=2, help="number of Dense+Relu layers")
    p.add_argument("--get", default="nngp", choices=["nngp", "ntk", "both"])
    p.add_argument("--max-grad-n", type=int, default=10000,
                   help="largest N for the runs with gradients")
    p.add_argument("--max-elementwise-grad-n", type=int, default=3000,
                   help="largest N for the elementwise path with gradients (it keeps ~8 N x N "
                        "matrices per activation for the backward: ~13 GB at N = 1e4)")
    p.add_argument("--repeats", type=int, default=2, help="timed calls per child (best kept)")
    p.add_argument("--threads", type=int, default=1, help="torch threads in the children")
    args = resolve(p.parse_args(argv))
    sizes = [300, 600] if args.quick else [int(float(s)) for s in args.sizes.split(",")]
    from tqdm import tqdm

    rows, ratios = [], []
    for n in tqdm(sizes, file=sys.stderr):
        for grad in (False, True):
            if grad and n > args.max_grad_n:
                continue
            tag = "grad" if grad else "no grad"
            res = {}
            for method in METHODS:
                if grad and method == "elementwise" and n > args.max_elementwise_grad_n:
                    continue
                r = measure(method, n, grad, args)
                if r is None:
                    continue
                res[method] = r
                rows.append(row(f"N={n}", method, f"time, {tag}", [r[0]], unit="s"))
                rows.append(row(f"N={n}", method, f"ns/entry, {tag}", [r[0] / n**2 * 1e9]))
                rows.append(row(f"N={n}", method, f"peak mem, {tag}", [r[1]], unit="MiB"))
            if len(res) == 2:
                (te, me), (tf, mf) = res["elementwise"], res["fused"]
                # RSS growth below a few MiB is allocator noise: no memory ratio there
                mr = me / mf if mf >= 4 else float("nan")
                rows.append(row(f"N={n}", "elementwise/fused", f"time ratio, {tag}", [te / tf]))
                rows.append(row(f"N={n}", "elementwise/fused", f"peak mem ratio, {tag}", [mr]))
                ratios.append((n, tag, te / tf, mr))
    print_table(rows)
    if args.json:
        write_json(args.json, rows, benchmark="nngp_kernel", depth=args.depth, get=args.get)
    print(f"Summary ({args.device}, {args.dtype}, depth {args.depth}, {args.get}): "
          + ("; ".join(f"N={n} {tag}: elementwise/fused time {t:.2f}x, peak mem {m:.1f}x"
                       for n, tag, t, m in ratios) or "no comparison"))


if __name__ == "__main__":
    main()
