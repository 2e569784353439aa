"""The checkpoint directory every stage reads and writes (see DESIGN.md).

Each file is written to a temporary name and renamed into place. The slow part (serialising) happens
before any rename, so a kill during a save leaves the previous checkpoint complete; weights and
train state carry the step they belong to, and resuming refuses a pair whose steps disagree.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError
from lmforge.io import atomic_path, atomic_write_json, commit, temp_path_for

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def _weights_to_save(model: nn.Module) -> dict[str, torch.Tensor]:
    """State dict without tied duplicates (safetensors refuses shared storage) and without buffers."""
    seen: set[int] = set()
    tensors = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        tensors[name] = param.detach().contiguous().cpu()
    return tensors


def save_checkpoint(out: Path, model: nn.Module, config: ModelConfig, *, tokenizer_dir: Path | None = None,
                    generation_config: dict[str, Any] | None = None, train_state: dict[str, Any] | None = None,
                    step: int = 0) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "config.json", config.to_dict())
    if tokenizer_dir is not None and Path(tokenizer_dir).resolve() != out.resolve():
        for name in TOKENIZER_FILES:
            if (Path(tokenizer_dir) / name).exists():
                with atomic_path(out / name) as tmp:
                    shutil.copyfile(Path(tokenizer_dir) / name, tmp)
    if generation_config is not None:
        atomic_write_json(out / "generation_config.json", generation_config)
    weights_tmp, state_tmp = temp_path_for(out / WEIGHTS), temp_path_for(out / TRAIN_STATE)
    try:
        save_file(_weights_to_save(model), str(weights_tmp), metadata={"format": "pt", "step": str(step)})
        if train_state is not None:
            torch.save({**train_state, "step": step}, state_tmp)
        # Both files are complete before either becomes visible: only these renames are not serialising.
        commit(weights_tmp, out / WEIGHTS)
        if train_state is not None:
            commit(state_tmp, out / TRAIN_STATE)
        else:
            (out / TRAIN_STATE).unlink(missing_ok=True)  # a state from other weights must not linger
    finally:
        weights_tmp.unlink(missing_ok=True)
        state_tmp.unlink(missing_ok=True)


def weights_step(path: Path) -> int | None:
    with safe_open(str(path / WEIGHTS), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def load_weights(model: nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{ckpt}: {WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    expected = dict(model.named_parameters())
    tied = {n for n, p in model.named_parameters(remove_duplicate=False) if n not in expected}
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected) - tied)
    if missing or unexpected:
        raise CheckpointError(
            f"{path}: weights do not match config.json (missing {missing[:5]}{'…' if len(missing) > 5 else ''}, "
            f"unexpected {unexpected[:5]}{'…' if len(unexpected) > 5 else ''}); "
            "was this directory written for another architecture?")
    for name, param in expected.items():
        if tensors[name].shape != param.shape:
            raise CheckpointError(f"{path}: {name} has shape {tuple(tensors[name].shape)}, "
                                  f"config.json implies {tuple(param.shape)}")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def load_train_state(ckpt: Path) -> dict[str, Any]:
    path = Path(ckpt) / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no {TRAIN_STATE}; this checkpoint cannot be resumed "
                              "(it was exported or training finished without keeping state)")
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    if weights_step(Path(ckpt)) not in (None, state["step"]):
        raise CheckpointError(f"{ckpt}: {WEIGHTS} is from step {weights_step(Path(ckpt))} but {TRAIN_STATE} "
                              f"from step {state['step']}; the save was interrupted between its two renames")
    return state


def rng_state() -> dict[str, Any]:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def check_out_dir(out: Path) -> None:
    """Refuse to write a new run over anything: a run's files are never silently replaced."""
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        hint = " (it holds a checkpoint: pass --resume to continue it)" if (out / "config.json").exists() else ""
        raise CheckpointError(f"{out}: output directory is not empty{hint}; choose another --out")
