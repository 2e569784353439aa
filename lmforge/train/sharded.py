"""Sharded checkpoints (torch.distributed.checkpoint, DCP) of FSDP runs, resumable on any number of ranks.

A sharded run directory holds what a plain one does, except the weights and optimizer state:

    runs/big/
      config.json, tokenizer.json, generation_config.json, ...   (the method's own files, written by rank 0)
      sharded-00000500/     DCP: every rank's shards of {"model", "optim"}, and .metadata (global shapes)
      train_state.pt        loader position, RNG, counters, settings; "sharded": "sharded-00000500"

Each rank writes only its own shards, in parallel; DCP's metadata records every tensor's global shape,
so loading reshards onto whatever mesh the resumed run has (2 ranks → 1 or 4). Frozen parameters (a LoRA
base, a frozen backbone) are not saved: the method rebuilds them from the run's options.

Atomic like every save: the shards go to a hidden `.sharded-N.partial` directory, renamed to `sharded-N`
once all ranks finished; train_state.pt (renamed into place last) names the directory to resume from, and
older ones are removed only after it does. A kill at any moment leaves the previous checkpoint whole.
`lmforge convert sharded` turns the directory into the plain one every other verb reads.
"""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from lmforge.checkpoint import weights_elsewhere
from lmforge.errors import CheckpointError
from lmforge.train.distributed import Dist, barrier

PREFIX = "sharded-"
OPTIONS = StateDictOptions(ignore_frozen_params=True)


def directory_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def save(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer, step: int, ctx: Dist,
         write_files: Callable[[], None] | None = None) -> Path:
    """Every rank writes its shards of model and optimizer; then rank 0 renames them into place and runs
    `write_files` (the method's saver, weights left out) with train_state naming the new directory."""
    out = Path(out)
    name = directory_name(step)
    partial = out / f".{name}.partial"
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(partial, ignore_errors=True)
    barrier(ctx)
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=partial)  # fsyncs every file
    barrier(ctx)
    if ctx.is_main:
        final = out / name
        shutil.rmtree(final, ignore_errors=True)  # a directory of this step no train_state points to yet
        partial.rename(final)
        if write_files is not None:
            with weights_elsewhere(name):
                write_files()
        remove_unused(out, keep=name)
    barrier(ctx)
    return out / name


def remove_unused(out: Path, keep: str | None) -> None:
    """Sharded directories no train_state.pt points to (older steps, a killed save's partial one)."""
    for path in Path(out).glob(f"*{PREFIX}*"):
        if path.is_dir() and path.name != keep and (path.name.startswith(PREFIX) or path.name.endswith(".partial")):
            shutil.rmtree(path, ignore_errors=True)


def load(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Model and optimizer state of a sharded checkpoint into this run's (sharded) model, any world size."""
    directory = Path(directory)
    if not (directory / ".metadata").is_file():
        raise CheckpointError(f"{directory}: not a complete sharded checkpoint (no .metadata); was the run "
                              "directory copied without it?")
    model_state, optim_state = get_state_dict(model, optimizer, options=OPTIONS)
    state = {"model": model_state, "optim": optim_state}
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"],
                   options=OPTIONS)


def model_tensors(directory: Path) -> dict[str, torch.Tensor]:
    """The full (unsharded) model tensors of a sharded checkpoint, read in one process without a process
    group; the optimizer state is not read."""
    directory = Path(directory)
    reader = dcp.FileSystemReader(directory)
    try:
        metadata = reader.read_metadata()
    except FileNotFoundError:
        raise CheckpointError(f"{directory}: no .metadata; not a complete sharded checkpoint") from None
    tensors: dict[str, torch.Tensor] = {}
    for key, meta in metadata.state_dict_metadata.items():
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata):
            tensors[key.removeprefix("model.")] = torch.empty(meta.size, dtype=meta.properties.dtype)
    if not tensors:
        raise CheckpointError(f"{directory}: holds no model tensors")
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load({"model": tensors}, storage_reader=reader, no_dist=not dist.is_initialized())
    return tensors
