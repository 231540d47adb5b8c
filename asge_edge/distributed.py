"""Data parallelism across processes with torch.distributed, as launched by torchrun.

Contract: ``World.from_env(device)`` is None in a single process; under torchrun
(WORLD_SIZE > 1 in the environment) it joins the process group (gloo on the CPU, nccl on
CUDA) and returns the World. With it:
- every rank draws the same global batch (``global_batch`` = world size x --batch-size,
  same seeded order and augmentation) and reads and trains on its ``part`` of it alone:
  contiguous blocks whose sizes differ by at most one (data.block). So N processes at
  batch B see exactly the batches of one process at batch N x B, like a DistributedSampler
  aligned to global batches;
- each rank divides its layers' loss sums by the global batch's size (``total``), and
  ``reduce_grads`` sums the gradients of one optimiser's parameters over the ranks, once
  per logical batch (micro-batches accumulate locally first: the no_sync pattern);
- ``gather`` collects a tensor from every rank along dim 0 (the heads train on the whole
  global batch's features, so their batch statistics are the global batch's); with
  ``differentiable`` it passes each rank's rows of the gradient back (BP's head: every rank
  computes the same loss of the gathered features, so no gradient needs a collective);
- a rank's part of a short last batch may be empty: it still takes part in every
  collective, with a zero gradient (a backward over no images gives one);
- only rank 0 (``is_main``) writes files or prints;
- ``max_signal`` agrees on a signal (Ctrl-C, SIGTERM) across the ranks, so that all stop
  at the same step;
- ``close`` leaves the process group; the trainer calls it on every rank, also on error.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class World:
    rank: int
    size: int
    device: torch.device

    @classmethod
    def from_env(cls, device: torch.device) -> "World | None":
        """Join the process group torchrun describes, or None for a single process."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size <= 1:
            return None
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), device)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def global_batch(self, batch_size: int) -> int:
        return batch_size * self.size

    @property
    def part(self) -> tuple[int, int]:
        """(k, parts): this rank's block of each global batch, as data.batches takes it."""
        return self.rank, self.size

    def total(self, n: int) -> int:
        """The global number of samples when this rank holds ``n``."""
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t)
        return int(t.item())

    def reduce_grads(self, params) -> None:
        """Sum the gradients of ``params`` over the ranks, in place (one flat buffer)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()

    def sum_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over the ranks, in place; returns it."""
        dist.all_reduce(t)
        return t

    def gather(self, t: torch.Tensor, differentiable: bool = False) -> torch.Tensor:
        """Every rank's ``t`` (n_r, ...) concatenated in rank order along dim 0.

        With ``differentiable``, the backward gives each rank its own rows of the gathered
        gradient. That is t's whole gradient only where every rank computes the same loss
        of the gathered tensor (the same head, with the same weights, on the same features):
        the gradient of the gathered tensor is then the same on every rank.
        """
        return _Gather.apply(t, self) if differentiable else self._gather(t)[0]

    def _gather(self, t: torch.Tensor) -> tuple[torch.Tensor, int]:
        """(every rank's ``t`` concatenated in rank order, the row where this rank's begin)."""
        sizes = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([len(t)], device=self.device))
        counts = [int(s.item()) for s in sizes]
        padded = torch.zeros((max(counts), *t.shape[1:]), dtype=t.dtype, device=self.device)
        padded[:len(t)] = t
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[:c] for p, c in zip(parts, counts)]), sum(counts[:self.rank])

    def max_signal(self, signum: int | None) -> int | None:
        """The largest signal number that any rank has received (None: none). Each rank calls
        this at the same points of its loop, so all of them stop at the same step."""
        t = torch.tensor([signum or 0], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item()) or None

    def barrier(self) -> None:
        dist.barrier()

    def close(self, finished: bool) -> None:
        """Leave the process group. Each rank calls this once it is done. A ``finished`` run
        first waits at a barrier until every rank is done (rank 0 last: it evaluates on test
        and writes the outputs), so that all leave the group together; a failed one leaves
        at once (torchrun stops the other ranks). A rank that left while another still
        worked, or that left no group at all, died at exit, 1 run in 5 to 15 of
        tests/test_distributed.py's command, with "terminate called without an active
        exception" (SIGABRT): gloo's threads were still running."""
        if finished:
            dist.barrier()
        dist.destroy_process_group()


class _Gather(torch.autograd.Function):
    """World.gather with a backward that returns this rank's rows of the gathered gradient."""

    @staticmethod
    def forward(ctx, t: torch.Tensor, world: World) -> torch.Tensor:
        gathered, start = world._gather(t)
        ctx.rows = slice(start, start + len(t))
        return gathered                                   # sum n_r, ...

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad[ctx.rows], None                       # n, ...
