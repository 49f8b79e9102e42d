"""Run by torchrun from tests/distributed/test_distributed.py (not collected by pytest)."""

import argparse
import os

import torch
import torch.distributed as dist

from pyro_dkm.distributed import ShardedNNGPOperator, sharded_exact_predict, sharded_matmul
from pyro_dkm.dkm import DeepKernelMachine, fit
from pyro_dkm.kernels import Dense, Relu, serial
from pyro_dkm.kernels.solvers import cg_solve

F64 = torch.float64


def data(n=200, d=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=F64)
    return X, torch.sin(2 * X[:, 0]) * X[:, 1] + 0.1 * torch.randn(n, generator=g, dtype=F64)


def train(closed_form: bool, steps: int = 20):
    torch.manual_seed(0)
    X, y = data()
    m = DeepKernelMachine(X[:12].clone(), depth=2, nu=[0.5, 2.0])
    res = fit(m, X, y, num_steps=steps, batch_size=32, lr=0.01, batch_seed=7, progress=False,
              closed_form_loss=closed_form, init_q=True)
    return m, res


def kernel_problem(n=300):
    X, y = data(n, d=4, seed=1)
    kfn = serial(Dense(2.0, 0.1), Relu(), Dense(2.0, 0.1), Relu(), Dense(1.0, 0.05))
    return kfn, X, y


def big_problem(n=2100):
    g = torch.Generator().manual_seed(5)
    return (torch.randn(n, 4, generator=g, dtype=F64),
            torch.randn(n, 3, generator=g, dtype=F64))


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    args = p.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    out = {"world": dist.get_world_size()}
    for closed_form in (True, False):
        m, res = train(closed_form)
        out[f"state_{closed_form}"] = m.state_dict()
        out[f"losses_{closed_form}"] = res.losses
    kfn, X, y = kernel_problem()
    v = torch.randn(300, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    out["product"] = ShardedNNGPOperator(kfn, X, noise=0.1, use_keops=False)._matmul(v)
    out["cross"] = sharded_matmul(kfn, X[:50], X, v, use_keops=False)
    # above one tile (1024 points): the upper tiles dealt to the ranks, sums all-reduced
    Xb, vb = big_problem()
    out["product_tiles"] = ShardedNNGPOperator(kfn, Xb, noise=0.1, use_keops=False)._matmul(vb)
    op = ShardedNNGPOperator(kfn, X, noise=0.1, use_keops=False)
    out["solve"] = cg_solve(op, y, tol=1e-12, max_iter=500, precond_rank=20)
    out["mean"], out["quad"] = sharded_exact_predict(kfn, X, y, X[:40], noise=0.1,
                                                     use_keops=False, tol=1e-12,
                                                     max_iter=500, precond_rank=20)
    torch.save(out, os.path.join(args.out, f"rank{rank}.pt"))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
