"""Data parallelism through torch.distributed: one process per device, launched by `torchrun`.

Each rank trains on its own slice of the global batch (the loader shards by rank), and the gradient
each rank ends a step with is the average over ranks, so the update equals a single process's update on
the whole global batch. Two strategies give that average:

- `ddp`: every rank holds the whole model and optimizer; DistributedDataParallel all-reduces gradients.
- `fsdp`: FSDP2 (`fully_shard`, Zhao et al. 2023) shards parameters, gradients and optimizer state over
  the ranks, per block and at the root: a block's parameters are all-gathered just before it runs and
  freed after, gradients are reduce-scattered. Memory per rank falls with the world size (`lmforge plan`).

On gloo (CPU) FSDP2's averaging has been reported to sum instead (pytorch/pytorch#162338), so there the
reduction is forced to a plain SUM followed by an explicit division; the loss-equality tests compare
gradient norms with a single process, which would catch either mistake.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import nn

from lmforge.errors import ConfigError

Strategy = Literal["ddp", "fsdp"]


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


def init_distributed(device: str | None = None, strategy: Strategy = "ddp") -> Dist:
    """Join the process group if `torchrun` set WORLD_SIZE > 1: nccl on CUDA, gloo on CPU.

    FSDP needs a process group even for one process (its parameters are DTensors on a device mesh), so a
    single `--strategy fsdp` process gets a group of one; its checkpoints are sharded like any other.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    backend = "nccl" if dev.type == "cuda" else "gloo"
    if not dist.is_initialized():
        if world_size > 1:
            dist.init_process_group(backend=backend)
        elif strategy == "fsdp":
            dist.init_process_group(backend=backend, store=dist.HashStore(), rank=0, world_size=1)
    return Dist(rank, world_size, local_rank, dev)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated Transformer blocks (every `blocks` ModuleList: decoder, encoder, a head's backbone):
    the unit FSDP shards and activation checkpointing recomputes."""
    return [block for name, module in model.named_modules()
            if name.rsplit(".", 1)[-1] == "blocks" and isinstance(module, nn.ModuleList) for block in module]


def _checkpointed(forward: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    from torch.utils.checkpoint import checkpoint

    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_activations(model: nn.Module) -> int:
    """Recompute each block's activations in the backward pass instead of storing them (Chen et al. 2016):
    one block's activations live at a time, for a third more compute. The module tree (hence every
    checkpoint's tensor names) is unchanged: only each block's `forward` is wrapped."""
    found = blocks(model)
    for block in found:
        block.forward = functools.partial(_checkpointed, block.forward)
    return len(found)


def wrap(model: nn.Module, ctx: Dist, strategy: Strategy, *, precision: str = "32",
         activation_checkpointing: bool = False, cpu_offload: bool = False) -> nn.Module:
    """`model` on `ctx.device`, ready to train under `strategy`; returns the module to call.

    FSDP shards in place (`model` itself becomes the FSDP root, its parameters DTensors), so the caller keeps
    using `model` for its state; DDP returns a wrapper around it. One process under DDP returns `model`.
    """
    if strategy not in ("ddp", "fsdp"):
        raise ConfigError(f"strategy={strategy!r} is not one of 'ddp', 'fsdp'")
    if cpu_offload and (strategy != "fsdp" or ctx.device.type != "cuda"):
        raise ConfigError("cpu_offload keeps FSDP's sharded parameters and optimizer state in CPU memory while "
                          "training on a GPU; it needs --strategy fsdp and a CUDA device")
    if activation_checkpointing:
        checkpoint_activations(model)
    model.to(ctx.device)
    if strategy == "ddp":
        if not ctx.enabled:
            return model
        from torch.nn.parallel import DistributedDataParallel

        return DistributedDataParallel(model)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,))
    # bf16-mixed: parameters are gathered and computed in bf16, gradients reduced and stored in fp32.
    mp = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
          if precision == "bf16-mixed" else MixedPrecisionPolicy())
    offload = CPUOffloadPolicy() if cpu_offload else OffloadPolicy()
    units = [*blocks(model), model]
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=mp, offload_policy=offload)
    if dist.get_backend() == "gloo":
        for unit in units:  # pytorch/pytorch#162338: SUM, then divide by the world size ourselves
            unit.set_force_sum_reduction_for_comms(True)
    return model


def no_sync(module: nn.Module, ctx: Dist, strategy: Strategy, sync: bool) -> contextlib.AbstractContextManager:
    """A micro-batch whose gradients stay local (`sync` False: not the last of an accumulated step)."""
    if strategy == "fsdp":
        module.set_requires_gradient_sync(sync)
        return contextlib.nullcontext()
    if sync or not ctx.enabled:
        return contextlib.nullcontext()
    return module.no_sync()


def clip_grad_norm(params: list[nn.Parameter], max_norm: float) -> torch.Tensor:
    """The global gradient norm (clipped to `max_norm`) as a plain tensor, also when the gradients are
    DTensor shards (FSDP): torch's clipping reduces the norm over the mesh."""
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


def adapt_batch(batch_size: int, grad_accum: int, saved_world: int, world: int) -> tuple[int, int]:
    """(batch per process, accumulation) on `world` processes that keep the global batch of a run started
    on `saved_world`: the micro-batch stays (memory per process) where it divides the new share, else the
    largest one below it that does."""
    total = batch_size * grad_accum * saved_world
    if total % world:
        raise ConfigError(f"the run's global batch of {total} ({saved_world} processes × batch {batch_size} × "
                          f"accumulation {grad_accum}) does not split over {world} processes; resume on a world "
                          f"size that divides {total}")
    share = total // world
    micro = max(b for b in range(1, min(batch_size, share) + 1) if share % b == 0)
    return micro, share // micro


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


def barrier(ctx: Dist) -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def shutdown(ctx: Dist, *, wait_for_all: bool = True) -> None:
    """Leave the process group together: a rank that tears down gloo while rank 0 still saves aborts."""
    if dist.is_initialized():
        if wait_for_all and dist.get_world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()
