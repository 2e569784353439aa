"""`lmforge finetune full|lora` (instruction SFT of a decoder) and `lmforge merge-lora`.

Both train with `sft_loss` on packed, loss-masked windows; they differ only in which parameters train and
what they save. Full fine-tuning updates every weight and saves a whole checkpoint; LoRA freezes the base
(optionally stored as int8, QLoRA's idea) and saves only its adapters (`checkpoint.save_adapter`).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import torch

from lmforge.checkpoint import (
    Loaded,
    attach_lora,
    check_out_dir,
    load_adapter,
    load_decoder,
    load_model,
    load_weights,
    save_adapter,
    save_checkpoint,
)
from lmforge.data.sft import Example, TrainOn, load_sft
from lmforge.errors import ConfigError
from lmforge.model import lora as lora_lib
from lmforge.model.quant import dequantize_linears
from lmforge.train.loaders import SFTLoader
from lmforge.train.losses import sft_loss
from lmforge.train.shell import Context, Method, Saver, training_verb

SFT_DEFAULTS = dict(lr=2e-5, warmup_steps=10, weight_decay=0.0, eval_every=100)


@training_verb("finetune full", out=Path("runs/sft"), **SFT_DEFAULTS)
def finetune_full(
    ctx: Context,
    model: Path | None = None,
    data: Path | None = None,
    *,
    val_data: Path | None = None,
    train_on: TrainOn = "all",
    pack: bool = True,
    block_size: int | None = None,
) -> Method:
    """Fine-tune every weight of a decoder on instruction data (SFT), the loss on assistant tokens only.

    Args:
        model: Checkpoint directory to start from (ours or a Hugging Face decoder).
        data: JSONL (or CSV) of chat `messages` / ShareGPT `conversations`, Alpaca `instruction`+`output`,
            or `prompt`+`completion` rows.
        val_data: Held-out examples in the same format, for the validation loss.
        train_on: "all" assistant turns, or the "last" one only.
        pack: Pack several examples into each window (positions restart per example and a block-diagonal
            mask keeps them apart); false = one example per window.
        block_size: Window length in tokens (default: the longest example, rounded up to a multiple of 64,
            at most the model's context); longer examples are cut.

    Returns:
        The checkpoint directory.
    """
    loaded = _base(model, data)
    net = loaded.model
    if ctx.resume is not None:
        load_weights(net, ctx.resume)

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_checkpoint(out, net, loaded.config, tokenizer_dir=loaded.path, generation_config=loaded.generation_config,
                        train_state=train_state, step=step)

    summary = f"full fine-tuning: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M trainable parameters"
    return _sft_method(ctx, loaded, save, summary, data, val_data, train_on, pack, block_size)


@training_verb("finetune lora", out=Path("runs/lora"), **{**SFT_DEFAULTS, "lr": 2e-4})
def finetune_lora(
    ctx: Context,
    model: Path | None = None,
    data: Path | None = None,
    *,
    lora_r: int = 8,
    lora_alpha: float = 16.0,
    lora_dropout: float = 0.05,
    lora_targets: str = "q,v",
    base_int8: bool = False,
    val_data: Path | None = None,
    train_on: TrainOn = "all",
    pack: bool = True,
    block_size: int | None = None,
) -> Method:
    """Instruction-tune a decoder with LoRA adapters (Hu et al. 2021): the base stays frozen, only adapters train.

    The run directory holds adapter.safetensors and adapter_config.json (r, alpha, targets, the base's
    path); `lmforge merge-lora` folds them into a plain checkpoint. Adapters tolerate a larger learning
    rate than full fine-tuning.

    Args:
        model: Base checkpoint directory (ours or a Hugging Face decoder).
        data: SFT data, as for `finetune full`.
        lora_r: Rank r of each adapter.
        lora_alpha: Scale α: the update is (α/r)·B·A.
        lora_dropout: Dropout on the adapters' input.
        lora_targets: Comma-separated layers: q, k, v, o (attention), gate, up, down (MLP), or any Linear
            layer's name.
        base_int8: Store the frozen base as int8 weight-only (per-channel), dequantized on the fly
            (QLoRA's memory saving, Dettmers et al. 2023).
        val_data: Held-out SFT examples for the validation loss.
        train_on: "all" assistant turns, or the "last" one only.
        pack: Pack several examples per window (position resets + block-diagonal mask).
        block_size: Window length in tokens (default: the longest example, rounded up to a multiple of 64,
            at most the model's context).

    Returns:
        The run directory.
    """
    loaded = _base(model, data)
    net = loaded.model
    targets = lora_targets if isinstance(lora_targets, list) else [t.strip() for t in lora_targets.split(",")]
    lora = lora_lib.LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=[t for t in targets if t])
    adapter_config = attach_lora(net, lora, base_int8=base_int8, base=loaded.path)
    if ctx.resume is not None:
        load_adapter(net, ctx.resume)

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_adapter(out, net, adapter_config, tokenizer_dir=loaded.path, generation_config=loaded.generation_config,
                     train_state=train_state, step=step)

    trainable, total = lora_lib.count_parameters(net)
    summary = (f"LoRA r={lora.r} alpha={lora.alpha:g} on {len(adapter_config['layers'])} Linear layers "
               f"({', '.join(lora.targets)}){', int8 base' if base_int8 else ''}: {trainable / 1e6:.3f}M trainable "
               f"of {total / 1e6:.2f}M parameters ({100 * trainable / total:.2f}%)")
    return _sft_method(ctx, loaded, save, summary, data, val_data, train_on, pack, block_size)


def _base(model: Path | None, data: Path | None) -> Loaded:
    if model is None or data is None:
        raise ConfigError("--model and --data are required (a checkpoint and an SFT .jsonl file), "
                          "or --resume to continue a run")
    loaded = load_decoder(Path(model), dtype=torch.float32)
    if loaded.kind == "lora":
        raise ConfigError(f"{model}: is a LoRA run; fold it into its base first (`lmforge merge-lora {model}`)")
    return loaded


def sft_block_size(examples: list[Example], context: int) -> int:
    """The longest example rounded up to a multiple of 64, at most the context: windows as long as the data
    needs, in few distinct sizes. The full context would materialise a [B, 1, T, T] mask (1 GiB a row at 32k)."""
    longest = max(len(e.ids) - 1 for e in examples)
    return min(context, -(-longest // 64) * 64)


def _sft_method(ctx: Context, loaded: Loaded, save: Saver, summary: str, data: Path, val_data: Path | None,
                train_on: TrainOn, pack: bool, block_size: int | None) -> Method:
    """SFT windows of `data` (and `val_data`) for a decoder, trained with `sft_loss`."""
    cfg, dist, tokenizer = ctx.cfg, ctx.dist, loaded.tokenizer
    context = loaded.config.max_position_embeddings
    if block_size is not None and block_size > context:
        raise ConfigError(f"block_size={block_size} exceeds the model's context (max_position_embeddings={context})")
    examples = load_sft(Path(data), tokenizer, train_on=train_on, max_length=(block_size or context) + 1)
    block_size = block_size or sft_block_size(examples, context)
    pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
    loader = SFTLoader(examples, block_size, cfg.batch_size, pad, seed=cfg.seed, pack=pack, rank=dist.rank,
                       world_size=dist.world_size)
    val_loader = None
    if val_data is not None:
        val = load_sft(Path(val_data), tokenizer, train_on=train_on, max_length=block_size + 1)
        windows = len(SFTLoader(val, block_size, 1, pad, pack=pack, shuffle=False)._windows())
        val_loader = SFTLoader(val, block_size, max(1, min(cfg.batch_size, windows // dist.world_size)), pad,
                               pack=pack, shuffle=False, rank=dist.rank, world_size=dist.world_size)
    summary += f"; {len(examples)} examples in {len(loader._windows())} windows of {block_size} tokens"
    return Method(loaded.model, loader, sft_loss, save, val_loader=val_loader, summary=summary)


def merge_lora(adapter: Path, out: Path = Path("runs/merged"), *, base: Path | None = None) -> Path:
    """Fold a LoRA run's adapters into its base: W + (α/r)·B·A, saved as a plain checkpoint.

    An adapter trained over an int8 base is merged into the dequantized base it was trained with, so the
    merged model computes what the trained one did.

    Args:
        adapter: A `finetune lora` run directory (adapter.safetensors + adapter_config.json).
        out: Where to write the merged checkpoint; refused if it holds anything.
        base: The base checkpoint (default: the one named in adapter_config.json).

    Returns:
        The merged checkpoint directory.
    """
    out = Path(out)
    check_out_dir(out)
    if not (Path(adapter) / "adapter_config.json").is_file():
        raise ConfigError(f"{adapter}: is not a `finetune lora` run (no adapter_config.json beside adapter weights)")
    named = base if base is not None else json.loads((Path(adapter) / "adapter_config.json").read_text()).get(
        "base_model")
    if named is None or not Path(named).is_dir():
        where = "--base" if base is not None else f"the base named in {Path(adapter) / 'adapter_config.json'}"
        raise ConfigError(f"{where} ({named}) is not a checkpoint directory; pass --base DIR, the model the "
                          "adapters were trained on")
    loaded = load_model(Path(adapter), base=base)
    if loaded.kind != "lora":
        raise ConfigError(f"{adapter}: is not a `finetune lora` run (no adapter_config.json beside adapter weights)")
    n = lora_lib.merge_lora(loaded.model)
    dequantize_linears(loaded.model)
    save_checkpoint(out, loaded.model, loaded.config, tokenizer_dir=loaded.base,
                    generation_config=loaded.generation_config)
    print(f"merged the {n} adapted layers of {adapter} with base {loaded.base}; wrote {out} (the base and the "
          "adapter run are unchanged)", file=sys.stderr)
    return out
