"""`lmforge pretrain`: a language model from scratch (or continued) on a packed dataset."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Literal

import torch

from lmforge.config import ModelConfig, resolve_model_config
from lmforge.data.pack import PackedDataset, WindowLoader
from lmforge.errors import CheckpointError, ConfigError, DataError
from lmforge.io import remove_stale_temps
from lmforge.model.gpt import GPT
from lmforge.model.hf import is_hf_checkpoint, load_hf_model
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import check_out_dir, load_train_state, load_weights
from lmforge.train.distributed import init_distributed, shutdown
from lmforge.train.loop import TrainConfig, train


def pretrain(
    data: Path | None = None,
    model: str | None = None,
    out: Path = Path("runs/pretrain"),
    *,
    max_steps: int | None = None,
    max_tokens: int | None = None,
    max_minutes: float | None = None,
    block_size: int | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 3e-4,
    min_lr_ratio: float = 0.1,
    warmup_steps: int = 100,
    lr_decay_steps: int | None = None,
    schedule: Literal["cosine", "linear", "constant"] = "cosine",
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = "adamw",
    weight_decay: float = 0.1,
    grad_clip: float | None = 1.0,
    precision: Literal["bf16-mixed", "32"] | None = None,
    init: Literal["normal", "xavier", "he"] | None = None,
    dropout: float | None = None,
    eval_every: int = 200,
    eval_batches: int = 20,
    save_every: int = 500,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Train a language model from scratch on a packed dataset.

    Run under `torchrun --nproc-per-node N` for data-parallel training (gloo on CPU, nccl on GPU);
    `batch_size` is then per process. Ctrl-C finishes the current step, saves, and exits.

    Args:
        data: Directory written by `lmforge data pack`.
        model: A preset name (see `lmforge models`) or a checkpoint directory to continue from
            (default: llama-tiny).
        out: Checkpoint directory; created, or refused if it holds anything.
        max_steps: Stop after this many optimizer steps.
        max_tokens: Stop after this many training tokens (summed over processes).
        max_minutes: Stop after this much wall time; a checkpoint is always written at the end.
        block_size: Tokens per training window (default: the model's context length).
        batch_size: Windows per micro-batch (per process under torchrun).
        grad_accum: Micro-batches accumulated into one optimizer step.
        lr: Peak learning rate after warmup.
        min_lr_ratio: Final learning rate as a fraction of the peak.
        warmup_steps: Steps of linear warmup.
        lr_decay_steps: Steps over which the schedule decays (default: max_steps; a run bounded only by
            max_minutes decays over its time budget, again over the new budget when resumed).
        schedule: Learning-rate decay after warmup.
        optimizer: Optimizer; weight decay applies to matrices only.
        weight_decay: Decoupled weight decay (AdamW) or L2 penalty (others).
        grad_clip: Clip the global gradient norm to this value; null disables.
        precision: "bf16-mixed" or "32"; by default the faster one on this machine.
        init: Weight initialisation (normal = GPT-2 style, xavier, he); default from the preset.
        dropout: Dropout probability (default from the preset, 0 for all built-in presets).
        eval_every: Steps between validation-loss evaluations on the val split.
        eval_batches: Batches per validation evaluation.
        save_every: Steps between checkpoints (one is always written at the end).
        log_every: Steps between progress and metrics.jsonl lines.
        seed: Seed for initialisation, data order and dropout.
        device: "cpu", "cuda", "cuda:1", ...; default CUDA when present.
        resume: Continue a stopped run exactly where it left off; data, model and settings come from it,
            and only max_steps / max_tokens / max_minutes may be given anew.
        progress: Show the progress line.

    Returns:
        The checkpoint directory.
    """
    ctx = init_distributed(device)
    finished = False
    try:
        if resume is not None:
            out, cfg, model_config, data, block_size = _resume_settings(
                Path(resume), data, model, max_steps, max_tokens, max_minutes)
        else:
            if data is None:
                raise ConfigError("--data is required (a directory written by `lmforge data pack`)")
            cfg = TrainConfig(max_steps=max_steps, max_tokens=max_tokens, max_minutes=max_minutes,
                              batch_size=batch_size, grad_accum=grad_accum, lr=lr, min_lr_ratio=min_lr_ratio,
                              warmup_steps=warmup_steps, lr_decay_steps=lr_decay_steps, schedule=schedule,
                              optimizer=optimizer, weight_decay=weight_decay, grad_clip=grad_clip,
                              precision=precision, eval_every=eval_every, eval_batches=eval_batches,
                              save_every=save_every, log_every=log_every, seed=seed)
            model_config = _model_config(model or "llama-tiny", Path(data), init, dropout)
            if ctx.is_main:
                check_out_dir(Path(out))
        out, data = Path(out), Path(data)
        block_size = block_size or model_config.max_position_embeddings
        if block_size > model_config.max_position_embeddings:
            raise ConfigError(f"block_size={block_size} exceeds the model's context "
                              f"(max_position_embeddings={model_config.max_position_embeddings})")
        torch.manual_seed(cfg.seed)
        net = GPT(model_config)
        if resume is None and model is not None and is_hf_checkpoint(Path(model)):
            net.load_state_dict(load_hf_model(Path(model))[0].state_dict())
        if resume is not None:
            load_weights(net, out)
        elif model is not None and Path(model).is_dir() and not is_hf_checkpoint(Path(model)):
            load_weights(net, Path(model))
        loader = WindowLoader(PackedDataset(data, "train"), block_size, cfg.batch_size, rank=ctx.rank,
                              world_size=ctx.world_size, seed=cfg.seed)
        val_loader = _val_loader(data, block_size, cfg.batch_size, ctx.rank, ctx.world_size)
        tokenizer = Tokenizer.load(data / "tokenizer")
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            print(f"model: {model_config.family}-style, {net.num_params() / 1e6:.2f}M parameters, "
                  f"context {model_config.max_position_embeddings}; data: {loader.dataset.num_tokens:,} "
                  f"train tokens; precision {cfg.precision}; {ctx.world_size} process(es) on {ctx.device}",
                  file=sys.stderr)
        generation_config = {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95,
                             "eos_token_id": tokenizer.eos_id, "bos_token_id": tokenizer.bos_id,
                             "pad_token_id": tokenizer.pad_id}
        result = train(net, model_config, loader, out, cfg, ctx=ctx, val_loader=val_loader,
                       tokenizer_dir=data / "tokenizer", generation_config=generation_config,
                       resume=resume is not None, progress=progress,
                       run_info={"data": str(data.resolve()), "block_size": block_size, "model": str(model)})
        if ctx.is_main:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"stopped by {result.stopped_by} at step {result.step}{val}; checkpoint: {out}", file=sys.stderr)
        finished = True
        return out
    finally:
        shutdown(ctx, wait_for_all=finished)  # after a failure the other ranks may never arrive


