"""FunBaT with Poisson entries: the Pyro route with a likelihood object.

Counts on a 25 x 25 grid of a rank-2 log rate, 400 observed entries (100 held out).
CEP (``FunctionalTucker``) on ``log(y + 1/2)`` gives a start; ``guide_from_cep`` puts the
Pyro guide there and SVI trains the Poisson model (``PyroFunctionalTucker(...,
likelihood=Poisson(exposure))``). Prints the held-out rate RMSE of a constant rate, the CEP
start and the Poisson fit (a few seconds).

    python examples/funbat_poisson.py
"""

from __future__ import annotations

import argparse
import math

import pyro
import torch

from pyro_dkm.likelihoods import Poisson
from pyro_dkm.tucker import FunctionalTucker, PyroFunctionalTucker
from pyro_dkm.tucker.pyro_model import guide_from_cep

F64 = torch.float64


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pyro.set_rng_seed(args.seed)
    g = torch.Generator().manual_seed(args.seed)
    T, n = 25, 500
    grid = torch.linspace(0, 1, T, dtype=F64)
    idx = torch.randint(0, T, (n, 2), generator=g)
    x = grid[idx]
    log_rate = 1.0 + 1.2 * torch.sin(2 * math.pi * x[:, 0]) * torch.cos(math.pi * x[:, 1])
    y = torch.poisson(log_rate.exp(), generator=g)
    tr, te = slice(0, 400), slice(400, n)
    true = log_rate[te].exp()
    exposure = float(y[tr].mean())

    def rmse(rate):
        return float((rate - true).pow(2).mean().sqrt())

    cep = FunctionalTucker([2, 2], nu=1.5, lengthscale=0.3, variance=0.5, core="cp",
                           progress=False, seed=args.seed)
    cep.fit(x[tr], (y[tr] + 0.5).log() - math.log(exposure))
    start = rmse(cep.predict(x[te]).mean.exp() * exposure)

    model = PyroFunctionalTucker([grid, grid], [2, 2], nu=1.5, lengthscale=0.3, variance=0.5,
                                 core="cp", likelihood=Poisson(exposure=exposure))
    guide = guide_from_cep(model, cep)
    svi = pyro.infer.SVI(model.model, guide, pyro.optim.Adam({"lr": 0.005}),
                         pyro.infer.Trace_ELBO())
    for _ in range(args.steps):
        svi.step(idx[tr], y[tr])
    with torch.no_grad():
        fitted = rmse(guide.mean_entries(model, idx[te]).exp() * exposure)
    print(f"held-out rate RMSE: constant {rmse(y[tr].mean().expand(n - 400)):.3f}, "
          f"CEP on log counts {start:.3f}, Poisson FunBaT (SVI from CEP) {fitted:.3f}")


if __name__ == "__main__":
    main()
