r"""Data-parallel training and sharded exact solves on ``torch.distributed``.

Launch any script that calls :func:`pyro_dkm.fit` (or :func:`pyro_dkm.dkm.fit`,
:func:`~pyro_dkm.processes.fit_classifier`) with ``torchrun --nproc_per_node K script.py``
after ``torch.distributed.init_process_group("gloo")`` (``"nccl"`` on GPUs, one device
per rank): the fit then runs data-parallel by itself.

**What is sharded.** Every rank draws the *same* global minibatch (a generator seeded
identically on all ranks, ``batch_seed``) and takes its contiguous part of it
(``DistributedSampler`` semantics: the global batch is the union of the ranks' parts,
which differ in size by at most one). Each rank's loss is its part of the objective:
with ``b_r`` of the global batch's ``B`` rows, the minibatch objective on its rows times
``b_r / B``, i.e. the likelihood term scaled by ``N / B`` and the global terms (KLs) by
``b_r / B``, so the ranks' losses and gradients *sum* to the one-process minibatch
objective and its gradient. Gradients are summed with one ``all_reduce`` per parameter
(the parameters of these models are small: inducing Grams, ``q(u)``); every rank then takes
the same optimiser step, so the parameters stay equal (they are broadcast from rank 0 at the
start). Rank 0 alone shows progress; validation metrics are computed on rank 0 and
broadcast, so early stopping stops every rank at the same step.

**What is replicated.** The data (each rank indexes the full ``X``, as a
``DistributedSampler`` does), the model, the optimiser state.

**Sharded exact NNGP solves.** :class:`ShardedNNGPOperator` computes ``K @ v`` across
the ranks: with the torch tiles of a symmetric ``K``, the upper tiles are dealt
round-robin to the ranks and the partial sums all-reduced (so the one-process halving of
the kernel evaluations is kept); otherwise (KeOps, small or cross products) by row
blocks, each rank its rows, then an ``all_gather``; the
preconditioned CG of :func:`~pyro_dkm.kernels.solvers.cg_solve` and
:func:`sharded_exact_predict` run replicated on the gathered vectors.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from .kernels.keops import (
    MATMUL_TILE,
    NNGPOperator,
    _keops_decision,
    _tiled_matmul,
    keops_matmul,
)
from .kernels.nngp import NNGPKernelFn

__all__ = ["world", "is_distributed", "DataParallel", "ShardedNNGPOperator",
           "sharded_matmul", "sharded_exact_predict", "shard_rows"]


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_distributed() -> bool:
    """True inside an initialised process group of more than one rank."""
    return world()[1] > 1


def shard_rows(n: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``range(n)``: sizes differ by at most one."""
    base, extra = divmod(n, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class DataParallel:
    """The bookkeeping of one data-parallel fit (see the module docstring).

    Args:
        params: the model's parameters (broadcast from rank 0 at construction).
        enabled: ``None``: data-parallel exactly when a process group of more than one
            rank is initialised; ``False`` forces one process.
    """

    def __init__(self, params, enabled: bool | None = None):
        self.params = [p for p in params if p.requires_grad]
        rank, size = world()
        self.enabled = size > 1 if enabled is None else bool(enabled) and size > 1
        self.rank, self.size = (rank, size) if self.enabled else (0, 1)
        if self.enabled:
            with torch.no_grad():
                for p in self.params:
                    dist.broadcast(p.data, 0)

    @property
    def is_main(self) -> bool:
        """True on the rank that prints, validates and saves (rank 0)."""
        return self.rank == 0

    def local(self, idx: Tensor) -> tuple[Tensor, float]:
        """This rank's part of the global batch ``idx`` and its weight ``b_r / B``."""
        if not self.enabled:
            return idx, 1.0
        part = idx[shard_rows(idx.shape[0], self.rank, self.size)]
        return part, part.shape[0] / idx.shape[0]

    def reduce_gradients(self, loss: float | None = None) -> float | None:
        """Sum every parameter's gradient (missing gradients count as 0) and, if given, the
        local loss value over the ranks, in one ``all_reduce`` of one flat buffer (as DDP
        buckets them: one message instead of one per parameter). Returns the summed loss."""
        if not self.enabled:
            return loss
        grads = []
        for p in self.params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        extra = [] if loss is None else [grads[0].new_tensor([float(loss)])]
        flat = torch.cat([g.to(torch.float64) for g in grads] + extra)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        start = 0
        for p in self.params:
            k = p.grad.numel()
            p.grad.copy_(flat[start:start + k].reshape(p.grad.shape))
            start += k
        return float(flat[-1]) if loss is not None else None

    def broadcast_value(self, value: float) -> float:
        """Rank 0's value on every rank (a validation metric)."""
        if not self.enabled:
            return value
        t = torch.tensor(float(value), dtype=torch.float64)
        dist.broadcast(t, 0)
        return float(t)


def _gather_rows(part: Tensor, n: int, rank: int, size: int) -> Tensor:
    """All ranks' row blocks (``shard_rows`` sizes) concatenated in rank order."""
    parts = []
    for r in range(size):
        sl = shard_rows(n, r, size)
        parts.append(part.new_empty((sl.stop - sl.start,) + tuple(part.shape[1:])))
    dist.all_gather(parts, part.contiguous())
    return torch.cat(parts)


def sharded_matmul(kfn: NNGPKernelFn, x1: Tensor, x2: Tensor | None, v: Tensor, *,
                   get: str = "nngp", use_keops=None) -> Tensor:
    """``K(x1, x2) @ v`` by row blocks of ``x1`` across the ranks (each rank its rows by
    :func:`~pyro_dkm.kernels.keops.keops_matmul`, then an ``all_gather``); one process:
    :func:`keops_matmul` itself. Every rank gets the whole product (no gradients)."""
    rank, size = world()
    if size == 1:
        return keops_matmul(kfn, x1, x2, v, get=get, use_keops=use_keops)
    sl = shard_rows(x1.shape[-2], rank, size)
    x2 = x1 if x2 is None else x2
    with torch.no_grad():
        part = keops_matmul(kfn, x1[sl], x2, v, get=get, use_keops=use_keops)
        return _gather_rows(part, x1.shape[-2], rank, size)


class ShardedNNGPOperator(NNGPOperator):
    """An :class:`~pyro_dkm.kernels.keops.NNGPOperator` whose products ``(K + s I) @ v``
    are computed by row blocks across the ranks (:func:`sharded_matmul`): same arguments,
    same values; :func:`~pyro_dkm.kernels.solvers.cg_solve` runs on it unchanged."""

    def _matmul(self, rhs: Tensor) -> Tensor:
        rank, size = world()
        if size == 1:
            return super()._matmul(rhs)
        kfn = self.kernel_fn
        vec = rhs.dim() == 1
        v = rhs[:, None] if vec else rhs
        n = self.x1.shape[-2]
        keops = _keops_decision(self.use_keops, self.threshold, self.x1.device, n)[0]
        if self.sym and not keops and n > MATMUL_TILE:
            # torch tiles of a symmetric K: the upper tiles dealt round-robin to the ranks
            # (each tile's K_ij v_j and K_ij^T v_i), partial sums all-reduced; keeps the
            # one-process product's halving of the kernel evaluations
            with torch.no_grad():
                part = _tiled_matmul(kfn, self.x1, self.x1, v, self.get, True, False,
                                     shard=(rank, size))
                dist.all_reduce(part, op=dist.ReduceOp.SUM)
                out = part + self.noise * v
            return out[:, 0] if vec else out
        sl = shard_rows(n, rank, size)
        rows = self.x1[sl]
        with torch.no_grad():
            part = keops_matmul(kfn, rows, self.x2, v, get=self.get, use_keops=self.use_keops,
                                threshold=self.threshold)
            if self.sym:
                # the coincident pairs (i, i) of this block: the exact closed-form diagonal,
                # as the one-process symmetric product uses, instead of the cross formula
                diag = kfn(rows, diag=True, get=self.get)
                cross = kfn(rows, rows.clone(), diag=True, get=self.get)
                part = part + (diag - cross)[:, None] * v[sl]
            out = _gather_rows(part, self.x1.shape[-2], rank, size)
            if self.sym:
                out = out + self.noise * v
        return out[:, 0] if vec else out


def sharded_exact_predict(kfn: NNGPKernelFn, x: Tensor, y: Tensor, x_test: Tensor, *,
                          noise: float, get: str = "nngp", use_keops=None, **cg):
    """:func:`~pyro_dkm.kernels.solvers.exact_predict`'s mean and quadratic form with the
    products sharded across the ranks: ``(mean, quad)``, the same on every rank."""
    from .kernels.solvers import cg_solve

    op = ShardedNNGPOperator(kfn, x, get=get, noise=noise, use_keops=use_keops)
    alpha = cg_solve(op, y, **cg)
    mean = sharded_matmul(kfn, x_test, x, alpha, get=get, use_keops=use_keops)
    return mean, (y * alpha).sum()
