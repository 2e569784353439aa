"""`lmforge convert from-hf | to-hf | sharded`: Hugging Face checkpoint folders in and out, tensor by tensor,
and a sharded (FSDP) run into the plain checkpoint directory.

Neither direction builds a model: tensors stream from the source file to the destination file
(model/tensorfile.py), so converting needs memory for a few tensors, not for the checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors.torch import save_file

from lmforge.checkpoint import (
    ADAPTER_CONFIG,
    ADAPTER_WEIGHTS,
    HEAD_CONFIG,
    HEAD_WEIGHTS,
    SAMPLING_FROM_HF,
    SHARDED,
    TRAIN_STATE,
    WEIGHTS,
    build_model,
    generation_from_hf,
    load_train_state,
    read_config,
)
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path, atomic_write_json
from lmforge.model import hf_seq2seq
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
    source = TensorSource(path)
    if hf_seq2seq.is_seq2seq(hf_config):  # Marian, T5: the encoder-decoder tables
        config = hf_seq2seq.read_config(path)
        _check_out(out, overwrite)
        plan, dropped, shapes = hf_seq2seq.import_plan(config, source), [], hf_seq2seq.expected_shapes(config)
    else:
        config = config_from_hf(hf_config, str(path / "config.json"))
        _check_out(out, overwrite)
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
    tables: Any = hf_seq2seq if isinstance(config, hf_seq2seq.Seq2SeqConfig) else None  # Marian / T5
    family = tables.hf_family(config) if tables else hf_family(config)
    _check_out(out, overwrite)
    source = TensorSource(model)
    cast = torch_dtype(dtype)
    layout = (tables.export_layout if tables else export_layout)(config, source, cast)
    stored = source.dtype(next(iter(source.names())))
    out.mkdir(parents=True, exist_ok=True)
    _write_shards(out, layout, (tables.export_tensors if tables else export_tensors)(config, source, cast))
    tokenizer = Tokenizer.load(model)
    tokenizer.save(out)
    hf_config = (tables.config_to_hf if tables else config_to_hf)(config, cast or stored)
    generation = json.loads((model / "generation_config.json").read_text()) if (
        model / "generation_config.json").is_file() else {}
    ids = {"bos_token_id": tokenizer.bos_id, "eos_token_id": tokenizer.eos_id, "pad_token_id": tokenizer.pad_id}
    if tables:  # the model's own pad / eos / decoder start ids are in hf_config; search settings travel too
        hf_generation = {k: hf_config[k] for k in ("pad_token_id", "eos_token_id", "decoder_start_token_id")}
        hf_generation.update({k: generation[k] for k in ("num_beams", "length_penalty", "early_stopping")
                              if generation.get(k) is not None})
        if generation.get("max_new_tokens"):
            hf_generation["max_new_tokens"] = generation["max_new_tokens"]
        atomic_write_json(out / "generation_config.json", hf_generation)
    elif family != "bert":
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


def convert_sharded(run: Path, out: Path, *, overwrite: bool = False) -> Path:
    """Write a sharded run (`--strategy fsdp`) as the plain checkpoint directory every other verb reads.

    The shards of the last checkpoint are gathered into whole tensors in this one process (no torchrun
    needed, any number of ranks wrote them): model.safetensors for a pretraining or full fine-tuning run,
    adapter.safetensors for LoRA, model.safetensors plus head.safetensors for classify / regress; the run's
    other files (config, tokenizer, adapter or head config, metrics) are copied. The optimizer state is not:
    the plain directory is for using the model; continue training from the sharded run itself.

    Args:
        run: A run directory written with `--strategy fsdp`.
        out: Directory to write.
        overwrite: Replace files in a non-empty `out`.

    Returns:
        The plain checkpoint directory.
    """
    from lmforge.train.sharded import model_tensors  # torch.distributed.checkpoint: seconds to import

    run, out = Path(run), Path(out)
    state = load_train_state(run)
    if SHARDED not in state:
        raise CheckpointError(f"{run}: is not a sharded run (its {TRAIN_STATE} names no sharded directory); "
                              "it is already a plain checkpoint")
    tensors = model_tensors(run / state[SHARDED])
    files: dict[str, dict[str, torch.Tensor]] = {}
    if (run / ADAPTER_CONFIG).is_file():  # LoRA: only the adapters were trained and saved
        files[ADAPTER_WEIGHTS] = {n: t for n, t in tensors.items() if ".lora_" in n}
    elif (run / HEAD_CONFIG).is_file():
        files[HEAD_WEIGHTS] = {n.removeprefix("score."): t for n, t in tensors.items() if n.startswith("score.")}
        files[WEIGHTS] = _model_weights(run, {n.removeprefix("backbone."): t for n, t in tensors.items()
                                              if n.startswith("backbone.")})
    else:
        files[WEIGHTS] = _model_weights(run, tensors)
    _check_out(out, overwrite)
    for path in run.iterdir():
        if path.is_file() and path.name != TRAIN_STATE and not path.name.startswith("."):
            with atomic_path(out / path.name) as tmp:
                tmp.write_bytes(path.read_bytes())
    for name, weights in files.items():
        with atomic_path(out / name) as tmp:
            save_file({n: t.contiguous() for n, t in weights.items()}, str(tmp),
                      metadata={"format": "pt", "step": str(state["step"])})
    print(f"gathered the step-{state['step']} shards of {run} into {out}", file=sys.stderr)
    return out


def _model_weights(run: Path, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors a plain checkpoint of config.json's model holds (a tied head once), every one present."""
    with torch.device("meta"):  # names and shapes only, no memory
        expected = {n: p.shape for n, p in build_model(read_config(run)).named_parameters()}
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{run}: the sharded checkpoint lacks {missing[:5]} (frozen parameters are not saved "
                              "in shards); convert a run that trained every weight, or merge from its base")
    for name, shape in expected.items():
        if tensors[name].shape != shape:
            raise CheckpointError(f"{run}: {name} has shape {tuple(tensors[name].shape)}, config.json implies "
                                  f"{tuple(shape)}")
    return {n: tensors[n] for n in expected}
