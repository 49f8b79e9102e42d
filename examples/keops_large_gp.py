"""Exact NNGP GP and Student-t process regression with lazy kernels (CG, never K).

Synthetic data y = sin(x_1 + x_2) + N(0, 0.1^2), x ~ N(0, I_8). Prints the test RMSE of
the posterior mean (shared by the GP and the Student-t process), and on the first
--n-var test points the Gaussian and Student-t predictive log-likelihoods.

    python examples/keops_large_gp.py                 # N = 5000: about 30 s on 2 CPU cores
    python examples/keops_large_gp.py --n 20000       # ~15 min on 2 CPU cores
    python examples/keops_large_gp.py --n 200000 --device cuda

``--backend auto`` (default) runs the products through KeOps on CUDA and through the
tiled torch kernel on CPU (faster there); ``keops`` / ``torch`` force one.
"""

import argparse
import math
import os
import time

os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

import torch  # noqa: E402

from pyro_dkm.kernels.nngp import Dense, Relu, serial  # noqa: E402
from pyro_dkm.kernels.solvers import exact_predict  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=5000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-var", type=int, default=32, help="test points given a variance")
    p.add_argument("--noise", type=float, default=0.01)
    p.add_argument("--cg-tol", type=float, default=1e-2)
    p.add_argument("--precond-rank", type=int, default=100)
    p.add_argument("--a", type=float, default=2.0, help="InvGamma(a, b) scale prior")
    p.add_argument("--b", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", choices=("auto", "keops", "torch"), default="auto")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    g = torch.Generator().manual_seed(args.seed)
    x = torch.randn(args.n + args.n_test, 8, generator=g, dtype=torch.float64)
    y = torch.sin(x[:, :2].sum(-1)) + 0.1 * torch.randn(len(x), generator=g,
                                                        dtype=torch.float64)
    x, y = x.to(args.device), y.to(args.device)
    xt, yt, xs, ys = x[:args.n], y[:args.n], x[args.n:], y[args.n:]
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(1.0, 0.05))
    t = time.perf_counter()
    cg = dict(tol=args.cg_tol, max_iter=500, precond_rank=args.precond_rank, progress=True,
              use_keops={"auto": "auto", "keops": True, "torch": False}[args.backend])
    mean, _, quad = exact_predict(kfn, xt, yt, xs, noise=args.noise, **cg)
    rmse = (mean - ys).pow(2).mean().sqrt().item()
    print(f"N={args.n}  test RMSE={rmse:.4f} (noise std 0.1)  time={time.perf_counter() - t:.1f}s")

    # Predictive variances on a few test points: one block CG solve per 16 points.
    m = args.n_var
    mean_v, var, _ = exact_predict(kfn, xt, yt, xs[:m], noise=args.noise, variance=True, **cg)
    gp = torch.distributions.Normal(mean_v, (var + args.noise).sqrt())
    # Student-t process (docs/processes.md): noise folded into the kernel,
    # a' = a + n/2, b' = b + y^T Ky^-1 y / 2, scale^2 = b'/a' (k** + noise - k*^T Ky^-1 k*).
    a_post, b_post = args.a + args.n / 2, args.b + quad / 2
    tp = torch.distributions.StudentT(2 * a_post, mean_v,
                                      ((b_post / a_post) * (var + args.noise)).sqrt())
    print(f"first {m} test points: GP log-lik {gp.log_prob(ys[:m]).mean().item():.3f}, "
          f"Student-t log-lik {tp.log_prob(ys[:m]).mean().item():.3f} "
          f"(df={2 * a_post:.0f}, scale factor sqrt(b'/a')={math.sqrt(b_post / a_post):.3f})")


if __name__ == "__main__":
    main()
