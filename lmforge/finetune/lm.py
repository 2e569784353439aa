"""`lmforge finetune full|lora` (instruction SFT of a decoder) and `lmforge merge-lora`.

Both run the one training loop with `sft_loss` on packed, loss-masked windows; they differ only in which
parameters train. Full fine-tuning updates every weight and saves a whole checkpoint; LoRA freezes the
base (optionally stored as int8, QLoRA's idea) and saves only its adapters: adapter.safetensors plus
adapter_config.json, which names the base they belong to.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.api import LM
from lmforge.data.sft import SFTLoader, TrainOn, load_sft, sft_loss
from lmforge.errors import CheckpointError, ConfigError
from lmforge.finetune.common import (
    check_block_size,
    copy_tokenizer,
    generation_defaults,
    load_backbone,
    resume_settings,
    train_config,
)
from lmforge.io import atomic_write_json, commit, remove_stale_temps, temp_path_for
from lmforge.model import lora as lora_lib
from lmforge.model.quant import dequantize_linears, quantize_linears
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import TRAIN_STATE, check_out_dir, load_weights, save_checkpoint
from lmforge.train.distributed import init_distributed, shutdown
from lmforge.train.loop import train

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
Precision = Literal["bf16-mixed", "32"]
Schedule = Literal["cosine", "linear", "constant"]


def _decoder(path: Path) -> tuple[nn.Module, Any]:
    model, config = load_backbone(path)
    if not hasattr(model, "hidden"):
        raise ConfigError(f"{path}: is an encoder; instruction fine-tuning needs a decoder (a generative model). "
                          "Use `lmforge finetune classify` for encoders")
    return model, config


def finetune_full(
    model: Path | None = None,
    data: Path | None = None,
    out: Path = Path("runs/sft"),
    *,
    val_data: Path | None = None,
    train_on: TrainOn = "all",
    pack: bool = True,
    block_size: int | None = None,
    max_steps: int | None = None,
    max_minutes: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 2e-5,
    warmup_steps: int = 10,
    schedule: Schedule = "cosine",
    lr_decay_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    precision: Precision | None = None,
    eval_every: int = 100,
    eval_batches: int = 20,
    save_every: int = 500,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Fine-tune every weight of a decoder on instruction data (SFT), the loss on assistant tokens only.

    Args:
        model: Checkpoint directory to start from (ours or a Hugging Face decoder).
        data: JSONL (or CSV) of chat `messages` / ShareGPT `conversations`, Alpaca `instruction`+`output`,
            or `prompt`+`completion` rows.
        out: Checkpoint directory for the run; refused if it holds anything.
        val_data: Held-out examples in the same format, for the validation loss.
        train_on: "all" assistant turns, or the "last" one only.
        pack: Pack several examples into each window (positions restart per example and a block-diagonal
            mask keeps them apart); false = one example per window.
        block_size: Window length in tokens (default: the model's context); longer examples are cut.
        max_steps: Stop after this many optimizer steps.
        max_minutes: Stop after this much wall time.
        batch_size: Windows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate.
        warmup_steps: Steps of linear warmup.
        schedule: Decay after warmup.
        lr_decay_steps: Steps over which the schedule decays (default: max_steps).
        weight_decay: Decoupled weight decay on matrices.
        grad_clip: Clip the global gradient norm; null disables.
        precision: "bf16-mixed" or "32"; default the faster one here.
        eval_every: Steps between validation losses.
        eval_batches: Batches per validation.
        save_every: Steps between checkpoints (one is always written at the end).
        log_every: Steps between metrics lines.
        seed: Seed for data order and dropout.
        device: "cpu", "cuda", ...
        resume: Continue a stopped run exactly (only max_steps / max_minutes may be given anew).
        progress: Show the progress line.

    Returns:
        The checkpoint directory.
    """
    return _sft("full", locals(), lora=None)


