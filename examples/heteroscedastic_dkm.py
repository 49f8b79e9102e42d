"""Two deep kernel machines in one Pyro model: a heteroscedastic regression.

One DKM models the mean, a second one the log noise variance; both are latent functions
(``f = self.mean(X)``) inside a user's ``PyroModule``, trained by plain
``SVI(Trace_ELBO)`` with minibatches drawn by the user (``pyro.plate(subsample=idx)``).
The data are generated with a known noise function, so the learned log noise can be
compared with the truth; a homoscedastic DKM (one DKM, Gaussian likelihood) is the
baseline. Prints test log-likelihood for both and the correlation of the learned log noise
with the true one; ``--plot PATH`` draws both fits (about 20 s on a laptop CPU).

    python examples/heteroscedastic_dkm.py
    python examples/heteroscedastic_dkm.py --plot hetero.png
"""

from __future__ import annotations

import argparse
import math
import time

import pyro
import torch
from pyro.nn import PyroModule

from pyro_dkm import DeepKernelMachine, fit

F64 = torch.float64


def make_data(n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, generator=g, dtype=F64) * 6 - 3
    log_var = -2.5 + 1.5 * torch.sin(x[:, 0])  # the true log noise variance
    y = torch.sin(2 * x[:, 0]) + (0.5 * log_var).exp() * torch.randn(n, generator=g, dtype=F64)
    return x, y, log_var


class Heteroscedastic(PyroModule):
    """y ~ N(f(x), exp(g(x))), f and g two sparse DKMs with their own Pyro names."""

    def __init__(self, Z: torch.Tensor, num_data: int):
        super().__init__()
        self.num_data = num_data
        self.mean = DeepKernelMachine(Z, depth=1, kernel="sqexp")
        self.log_var = DeepKernelMachine(Z, depth=1, kernel="sqexp")

    def model(self, X, y, idx):
        f, g = self.mean(X[idx]), self.log_var(X[idx])  # outside the plate: global sites
        # E_q log N(y | f, e^g), closed form for independent Gaussian f and g
        ell = (-0.5 * math.log(2 * math.pi) - 0.5 * g.loc
               - 0.5 * ((y[idx] - f.loc) ** 2 + f.variance) * (-g.loc + 0.5 * g.variance).exp())
        with pyro.plate("data", self.num_data, subsample=idx):
            pyro.factor("y", ell)

    def guide(self, X, y, idx):
        self.mean.guide(X[idx])
        self.log_var.guide(X[idx])

    @torch.no_grad()
    def predict(self, X):
        f = self.mean.predict(X, include_noise=False)
        g = self.log_var.predict(X, include_noise=False)
        # the predictive is a Gaussian scale mixture; moment-match it for the test LL
        var = f.variance + (g.loc + 0.5 * g.variance).exp()
        return torch.distributions.Normal(f.loc, var.sqrt()), g.loc


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=400, help="training points")
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--plot", default=None, help="write a figure to this path")
    args = p.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    X, y, _ = make_data(args.n, args.seed)
    Xt, yt, log_var_t = make_data(1000, args.seed + 1)
    Z = torch.linspace(-3, 3, 15, dtype=F64)[:, None]

    t0 = time.perf_counter()
    model = Heteroscedastic(Z, args.n)
    svi = pyro.infer.SVI(model.model, model.guide, pyro.optim.Adam({"lr": 0.03}),
                         pyro.infer.Trace_ELBO())
    gen = torch.Generator().manual_seed(args.seed)
    try:
        from tqdm.auto import tqdm
        steps = tqdm(range(args.steps), desc="heteroscedastic", leave=False)
    except ImportError:  # pragma: no cover
        steps = range(args.steps)
    for _ in steps:
        svi.step(X, y, torch.randperm(args.n, generator=gen)[:args.batch_size])
    t_het = time.perf_counter() - t0

    t0 = time.perf_counter()
    homo = DeepKernelMachine(Z, depth=1, kernel="sqexp")
    fit(homo, X, y, steps=args.steps, batch_size=args.batch_size, lr=0.03, seed=args.seed,
        progress=False)
    t_homo = time.perf_counter() - t0

    pred, g_mean = model.predict(Xt)
    ll_het = float(pred.log_prob(yt).mean())
    ll_homo = float(homo.predict(Xt).log_prob(yt).mean())
    corr = float(torch.corrcoef(torch.stack([g_mean, log_var_t]))[0, 1])
    print(f"heteroscedastic DKM pair : test log-likelihood {ll_het:.3f} per point "
          f"({t_het:.1f} s)")
    print(f"homoscedastic DKM        : test log-likelihood {ll_homo:.3f} per point "
          f"({t_homo:.1f} s)")
    print(f"learned vs true log noise: correlation {corr:.3f}")
    if args.plot:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        order = Xt[:, 0].argsort()
        x = Xt[order, 0]
        fig, ax = plt.subplots(1, 2, figsize=(10, 3.8))
        ax[0].scatter(X[:, 0], y, s=6, c="0.6", label="training data")
        ax[0].plot(x, pred.loc[order], label="mean DKM")
        ax[0].fill_between(x, (pred.loc - 2 * pred.scale)[order],
                           (pred.loc + 2 * pred.scale)[order], alpha=0.3, label="+-2 sd")
        ax[0].set(xlabel="x", ylabel="y", title="heteroscedastic fit")
        ax[0].legend(loc="lower left", fontsize=8)
        ax[1].plot(x, log_var_t[order], "k--", label="true log noise variance")
        ax[1].plot(x, g_mean[order], label="log-noise DKM (posterior mean)")
        ax[1].set(xlabel="x", ylabel="log variance", title=f"noise (correlation {corr:.2f})")
        ax[1].legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)
        print(f"figure written to {args.plot}")


if __name__ == "__main__":
    main()
