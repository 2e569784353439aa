"""Data parallelism through torch.distributed: one process per device, launched by `torchrun`.

Each rank trains on its own slice of the global batch (the loader shards by rank); DDP averages
gradients, so the update equals a single process's update on the whole global batch.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(device: str | None = None) -> Dist:
    """Join the process group if `torchrun` set WORLD_SIZE > 1: nccl on CUDA, gloo on CPU."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return Dist(rank, world_size, local_rank, dev)


def all_reduce_sum(value: torch.Tensor, ctx: Dist) -> torch.Tensor:
    if ctx.enabled:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def from_rank0(values: list[float], ctx: Dist) -> list[float]:
    """Rank 0's values on every rank: a decision from its clock (stop now, the time-based learning rate)
    must be identical everywhere, or the ranks' parameters drift apart and DDP deadlocks."""
    if not ctx.enabled:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=ctx.device)
    dist.broadcast(t, src=0)
    return t.tolist()


def shutdown(ctx: Dist, *, wait_for_all: bool = True) -> None:
    """Leave the process group together: a rank that tears down gloo while rank 0 still saves aborts."""
    if ctx.enabled and dist.is_initialized():
        if wait_for_all:
            dist.barrier()
        dist.destroy_process_group()
