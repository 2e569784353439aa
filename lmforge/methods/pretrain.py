"""`lmforge pretrain`: a language model from scratch (or continued) on a packed dataset."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.checkpoint import generation_defaults, load_decoder, load_weights, resolve_model_config, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError, DataError
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import lm_loss
from lmforge.train.shell import Context, Method, training_verb


@training_verb("pretrain", default_epochs=None, out=Path("runs/pretrain"))
def pretrain(
    ctx: Context,
    data: Path | None = None,
    model: str | None = None,
    *,
    block_size: int | None = None,
    init: Literal["normal", "xavier", "he"] | None = None,
    dropout: float | None = None,
) -> Method:
    """Train a language model from scratch on a packed dataset.

    Run under `torchrun --nproc-per-node N` for data-parallel training (gloo on CPU, nccl on GPU);
    `batch_size` is then per process. Ctrl-C finishes the current step, saves, and exits.

    Args:
        data: Directory written by `lmforge data pack`.
        model: A preset name (see `lmforge models`) or a checkpoint directory to continue from
            (default: llama-tiny).
        block_size: Tokens per training window (default: the model's context length).
        init: Weight initialisation (normal = GPT-2 style, xavier, he); default from the preset.
        dropout: Dropout probability (default from the preset, 0 for all built-in presets).

    Returns:
        The checkpoint directory.
    """
    if data is None:
        raise ConfigError("--data is required (a directory written by `lmforge data pack`)")
    data = Path(data)
    if ctx.resume is not None:
        config = ModelConfig.load(ctx.resume / "config.json")
        net = GPT(config)
        load_weights(net, ctx.resume)
    else:
        config = _model_config(model or "llama-tiny", data, init, dropout)
        net = GPT(config)
        if model is not None and Path(model).is_dir():  # continue from its weights (ours or a Hugging Face folder)
            net.load_state_dict(load_decoder(Path(model), dtype=torch.float32).model.state_dict())
    block_size = block_size or config.max_position_embeddings
    if block_size > config.max_position_embeddings:
        raise ConfigError(f"block_size={block_size} exceeds the model's context "
                          f"(max_position_embeddings={config.max_position_embeddings})")
    cfg, dist = ctx.cfg, ctx.dist
    loader = WindowLoader(PackedDataset(data, "train"), block_size, cfg.batch_size, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.seed)
    tokenizer_dir = data / "tokenizer"
    generation_config = generation_defaults(tokenizer_dir, Tokenizer.load(tokenizer_dir))

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_checkpoint(out, net, config, tokenizer_dir=tokenizer_dir, generation_config=generation_config,
                        train_state=train_state, step=step)

    val_loader = _val_loader(data, block_size, cfg.batch_size, dist.rank, dist.world_size)
    summary = (f"model: {config.family}-style, {net.num_params() / 1e6:.2f}M parameters, context "
               f"{config.max_position_embeddings}; data: {loader.dataset.num_tokens:,} train tokens")
    return Method(net, loader, lm_loss, save, val_loader=val_loader, summary=summary)


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
