"""`lmforge convert from-hf | to-hf`: Hugging Face checkpoint folders in and out, tensor by tensor.

Neither direction builds a model: tensors stream from the source file to the destination file
(model/tensorfile.py), so converting needs memory for a few tensors, not for the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.checkpoint import SAMPLING_FROM_HF, generation_from_hf, read_config
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_write_json
from lmforge.model.hf import (
    config_from_hf,
    config_to_hf,
    expected_shapes,
    export_layout,
    export_tensors,
    hf_family,
    import_plan,
    import_tensors,
    read_hf_config,
)
from lmforge.model.tensorfile import TensorSource, write_tensors
from lmforge.tokenizer import Tokenizer

DType = Literal["auto", "float32", "bfloat16", "float16"]
SHARD_BYTES = 5 * 2**30  # transformers' default max_shard_size


def torch_dtype(name: str | None) -> torch.dtype | None:
    return None if name in (None, "auto") else getattr(torch, name)


def from_hf(
    path: Path,
    out: Path,
    *,
    dtype: DType = "auto",
    overwrite: bool = False,
) -> Path:
    """Import a Hugging Face model folder (GPT-2, Llama, Mistral, Qwen2/2.5, Qwen3, BERT) as an lmforge checkpoint.

    Reads config.json, model.safetensors or sharded *.safetensors with their index JSON, the tokenizer
    files and generation_config.json. Refuses, naming what it found, any architecture, tensor or shape
    it cannot represent exactly.

    Args:
        path: The HF model folder (as `save_pretrained` or a hub download leaves it).
        out: Checkpoint directory to write.
        dtype: "auto" keeps each tensor's stored dtype; or cast to float32, bfloat16 or float16.
        overwrite: Replace files in a non-empty `out`.

    Returns:
        The checkpoint directory.
    """
    path, out = Path(path), Path(out)
    hf_config = read_hf_config(path)
    config = config_from_hf(hf_config, str(path / "config.json"))
    _check_out(out, overwrite)
    source = TensorSource(path)
    plan, dropped = import_plan(config, source)
    shapes = expected_shapes(config)
    cast = torch_dtype(dtype)
    layout = [(rule.ours, shapes[rule.ours], _import_dtype(source, rule.theirs, cast)) for rule in plan]
    tokenizer = Tokenizer.load(path)
    out.mkdir(parents=True, exist_ok=True)
    write_tensors(out / "model.safetensors", layout, import_tensors(config, source, plan, cast, shapes),
                  metadata={"format": "pt", "source": str(path.resolve())})
    tokenizer.save(out)
    atomic_write_json(out / "generation_config.json", generation_from_hf(path, hf_config))
    atomic_write_json(out / "config.json", config.to_dict())  # last: its presence marks a complete checkpoint
    note = f"; dropped task heads {dropped}" if dropped else ""
    print(f"imported {hf_config['model_type']} from {path} into {out}{note}", file=sys.stderr)
    return out


def _import_dtype(source: TensorSource, names: tuple[str, ...], cast: torch.dtype | None) -> torch.dtype:
    stored = source.dtype(names[0]) if names[0] in source else torch.float32  # an absent optional: zeros
    return cast if cast is not None and stored.is_floating_point else stored


def to_hf(
    model: Path,
    out: Path,
    *,
    dtype: DType = "auto",
    overwrite: bool = False,
) -> Path:
    """Export an lmforge checkpoint as a Hugging Face model folder that transformers' Auto classes load.

    Writes config.json, model.safetensors (sharded with an index above 5 GB), generation_config.json,
    tokenizer.json and tokenizer_config.json (with the chat template). GPT-2-shaped models export as
    GPT-2; RoPE models as Llama, Mistral (sliding window), Qwen2 (q/k/v bias) or Qwen3 (QK-norm); encoders as BERT.

    Args:
        model: lmforge checkpoint directory.
        out: Folder to write.
        dtype: "auto" keeps the stored dtype; or cast to float32, bfloat16 or float16.
        overwrite: Replace files in a non-empty `out`.

    Returns:
        The folder written.
    """
    model, out = Path(model), Path(out)
    config = read_config(model)
    if config.family in ("lstm", "ngram"):
        raise ConfigError(f"{model}: an {config.family} baseline has no Hugging Face architecture to export to")
    family = hf_family(config)
    _check_out(out, overwrite)
    source = TensorSource(model)
    cast = torch_dtype(dtype)
    layout = export_layout(config, source, cast)
    stored = source.dtype(next(iter(source.names())))
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, layout, export_tensors(config, source, cast))
    tokenizer = Tokenizer.load(model)
    tokenizer.save(out)
    hf_config = config_to_hf(config, cast or stored)
    generation = json.loads((model / "generation_config.json").read_text()) if (
        model / "generation_config.json").is_file() else {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if family != "bert":
        hf_config.update({k: v for k, v in ids.items() if v is not None})
        hf_generation = {**{k: v for k, v in ids.items() if v is not None},
                         **{k: generation[k] for k in SAMPLING_FROM_HF if generation.get(k) is not None}}
        if generation.get("eos_token_id"):
            hf_generation["eos_token_id"] = generation["eos_token_id"]
        if hf_generation.get("temperature") == 0:
            hf_generation.pop("temperature")
            hf_generation["do_sample"] = False
        elif "temperature" in hf_generation:
            hf_generation["do_sample"] = True
        atomic_write_json(out / "generation_config.json", hf_generation)
    atomic_write_json(out / "config.json", hf_config)
    print(f"exported {model} as {family} ({hf_config['architectures'][0]}) into {out}", file=sys.stderr)
    return out


def _write_shards(out: Path, layout: list[tuple[str, tuple[int, ...], torch.dtype]], tensors: Any) -> None:
    shards: list[list[tuple[str, tuple[int, ...], torch.dtype]]] = [[]]
    size = 0
    for entry in layout:
        nbytes = torch.Size(entry[1]).numel() * torch.empty((), dtype=entry[2]).element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += nbytes
    if len(shards) == 1:
        write_tensors(out / "model.safetensors", layout, tensors)
        return
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        write_tensors(out / name, shard, (next(tensors) for _ in shard))
        weight_map.update(dict.fromkeys((entry[0] for entry in shard), name))
    total = sum(torch.Size(e[1]).numel() * torch.empty((), dtype=e[2]).element_size() for e in layout)
    atomic_write_json(out / "model.safetensors.index.json",
                      {"metadata": {"total_size": total}, "weight_map": weight_map})


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: output directory is not empty; choose another --out or pass --overwrite true")
    if overwrite and out.exists():
        for stale in out.glob("*.safetensors*"):  # shards of an earlier export must not mix with these
            stale.unlink()
    out.mkdir(parents=True, exist_ok=True)
