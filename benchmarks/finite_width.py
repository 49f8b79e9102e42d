"""Finite-width check of the DKM theory: wide deep GPs concentrate at the DKM optimum.

A deep GP with ``L`` hidden layers of widths ``N_l = N nu_l`` and ``N`` copies of the
targets as output channels (the likelihood scaled with ``N``) has, as ``N -> inf``, a
posterior over each layer's Gram ``G_l = F_l F_l^T / N_l`` that concentrates at the
maximiser ``G_l*`` of the exact DKM objective (Yang et al., ICML 2023; docs/dkm.md).
For each width we sample the features ``F_l`` by HMC in Pyro (non-centred:
``F_l = chol(K(G_{l-1})) Z_l``, ``Z_l ~ N(0, I)``) on a small subset of a UCI dataset and
report, per layer, the relative Frobenius error of the posterior-mean Gram and the mean
per-sample error against ``G_l*`` (computed with the exact DKM and L-BFGS), next to the
NNGP Gram's error (the nu -> inf answer) for scale.

    python benchmarks/finite_width.py --plot /tmp/finite_width.png
    python benchmarks/finite_width.py --quick
"""

from __future__ import annotations

import math
import os
import sys
import time
from pathlib import Path

# gpytorch imports pykeops, which otherwise prints a CUDA warning to stdout (keep the table clean)
os.environ.setdefault("PYKEOPS_VERBOSE", "0")
os.environ.setdefault("KEOPS_VERBOSE", "0")

import pyro
import pyro.distributions as dist
import torch
from pyro.infer import HMC, MCMC

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import make_parser, mean_se, print_table, resolve, row, write_json  # noqa: E402

from pyro_dkm.datasets import load_uci  # noqa: E402
from pyro_dkm.dkm import ExactDeepKernelMachine, fit_lbfgs  # noqa: E402
from pyro_dkm.linalg import cholesky  # noqa: E402


def dkm_optimum(X, y, depth, nu, noise):
    """G_l* of the exact DKM (ReLU kernels, fixed noise) by L-BFGS, and the NNGP Grams."""
    dkm = ExactDeepKernelMachine(X, y, depth=depth, nu=nu, kernel="relu", noise=noise)
    with torch.no_grad():
        G_nngp = [G.clone() for G in dkm.grams()[0]]
    fit_lbfgs(dkm, grams_only=True)
    with torch.no_grad():
        G_opt = [G.clone() for G in dkm.grams()[0]]
    kernels = [k.kernel() for k in dkm.kernel_layers]
    return G_opt, G_nngp, kernels


def deep_gp_model(G0, Y, widths, kernels, noise):
    """Finite deep GP, non-centred; returns the Grams."""
    P = G0.shape[0]
    G, Gs = G0, []
    for l, (Nl, k) in enumerate(zip(widths, kernels)):
        L = cholesky(k(G), name=f"K_{l + 1}")
        Z = pyro.sample(f"Z{l}", dist.Normal(G0.new_zeros(()), 1.0).expand([P, Nl]).to_event(2))
        F = L @ Z
        G = F @ F.mT / Nl
        Gs.append(G)
    K = kernels[-1](G) + noise * torch.eye(P, dtype=G.dtype)
    L = cholesky(K, name="K_top + noise I")
    pyro.sample("Y", dist.MultivariateNormal(G0.new_zeros(P), scale_tril=L)
                .expand([Y.shape[0]]).to_event(1), obs=Y)
    return Gs


def sample_grams(G0, y, N, depth, nu, kernels, noise, warmup, samples, seed, progbar=True):
    widths = [max(1, round(N * nu)) for _ in range(depth)]
    Y = y.expand(N, -1)  # N output channels (nu_{L+1} = 1): the likelihood scaled with N
    pyro.set_rng_seed(seed)
    kernel = HMC(lambda: deep_gp_model(G0, Y, widths, kernels, noise), step_size=0.05,
                 num_steps=10, adapt_step_size=True, target_accept_prob=0.8)
    mcmc = MCMC(kernel, num_samples=samples, warmup_steps=warmup, disable_progbar=not progbar)
    mcmc.run()
    zs = mcmc.get_samples()
    Gs = [[] for _ in range(depth)]
    for s in range(samples):
        cond = pyro.poutine.condition(deep_gp_model, {f"Z{l}": zs[f"Z{l}"][s]
                                                      for l in range(depth)})
        with torch.no_grad():
            for l, G in enumerate(cond(G0, Y, widths, kernels, noise)):
                Gs[l].append(G)
    return [torch.stack(g) for g in Gs]


def rel(A, B):
    return (torch.linalg.matrix_norm(A - B) / torch.linalg.matrix_norm(B)).item()


