"""Several processes, one run: what `graft train` and `distill-data` need of torch.distributed.

graft does not launch processes itself. Under `accelerate launch` or `torchrun` each process
finds RANK, WORLD_SIZE and LOCAL_RANK in its environment; graft then joins the process group
(NCCL on CUDA, gloo on CPU), takes the GPU of its local rank, and works on its share of the
data. Without those variables everything runs in one process, as before.
"""
from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes files, logs and draws the progress bar."""
        return self.rank == 0

    def device(self, device: str) -> str:
        """`auto` (and plain `cuda`) become this process's own GPU."""
        if self.world > 1 and device in ("auto", "cuda") and torch.cuda.is_available():
            return f"cuda:{self.local_rank}"
        return device

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def all_reduce_(self, t: torch.Tensor, op=None) -> torch.Tensor:
        """Sum (or `op`) over the processes, in place."""
        if self.world > 1:
            dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
        return t

    def average_gradients(self, params) -> None:
        """Mean of every process's gradients, in one all-reduce of one flat buffer. This is what
        DDP does; graft does it by hand because its chunked loss runs several backward passes
        per step, and DDP's hooks would all-reduce after each of them."""
        if self.world == 1:
            return
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return
        flat = torch.cat([g.flatten().float() for g in grads])
        dist.all_reduce(flat)
        flat /= self.world
        i = 0
        for g in grads:
            g.copy_(flat[i:i + g.numel()].view_as(g))
            i += g.numel()

    def gather_objects(self, obj) -> list:
        if self.world == 1:
            return [obj]
        out = [None] * self.world
        dist.all_gather_object(out, obj)
        return out


_STATE = None


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def finish() -> None:
    """Leave the process group together once a command has succeeded. The barrier keeps a process
    from tearing its gloo connections down while another still writes the run's files (rank 0
    does, alone): such a worker now and then aborted at exit, failing a run that had finished."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def setup() -> Dist:
    """Join the process group the launcher describes (once per process)."""
    global _STATE
    if _STATE is not None:
        return _STATE
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        _STATE = Dist()
        return _STATE
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local)
        dist.init_process_group(backend="nccl" if cuda else "gloo")
        # leave the group before the interpreter exits: its communication threads (gloo's, under
        # FSDP) otherwise abort the process at exit ("terminate called without an active exception")
        atexit.register(_leave)
    _STATE = Dist(rank, world, local)
    return _STATE