def finetune_lora(
    model: Path | None = None,
    data: Path | None = None,
    out: Path = Path("runs/lora"),
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
    max_steps: int | None = None,
    max_minutes: float | None = None,
    batch_size: int = 8,
    grad_accum: int = 1,
    lr: float = 2e-4,
    warmup_steps: int = 10,
    schedule: Schedule = "cosine",
    lr_decay_steps: int | None = None,
    weight_decay: float = 0.0,
    grad_clip: float | None = 1.0,
    precision: Precision | None = None,
    eval_every: int = 100,
    eval_batches: int = 20,
    save_every: int = 500,
    log_every: int = 10,
    seed: int = 0,
    device: str | None = None,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Instruction-tune a decoder with LoRA adapters (Hu et al. 2021): the base stays frozen, only adapters train.

    The run directory holds adapter.safetensors and adapter_config.json (r, alpha, targets, the base's
    path); `lmforge merge-lora` folds them into a plain checkpoint.

    Args:
        model: Base checkpoint directory (ours or a Hugging Face decoder).
        data: SFT data, as for `finetune full`.
        out: Run directory; refused if it holds anything.
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
        block_size: Window length in tokens (default: the model's context).
        max_steps: Stop after this many optimizer steps.
        max_minutes: Stop after this much wall time.
        batch_size: Windows per micro-batch.
        grad_accum: Micro-batches per optimizer step.
        lr: Peak learning rate (adapters tolerate a larger one than full fine-tuning).
        warmup_steps: Steps of linear warmup.
        schedule: Decay after warmup.
        lr_decay_steps: Steps over which the schedule decays (default: max_steps).
        weight_decay: Decoupled weight decay on the adapter matrices.
        grad_clip: Clip the global gradient norm; null disables.
        precision: "bf16-mixed" or "32"; default the faster one here.
        eval_every: Steps between validation losses.
        eval_batches: Batches per validation.
        save_every: Steps between adapter checkpoints (one is always written at the end).
        log_every: Steps between metrics lines.
        seed: Seed for adapter init, data order and dropout.
        device: "cpu", "cuda", ...
        resume: Continue a stopped LoRA run exactly (only max_steps / max_minutes may be given anew).
        progress: Show the progress line.

    Returns:
        The run directory.
    """
    targets = lora_targets if isinstance(lora_targets, list) else [t.strip() for t in lora_targets.split(",")]
    config = lora_lib.LoRAConfig(r=lora_r, alpha=lora_alpha, dropout=lora_dropout, targets=[t for t in targets if t])
    return _sft("lora", locals(), lora=config)


def _sft(method: str, args: dict[str, Any], lora: lora_lib.LoRAConfig | None) -> Path:
    ctx = init_distributed(args["device"])
    finished = False
    try:
        resume = args["resume"]
        if resume is not None:
            out = Path(resume)
            cfg, run = resume_settings(out, args, method)
            if lora is not None:
                lora = lora_lib.LoRAConfig(**run["lora"])
        else:
            if args["model"] is None or args["data"] is None:
                raise ConfigError("--model and --data are required (a checkpoint and an SFT .jsonl file), "
                                  "or --resume to continue a run")
            out, cfg = Path(args["out"]), train_config(args)
            run = {"method": method, "model": str(Path(args["model"]).resolve()),
                   "data": str(Path(args["data"]).resolve()), "train_on": args["train_on"], "pack": args["pack"],
                   "val_data": str(Path(args["val_data"]).resolve()) if args["val_data"] else None,
                   "block_size": args["block_size"], "lora": lora.to_dict() if lora else None,
                   "base_int8": bool(args.get("base_int8"))}
            if ctx.is_main:
                check_out_dir(out)
        base = Path(run["model"])
        torch.manual_seed(cfg.seed)
        net, model_config = _decoder(base)
        tokenizer = Tokenizer.load(base)
        block_size = run["block_size"] or model_config.max_position_embeddings
        check_block_size(block_size, model_config.max_position_embeddings)
        if lora is None:
            if resume is not None:
                load_weights(net, out)
            save_fn = load_state_fn = None
            summary = f"full fine-tuning: {sum(p.numel() for p in net.parameters()) / 1e6:.2f}M trainable parameters"
        else:
            adapter_config = attach_lora(net, lora, base_int8=run["base_int8"], base=base)
            if resume is not None:
                _load_adapter_file(net, out)
            gen = generation_defaults(base, tokenizer)
            save_fn = _adapter_saver(net, out, adapter_config, base, gen, ctx.is_main)
            load_state_fn = load_adapter_train_state
            trainable, total = lora_lib.count_parameters(net)
            summary = (f"LoRA r={lora.r} alpha={lora.alpha:g} on {len(adapter_config['layers'])} Linear layers "
                       f"({', '.join(lora.targets)}){', int8 base' if run['base_int8'] else ''}: "
                       f"{trainable / 1e6:.3f}M trainable of {total / 1e6:.2f}M parameters "
                       f"({100 * trainable / total:.2f}%)")
        examples = load_sft(Path(run["data"]), tokenizer, train_on=run["train_on"], max_length=block_size + 1)
        pad = tokenizer.pad_id if tokenizer.pad_id is not None else (tokenizer.eos_id or 0)
        loader = SFTLoader(examples, block_size, cfg.batch_size, pad, seed=cfg.seed, pack=run["pack"],
                           rank=ctx.rank, world_size=ctx.world_size)
        val_loader = None
        if run["val_data"]:
            val = load_sft(Path(run["val_data"]), tokenizer, train_on=run["train_on"], max_length=block_size + 1)
            windows = len(SFTLoader(val, block_size, 1, pad, pack=run["pack"], shuffle=False)._windows())
            val_loader = SFTLoader(val, block_size, max(1, min(cfg.batch_size, windows // ctx.world_size)), pad,
                                   pack=run["pack"], shuffle=False, rank=ctx.rank, world_size=ctx.world_size)
        if ctx.is_main:
            out.mkdir(parents=True, exist_ok=True)
            remove_stale_temps(out)
            print(f"{summary}; {len(examples)} examples in {len(loader._windows())} windows of {block_size} "
                  f"tokens; precision {cfg.precision}", file=sys.stderr)
        result = train(net, model_config, loader, out, cfg, ctx=ctx, val_loader=val_loader, loss_fn=sft_loss,
                       tokenizer_dir=base, generation_config=generation_defaults(base, tokenizer),
                       resume=resume is not None, run_info=run, progress=args["progress"], save_fn=save_fn,
                       load_state_fn=load_state_fn)
        if ctx.is_main:
            val = f", val loss {result.val_loss:.4f}" if result.val_loss is not None else ""
            print(f"stopped by {result.stopped_by} at step {result.step}{val}; saved in {out}", file=sys.stderr)
        finished = True
        return out
    finally:
        shutdown(ctx, wait_for_all=finished)


def attach_lora(net: nn.Module, config: lora_lib.LoRAConfig, *, base_int8: bool, base: Path) -> dict[str, Any]:
    """Quantize the base if asked, then add adapters; returns what adapter_config.json records."""
    if base_int8:
        quantize_linears(net)
    plan = lora_lib.apply_lora(net, config)
    return {**config.to_dict(), "base_model": str(Path(base).resolve()), "base_int8": base_int8,
            "layers": {name: {t: list(rows) for t, rows in parts.items()} for name, parts in plan.items()},
            "base_config": net.config.to_dict()}


def _adapter_saver(net: nn.Module, out: Path, adapter_config: dict[str, Any], base: Path,
                   generation_config: dict[str, Any], is_main: bool):
    def save(train_state: dict[str, Any], step: int) -> None:
        if not is_main:
            return
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_json(out / ADAPTER_CONFIG, adapter_config)
        atomic_write_json(out / "generation_config.json", generation_config)
        copy_tokenizer(base, out)
        weights_tmp, state_tmp = temp_path_for(out / ADAPTER_WEIGHTS), temp_path_for(out / TRAIN_STATE)
        try:  # as save_checkpoint: both files complete before either is renamed into place
            save_file(lora_lib.adapter_state_dict(net), str(weights_tmp), metadata={"format": "pt", "step": str(step)})
            torch.save({**train_state, "step": step}, state_tmp)
            commit(weights_tmp, out / ADAPTER_WEIGHTS)
            commit(state_tmp, out / TRAIN_STATE)
        finally:
            weights_tmp.unlink(missing_ok=True)
            state_tmp.unlink(missing_ok=True)

    return save


def _adapter_step(run: Path) -> int | None:
    with safe_open(str(Path(run) / ADAPTER_WEIGHTS), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def load_adapter_train_state(run: Path) -> dict[str, Any]:
    """train_state.pt of a LoRA run, refused if its adapters are from another step (a torn save)."""
    path = Path(run) / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{run}: no {TRAIN_STATE}; this LoRA run cannot be resumed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if _adapter_step(run) not in (None, state["step"]):
        raise CheckpointError(f"{run}: {ADAPTER_WEIGHTS} is from step {_adapter_step(run)} but {TRAIN_STATE} from "
                              f"step {state['step']}; the save was interrupted between its two renames")
    return state


def _load_adapter_file(net: nn.Module, run: Path) -> None:
    path = Path(run) / ADAPTER_WEIGHTS
    if not path.exists():
        raise CheckpointError(f"{run}: {ADAPTER_WEIGHTS} is missing")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None
    lora_lib.load_adapter_state(net, tensors, str(path))


def read_adapter_config(adapter: Path) -> dict[str, Any]:
    path = Path(adapter) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{adapter}: no {ADAPTER_CONFIG}; not a LoRA run directory")
    return json.loads(path.read_text())


def load_with_adapter(adapter: Path, base: Path | None = None) -> tuple[nn.Module, Any, Path]:
    """(model with the adapters attached, its config, the base directory) for a LoRA run directory."""
    config = read_adapter_config(adapter)
    base = Path(base or config["base_model"])
    net, model_config = _decoder(base)
    lora = lora_lib.LoRAConfig(r=config["r"], alpha=config["alpha"], dropout=config["dropout"],
                               targets=config["targets"])
    if config["base_int8"]:
        quantize_linears(net)
    lora_lib.apply_lora(net, lora)
    _load_adapter_file(net, adapter)
    return net.eval(), model_config, base


def load_lora(adapter: Path, base: Path | None = None) -> LM:
    """A LoRA run as an `LM` (base + adapters, unmerged): `load_lora("runs/lora").chat([...])`."""
    net, _, base = load_with_adapter(Path(adapter), base)
    tokenizer = Tokenizer.load(base)
    return LM(net, tokenizer, generation_defaults(Path(adapter), tokenizer), Path(adapter))


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
    net, model_config, base = load_with_adapter(Path(adapter), base)
    n = lora_lib.merge_lora(net)
    dequantize_linears(net)
    tokenizer = Tokenizer.load(base)
    save_checkpoint(out, net, model_config, tokenizer_dir=base,
                    generation_config=generation_defaults(Path(adapter), tokenizer))
    print(f"merged {n} adapted layers into {base}; wrote {out}", file=sys.stderr)
    return out