def main(argv=None) -> int:
    p = make_parser(__doc__.splitlines()[0] + "\n\n" + "\n".join(__doc__.splitlines()[2:]),
                    splits=None)
    p.add_argument("--dataset", default="yacht")
    p.add_argument("--points", type=int, default=12, help="data points P")
    p.add_argument("--depth", type=int, default=2)
    p.add_argument("--nu", type=float, default=1.0)
    p.add_argument("--noise", type=float, default=0.1)
    p.add_argument("--widths", default="4,8,16,32", help="multipliers N")
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--chains", type=int, default=4,
                   help="independent chains per width (standard errors are over chains)")
    p.add_argument("--plot", type=Path, default=None, help="write the error-vs-width figure")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = resolve(p.parse_args(argv))
    torch.set_num_threads(args.threads)
    if args.quick:
        args.points, args.widths, args.warmup, args.samples = 6, "2,8", 20, 20
        args.chains = min(args.chains, 2)
    torch.manual_seed(args.seed)
    d = load_uci(args.dataset, 0, data_dir=Path(args.data_dir) / "uci")
    g = torch.Generator().manual_seed(args.seed)
    idx = torch.randperm(d.X_train.shape[0], generator=g)[:args.points]
    X = torch.cat([d.X_train[idx], torch.ones(args.points, 1, dtype=torch.float64)], 1)
    y = d.y_train[idx]
    G_opt, G_nngp, kernels = dkm_optimum(X, y, args.depth, args.nu, args.noise)
    G0 = X @ X.mT / X.shape[1]
    Ns = [int(w) for w in args.widths.split(",")]
    rows = []
    # curves[kind][l] = [(mean, se) per width], kind "mean" (|E[G] - G*|) or "each"
    curves = {k: {l: [] for l in range(args.depth)} for k in ("mean", "each")}
    t0 = time.perf_counter()
    for N in Ns:
        errs_mean = {l: [] for l in range(args.depth)}
        errs_each = {l: [] for l in range(args.depth)}
        for c in range(args.chains):
            Gs = sample_grams(G0, y, N, args.depth, args.nu, kernels, args.noise,
                              args.warmup, args.samples, args.seed + 1000 * c + N,
                              progbar=False)
            for l in range(args.depth):
                errs_mean[l].append(rel(Gs[l].mean(0), G_opt[l]))
                errs_each[l].append(sum(rel(G, G_opt[l]) for G in Gs[l]) / len(Gs[l]))
        print(f"N={N}: {args.chains} chain(s) done, {time.perf_counter() - t0:.0f} s",
              file=sys.stderr, flush=True)
        ds, label = f"{args.dataset} P={args.points}", f"N={N} (width {round(N * args.nu)})"
        for l in range(args.depth):
            rows.append(row(ds, label, f"layer {l + 1} rel. err of E[G]", errs_mean[l]))
            rows.append(row(ds, label, f"layer {l + 1} mean rel. err of G", errs_each[l]))
            for kind, errs in (("mean", errs_mean[l]), ("each", errs_each[l])):
                m, se, _ = mean_se(errs)
                curves[kind][l].append((m, se))
    for l in range(args.depth):
        rows.append(row(f"{args.dataset} P={args.points}", "NNGP (nu=inf) Gram",
                        f"layer {l + 1} rel. err of E[G]", [rel(G_nngp[l], G_opt[l])]))
    print_table(rows)
    top = args.depth - 1
    each = [m for m, _ in curves["each"][top]]
    mean = [m for m, _ in curves["mean"][top]]
    summary = (f"top-layer Gram error vs G* (mean over {args.chains} chain(s)): per sample "
               f"{each[0]:.3f} at N={Ns[0]} -> {each[-1]:.3f} at N={Ns[-1]} (log-log slope "
               f"{loglog_slope(Ns, each):.2f}), posterior mean {mean[0]:.3f} -> {mean[-1]:.3f} "
               f"(slope {loglog_slope(Ns, mean):.2f}); NNGP Gram error "
               f"{rel(G_nngp[-1], G_opt[-1]):.3f}; {time.perf_counter() - t0:.0f} s")
    print(summary)
    if args.json:
        write_json(args.json, rows, summary=summary, argv=sys.argv[1:] if argv is None else argv)
    if args.plot:
        plot(args.plot, Ns, curves, [rel(G_nngp[l], G_opt[l]) for l in range(args.depth)],
             title=f"{args.dataset}, P={args.points}, nu={args.nu}, {args.chains} HMC chains "
                   f"x {args.samples} samples")
    return 0


def loglog_slope(xs, ys) -> float:
    """Least-squares slope of log(ys) against log(xs)."""
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    return (sum((a - mx) * (b - my) for a, b in zip(lx, ly))
            / sum((a - mx) ** 2 for a in lx))


def plot(path, Ns, curves, nngp_errs, title=""):
    """Error of the sampled Grams against the DKM optimum vs width (log-log, +- 1 s.e.)."""
    import matplotlib
    import matplotlib.ticker
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(5.5, 4))
    for l in curves["each"]:
        for kind, style, what in (("each", "o-", "per-sample |G - G*|"),
                                  ("mean", "s--", "posterior mean |E[G] - G*|")):
            m = [a for a, _ in curves[kind][l]]
            se = [b for _, b in curves[kind][l]]
            ax.errorbar(Ns, m, yerr=se, fmt=style, color=f"C{l}", capsize=3, ms=4,
                        label=f"layer {l + 1}: {what}")
        ax.axhline(nngp_errs[l], ls=":", color=f"C{l}", label=f"layer {l + 1}: NNGP Gram")
    ref = curves["each"][max(curves["each"])][0][0]
    ax.loglog(Ns, [ref * (N / Ns[0]) ** -0.5 for N in Ns], color="grey", lw=0.8,
              label="N^-1/2")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xticks(Ns, [str(N) for N in Ns])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlabel("width multiplier N (N_l = N nu_l)")
    ax.set_ylabel("relative Frobenius error vs DKM optimum G*")
    ax.set_title(title, fontsize=8)
    ax.legend(fontsize=6)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