def _model_config(model: str, data: Path, init: str | None, dropout: float | None) -> ModelConfig:
    meta = PackedDataset(data, "train").meta
    overrides = {k: v for k, v in (("init", init), ("dropout", dropout)) if v is not None}
    if Path(model).is_dir():
        config = resolve_model_config(model, **overrides)
        if config.vocab_size < meta["vocab_size"]:
            raise ConfigError(f"{model}: vocab_size={config.vocab_size} is smaller than the tokenizer of "
                              f"{data} ({meta['vocab_size']})")
        return config
    return resolve_model_config(model, vocab_size=meta["vocab_size"], **overrides)


def _val_loader(data: Path, block_size: int, batch_size: int, rank: int, world_size: int) -> WindowLoader | None:
    """Validation windows in a fixed order; a val split too small for one batch shrinks the batch."""
    try:
        val = PackedDataset(data, "val")
    except DataError:
        return None
    windows = (val.num_tokens - 1) // block_size
    per_rank = min(batch_size, windows // world_size)
    if per_rank < 1:
        print(f"note: {data} val split ({val.num_tokens} tokens) is shorter than one {block_size}-token window "
              "per process; no validation loss", file=sys.stderr)
        return None
    return WindowLoader(val, block_size, per_rank, rank=rank, world_size=world_size, shuffle=False)


def _resume_settings(ckpt: Path, data: Path | None, model: str | None, max_steps: int | None,
                     max_tokens: int | None, max_minutes: float | None):
    state = load_train_state(ckpt)
    saved = ModelConfig.load(ckpt / "config.json")
    if model is not None:
        asked = resolve_model_config(model, vocab_size=saved.vocab_size)
        if asked != saved:
            changed = [f.name for f in dataclasses.fields(saved) if getattr(asked, f.name) != getattr(saved, f.name)]
            raise CheckpointError(f"{ckpt}: cannot resume with a changed model config ({', '.join(changed)} differ "
                                  f"from {ckpt / 'config.json'}); drop --model to resume as saved")
    run = state.get("run", {})
    if data is not None and Path(data).resolve() != Path(run.get("data", data)).resolve():
        raise CheckpointError(f"{ckpt}: was trained on {run.get('data')}, not {data}; resuming on other data "
                              "would not continue the same run (start a new run with --model {ckpt} instead)")
    settings = dict(state["train_config"])
    for name, value in (("max_steps", max_steps), ("max_tokens", max_tokens), ("max_minutes", max_minutes)):
        if value is not None:
            settings[name] = value
    if settings["lr_decay_steps"] is None and settings["max_steps"] != state["train_config"]["max_steps"]:
        settings["lr_decay_steps"] = state["train_config"]["max_steps"]  # extending keeps the original schedule
    data_path = Path(data or run["data"])
    if not data_path.exists():
        raise DataError(f"{data_path}: the packed data this run trained on is gone; pass --data to point at it")
    return ckpt, TrainConfig(**settings), saved, data_path, run.get("block_size")
