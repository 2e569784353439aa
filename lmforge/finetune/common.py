"""What every fine-tuning verb shares: loading a backbone (ours or an HF directory), train settings, resume."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lmforge.config import ModelConfig
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import TOKENIZER_FILES, TRAIN_STATE, load_weights
from lmforge.train.loop import TrainConfig

# Only these may be given anew when resuming: everything else is the run's own.
RESUMABLE_LIMITS = ("max_steps", "max_minutes")


def load_backbone(path: str | Path) -> tuple[nn.Module, Any]:
    """(model, config) from an lmforge checkpoint (decoder or encoder) or a Hugging Face directory."""
    from lmforge.model import hf
    from lmforge.model.bert import ENCODER_MODEL_TYPE, Encoder, EncoderConfig
    from lmforge.model.gpt import GPT

    path = Path(path)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: no config.json; --model must be a checkpoint directory "
                              "(from `lmforge pretrain`, `lmforge finetune` or a Hugging Face download)")
    if hf.is_hf_checkpoint(path):
        model, config = hf.load_hf_model(path)
        return model.float(), config
    kind = json.loads((path / "config.json").read_text()).get("model_type")
    if kind == ENCODER_MODEL_TYPE:
        config = EncoderConfig.load(path / "config.json")
        model: nn.Module = Encoder(config)
    else:
        config = ModelConfig.load(path / "config.json")
        model = GPT(config)
    load_weights(model, path)
    return model, config


def generation_defaults(model_dir: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    path = Path(model_dir) / "generation_config.json"
    if path.is_file():
        return json.loads(path.read_text())
    return {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "eos_token_id": tokenizer.eos_id,
            "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}


def copy_tokenizer(src: Path, out: Path) -> None:
    if Path(src).resolve() == Path(out).resolve():
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(Path(src) / name, tmp)


def train_config(settings: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a verb's keyword arguments (those it does not know are ignored)."""
    known = TrainConfig.__dataclass_fields__
    return TrainConfig(**{k: v for k, v in settings.items() if k in known})


def resume_settings(ckpt: Path, limits: dict[str, Any], method: str) -> tuple[TrainConfig, dict[str, Any]]:
    """The saved TrainConfig (with new step/time limits, the schedule kept) and the run's own settings."""
    path = Path(ckpt) / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no {TRAIN_STATE}; this run cannot be resumed")
    state = torch.load(path, map_location="cpu", weights_only=True)
    run = state.get("run", {})
    if run.get("method") != method:
        raise CheckpointError(f"{ckpt}: is a {run.get('method') or 'pretraining'} run, not `finetune {method}`; "
                              f"resume it with the verb that started it")
    settings = dict(state["train_config"])
    for name in RESUMABLE_LIMITS:
        if limits.get(name) is not None:
            settings[name] = limits[name]
    if settings["lr_decay_steps"] is None and settings["max_steps"] != state["train_config"]["max_steps"]:
        settings["lr_decay_steps"] = state["train_config"]["max_steps"]  # extending keeps the original schedule
    return TrainConfig(**settings), run


def check_block_size(block_size: int, context: int) -> None:
    if block_size > context:
        raise ConfigError(f"block_size={block_size} exceeds the model's context (max_position_embeddings={context})")
