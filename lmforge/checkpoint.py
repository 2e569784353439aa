"""The checkpoint directory every stage reads and writes (DESIGN.md): the one module that knows its files.

`load_model(path)` opens any model directory lmforge meets — our decoder or encoder checkpoint, a Hugging
Face folder, a LoRA run (its base plus adapters) or a classify/regress run (backbone plus head) — and the
`save_*` functions write them. Every verb loads and saves through here, so a format lives in one place.

Each file is written to a temporary name and renamed into place. The slow part (serialising) happens
before any rename, so a kill during a save leaves the previous checkpoint complete; weights and
train state carry the step they belong to, and resuming refuses a pair whose steps disagree.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import random
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from lmforge.config import PRESETS, ModelConfig, preset, read_config_json
from lmforge.errors import CheckpointError, ConfigError
from lmforge.io import atomic_path, atomic_write_json, commit, temp_path_for
from lmforge.model import hf, hf_seq2seq
from lmforge.model import lora as lora_lib
from lmforge.model.bert import ENCODER_MODEL_TYPE, EncoderConfig
from lmforge.model.heads import HeadConfig, SequenceHead, SpanHead
from lmforge.model.lstm import LSTM_MODEL_TYPE, LSTM_PRESETS, LSTMLM, LSTMConfig, lstm_preset
from lmforge.model.ngram import NGRAM_MODEL_TYPE, NgramConfig, NgramLM
from lmforge.model.quant import apply_layout, layout_of, quantize_linears
from lmforge.model.seq2seq import SEQ2SEQ_MODEL_TYPE, SEQ2SEQ_PRESETS, Seq2Seq, Seq2SeqConfig, seq2seq_preset
from lmforge.model.tensorfile import TensorSource
from lmforge.tokenizer import Tokenizer

WEIGHTS = "model.safetensors"
TRAIN_STATE = "train_state.pt"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
GENERATION_CONFIG = "generation_config.json"
ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter.safetensors", "adapter_config.json"
HEAD_WEIGHTS, HEAD_CONFIG = "head.safetensors", "head_config.json"
HF_SPAN_HEAD = "BertForQuestionAnswering"  # an HF architecture whose head lmforge carries (`SpanHead`)
QUANTIZATION = "quantization"  # config.json entry of a quantized checkpoint: which layers hold int8/int4 weights
SAMPLING_FROM_HF = ("temperature", "top_k", "top_p", "repetition_penalty", "max_new_tokens")
SEARCH_FROM_HF = ("num_beams", "length_penalty", "early_stopping", "forced_eos_token_id", "bad_words_ids",
                  "decoder_start_token_id")  # an encoder-decoder's search settings (Marian's opus-mt set them)
Kind = Literal["decoder", "encoder", "lora", "head", "ngram", "seq2seq"]
BASELINES = {LSTM_MODEL_TYPE: (LSTMConfig, LSTMLM), NGRAM_MODEL_TYPE: (NgramConfig, NgramLM)}  # by model_type
OTHER_MODELS = {**BASELINES, SEQ2SEQ_MODEL_TYPE: (Seq2SeqConfig, Seq2Seq)}  # configs not gpt.py's / bert.py's
SHARDED = "sharded"  # train_state.pt's key naming a sharded run's DCP directory (lmforge.train.sharded)
_SHARDED_DIR: contextvars.ContextVar[str | None] = contextvars.ContextVar("sharded_dir", default=None)


@contextlib.contextmanager
def weights_elsewhere(directory: str) -> Iterator[None]:
    """Within it, the savers write a run's files but not its weights: they are in the sharded (DCP)
    `directory` beside them, which train_state.pt names. A sharded run's method saves through its usual saver."""
    token = _SHARDED_DIR.set(directory)
    try:
        yield
    finally:
        _SHARDED_DIR.reset(token)


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
    layout = layout_of(model)  # a quantized model saves as one, whoever saves it (`compress quantize`, LM.save)
    atomic_write_json(out / "config.json", {**config.to_dict(), **({QUANTIZATION: layout} if layout else {})})
    if tokenizer_dir is not None:
        copy_tokenizer(tokenizer_dir, out)
    if generation_config is not None:
        atomic_write_json(out / GENERATION_CONFIG, generation_config)
    _save_pair(out, WEIGHTS, _weights_to_save(model), train_state, step)


def weights_step(path: Path, name: str = WEIGHTS) -> int | None:
    """The training step a weights file was saved at (safetensors metadata), None if it records none."""
    with safe_open(str(Path(path) / name), framework="pt") as f:
        step = (f.metadata() or {}).get("step")
    return int(step) if step is not None else None


def load_weights(model: nn.Module, ckpt: Path) -> None:
    path = Path(ckpt) / WEIGHTS
    tensors = _read_safetensors(path)
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
    """train_state.pt, refused when a weights file beside it (model, adapter or head) is from another step."""
    path = Path(ckpt) / TRAIN_STATE
    if not path.exists():
        raise CheckpointError(f"{ckpt}: no {TRAIN_STATE}; this checkpoint cannot be resumed "
                              "(it was exported or training finished without keeping state)")
    state = torch.load(path, map_location="cpu", weights_only=True)  # never unpickle arbitrary objects
    for name in (WEIGHTS, ADAPTER_WEIGHTS, HEAD_WEIGHTS):
        if (Path(ckpt) / name).exists() and weights_step(ckpt, name) not in (None, state["step"]):
            state = _finish_interrupted_save(Path(ckpt), weights_step(ckpt, name)) or state
        if (Path(ckpt) / name).exists() and weights_step(ckpt, name) not in (None, state["step"]):
            raise CheckpointError(f"{ckpt}: {name} is from step {weights_step(ckpt, name)} but {TRAIN_STATE} "
                                  f"from step {state['step']}; the save was interrupted between its renames")
    return state


def _finish_interrupted_save(ckpt: Path, step: int | None) -> dict[str, Any] | None:
    """The train state of a save killed between its two renames (weights renamed, state not yet), renamed into
    place now. `_save_pair` writes both files whole before renaming either, and a kill runs no cleanup, so
    the state's temporary file is still there, complete, and names the weights' step."""
    for tmp in sorted(ckpt.glob(f".{TRAIN_STATE}.tmp-*")):
        try:
            state = torch.load(tmp, map_location="cpu", weights_only=True)
        except Exception:  # a state file cut short by a kill during its own write: not the one we need
            continue
        if state.get("step") == step:
            commit(tmp, ckpt / TRAIN_STATE)
            print(f"{ckpt}: finished a save of step {step} that was interrupted between its renames",
                  file=sys.stderr)
            return state
    return None


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


def copy_tokenizer(src: Path, out: Path) -> None:
    if Path(src).resolve() == Path(out).resolve():
        return
    for name in TOKENIZER_FILES:
        if (Path(src) / name).exists():
            with atomic_path(Path(out) / name) as tmp:
                shutil.copyfile(Path(src) / name, tmp)


def generation_from_hf(directory: Path, hf_config: dict[str, Any]) -> dict[str, Any]:
    """Our generation defaults from an HF model's generation_config.json (and its stop token ids)."""
    path = Path(directory) / GENERATION_CONFIG
    hf_gen = json.loads(path.read_text()) if path.is_file() else {}
    out = {k: hf_gen[k] for k in SAMPLING_FROM_HF if hf_gen.get(k) is not None}
    if hf_config.get("is_encoder_decoder"):
        out.update({k: hf_gen[k] for k in SEARCH_FROM_HF if hf_gen.get(k) is not None})
        if "max_new_tokens" not in out and hf_gen.get("max_length"):
            out["max_new_tokens"] = hf_gen["max_length"] - 1  # the decoder start token counts in max_length
        if hf_gen.get("do_sample") is not True:
            out.setdefault("temperature", 0.0)
    if hf_gen.get("do_sample") is False:
        out["temperature"] = 0.0  # HF's greedy default
    eos = hf_gen.get("eos_token_id", hf_config.get("eos_token_id"))
    if eos is not None:
        out["eos_token_id"] = eos if isinstance(eos, list) else [eos]
    return out


def generation_defaults(path: Path, tokenizer: Tokenizer) -> dict[str, Any]:
    """A directory's decoding defaults: its generation_config.json (ours or HF's), else sampling at 0.8."""
    path = Path(path)
    if hf.is_hf_checkpoint(path):
        return generation_from_hf(path, hf.read_hf_config(path))
    if (path / GENERATION_CONFIG).is_file():
        return json.loads((path / GENERATION_CONFIG).read_text())
    config_json = path / "config.json"
    if config_json.is_file() and read_config_json(config_json).get("model_type") == SEQ2SEQ_MODEL_TYPE:
        config = Seq2SeqConfig.load(config_json)  # translation wants the most likely output, not a sample
        return {"max_new_tokens": min(256, config.max_positions - 1), "temperature": 0.0, "num_beams": 4,
                "length_penalty": 1.0, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id,
                "decoder_start_token_id": config.decoder_start_id}
    return {"max_new_tokens": 64, "temperature": 0.8, "top_p": 0.95, "eos_token_id": tokenizer.eos_id,
            "bos_token_id": tokenizer.bos_id, "pad_token_id": tokenizer.pad_id}


def read_config(directory: Path, *, quantized: bool = False) -> ModelConfig | EncoderConfig | LSTMConfig | NgramConfig:
    """The model config of one of our checkpoint directories (decoder, encoder, LSTM or n-gram, by model_type).

    A quantized checkpoint is refused unless `quantized`: its int8/int4 tensors only `load_model` rebuilds."""
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{directory}: no config.json; not a checkpoint directory (from `lmforge pretrain`, "
                              "`lmforge finetune`, `lmforge convert` or a Hugging Face download)")
    data = read_config_json(path)
    if QUANTIZATION in data:
        if not quantized:
            raise CheckpointError(f"{directory}: is a quantized checkpoint (`lmforge compress quantize`); its weights "
                                  "are int8/int4 tensors, which only loading it for inference understands; use the "
                                  "full-precision checkpoint it was quantized from")
        return ModelConfig.from_dict({k: v for k, v in data.items() if k != QUANTIZATION}, str(path))
    kind = read_config_json(path).get("model_type", "lmforge")
    if kind in OTHER_MODELS:
        return OTHER_MODELS[kind][0].load(path)
    return EncoderConfig.load(path) if kind == ENCODER_MODEL_TYPE else ModelConfig.load(path)


def build_model(config: Any) -> nn.Module:
    """A freshly initialised model of any of our architectures, from its config."""
    for config_class, model_class in OTHER_MODELS.values():
        if isinstance(config, config_class):
            return model_class(config)
    return hf.build_model(config)


def resolve_model_config(model: str | Path, **overrides: Any) -> ModelConfig | LSTMConfig:
    """A preset name, a config.json, or a directory holding one."""
    path = Path(model)
    if str(model) in PRESETS:
        return preset(str(model), **overrides)
    if str(model) in LSTM_PRESETS:
        return lstm_preset(str(model), **overrides)
    if str(model) in SEQ2SEQ_PRESETS:
        return seq2seq_preset(str(model), **overrides)
    if path.is_dir():
        if hf.is_hf_checkpoint(path):  # continue from a Hugging Face download
            config = hf.config_from_hf(hf.read_hf_config(path), str(path / "config.json"))
            if not isinstance(config, ModelConfig):
                raise ConfigError(f"{model}: an encoder (BERT) cannot be trained as a language model here")
            return config.replace(**overrides)
        path = path / "config.json"
    if path.is_file():
        kind = read_config_json(path).get("model_type")
        if kind in (LSTM_MODEL_TYPE, SEQ2SEQ_MODEL_TYPE):
            return OTHER_MODELS[kind][0].load(path).replace(**overrides)
        return ModelConfig.load(path).replace(**overrides)
    presets = ", ".join([*PRESETS, *LSTM_PRESETS, *SEQ2SEQ_PRESETS])
    raise ConfigError(f"model {str(model)!r} is neither a preset ({presets}) nor a checkpoint directory")


@dataclass
class Loaded:
    """What `load_model` found: the module, its config, tokenizer and decoding defaults, and what it was."""

    model: nn.Module
    config: ModelConfig | EncoderConfig
    tokenizer: Tokenizer
    generation_config: dict[str, Any]
    kind: Kind
    path: Path
    base: Path | None = None  # a LoRA run's base directory


def kind_of(path: Path) -> Kind:
    """What a model directory holds, from its files alone (nothing is loaded)."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if (path / ADAPTER_CONFIG).is_file() and not (path / WEIGHTS).exists():
        return "lora"
    if (path / HEAD_CONFIG).is_file():
        return "head"
    if hf.is_hf_checkpoint(path):
        if hf_seq2seq.is_seq2seq(hf.read_hf_config(path)):
            return "seq2seq"
        if HF_SPAN_HEAD in hf.read_hf_config(path).get("architectures", []):
            return "head"  # BERT with its question-answering span head (`qa_outputs`)
        return "encoder" if isinstance(hf.config_from_hf(hf.read_hf_config(path)), EncoderConfig) else "decoder"
    config = read_config(path, quantized=True)
    if isinstance(config, Seq2SeqConfig):
        return "seq2seq"
    return "encoder" if isinstance(config, EncoderConfig) else "ngram" if isinstance(config, NgramConfig) else "decoder"


def load_model(path: str | Path, *, dtype: torch.dtype | None = None, device: str | torch.device | None = None,
               base: Path | None = None) -> Loaded:
    """Open any model directory: ours (decoder, encoder, or the LSTM and n-gram baselines, told apart by
    config.json's model_type), a Hugging Face folder, a LoRA run or a head run.

    An HF folder (GPT-2, Llama, Mistral, Qwen2/3, BERT) converts in memory tensor by tensor; a LoRA run is its
    base with the adapters attached (unmerged; `base` overrides the recorded base directory); a head run is
    a `SequenceHead` on its fine-tuned backbone. The model comes back in eval mode, in `dtype` if given (else
    as stored; HF weights default to float32), on `device` if given (else the CPU).
    """
    path = Path(path)
    kind = kind_of(path)
    if kind == "lora":
        model, config, base = _load_lora(path, base)
        tokenizer = Tokenizer.load(path if (path / TOKENIZER_FILES[0]).exists() else base)
    elif hf.is_hf_checkpoint(path) and kind == "seq2seq":
        model, config = hf_seq2seq.load_hf_model(path, dtype)
        tokenizer = Tokenizer.load(path)
    elif hf.is_hf_checkpoint(path):
        model, config = hf.load_hf_model(path, dtype)
        tokenizer = Tokenizer.load(path)
    else:
        if not (path / WEIGHTS).exists() and (path / TRAIN_STATE).exists() and any(path.glob("sharded-*")):
            raise CheckpointError(f"{path}: is a sharded checkpoint (an FSDP run); write the plain directory "
                                  f"other verbs read with `lmforge convert sharded {path} --out {path}-plain`")
        for name in ("config.json", WEIGHTS, TOKENIZER_FILES[0]):
            if not (path / name).exists():
                raise CheckpointError(f"{path}: {name} is missing; a checkpoint directory holds config.json, "
                                      "model.safetensors and tokenizer.json")
        config = read_config(path, quantized=True)
        model = build_model(config)
        layout = read_config_json(path / "config.json").get(QUANTIZATION)
        apply_layout(model, layout, str(path / "config.json"))  # int8/int4 layers for the stored integers
        load_weights(model, path)
        if layout and dtype is None:
            dtype = getattr(torch, layout["dtype"])  # the activations the int kernels are fast with
        tokenizer = Tokenizer.load(path)
    if kind == "head":
        model = _attach_head(model, path)
    generation_config = generation_defaults(path, tokenizer)
    tokenizer.stop_ids |= set(_as_list(generation_config.get("eos_token_id")))
    model.to(device=device, dtype=dtype)
    return Loaded(model.eval(), config, tokenizer, generation_config, kind, path, base)


def _as_list(value: Any) -> list[int]:
    return [] if value is None else value if isinstance(value, list) else [value]


def _attach_head(backbone: nn.Module, path: Path) -> SequenceHead | SpanHead:
    if not (path / HEAD_CONFIG).is_file():  # Hugging Face's BertForQuestionAnswering: the head is `qa_outputs`
        net = SpanHead(backbone, HeadConfig(task="qa", pooling="cls",
                                            max_length=min(384, backbone.config.max_position_embeddings)))
        source = TensorSource(path)
        net.score.load_state_dict({"weight": source.read("qa_outputs.weight").float(),
                                   "bias": source.read("qa_outputs.bias").float()})
        return net
    config = HeadConfig.from_dict(read_config_json(path / HEAD_CONFIG))
    net = (SpanHead if config.task == "qa" else SequenceHead)(backbone, config)
    tensors = _read_safetensors(path / HEAD_WEIGHTS)
    if tensors["weight"].shape != net.score.weight.shape:
        raise CheckpointError(f"{path / HEAD_WEIGHTS}: head weight {tuple(tensors['weight'].shape)} does not fit "
                              f"the backbone and labels ({tuple(net.score.weight.shape)})")
    net.score.load_state_dict(tensors)
    return net


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.exists():
        raise CheckpointError(f"{path.parent}: {path.name} is missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e})") from None


def read_adapter_config(run: Path) -> dict[str, Any]:
    path = Path(run) / ADAPTER_CONFIG
    if not path.is_file():
        raise CheckpointError(f"{run}: no {ADAPTER_CONFIG}; not a LoRA run directory")
    return read_config_json(path)


def attach_lora(net: nn.Module, config: lora_lib.LoRAConfig, *, base_int8: bool, base: Path) -> dict[str, Any]:
    """Quantize the base if asked, then add adapters; returns what adapter_config.json records."""
    if base_int8:
        quantize_linears(net)
    plan = lora_lib.apply_lora(net, config)
    return {**config.to_dict(), "base_model": str(Path(base).resolve()), "base_int8": base_int8,
            "layers": {name: {t: list(rows) for t, rows in parts.items()} for name, parts in plan.items()},
            "base_config": net.config.to_dict()}


def load_decoder(path: Path, dtype: torch.dtype | None = None) -> Loaded:
    """`load_model` for verbs that need a generative model: an encoder is refused by name."""
    loaded = load_model(path, dtype=dtype)
    if loaded.kind == "seq2seq":
        raise ConfigError(f"{path}: is an encoder-decoder (seq2seq) model; use `lmforge translate` or "
                          "`lmforge summarize` with it")
    if loaded.kind not in ("decoder", "lora", "ngram"):
        raise ConfigError(f"{path}: is {'an encoder' if loaded.kind == 'encoder' else 'a head run'}; this needs a "
                          "decoder (a generative model). Use `lmforge finetune classify` for encoders")
    return loaded


def _load_lora(run: Path, base: Path | None) -> tuple[nn.Module, Any, Path]:
    config = read_adapter_config(run)
    base = Path(base or config["base_model"])
    loaded = load_decoder(base, dtype=torch.float32)
    lora = lora_lib.LoRAConfig(r=config["r"], alpha=config["alpha"], dropout=config["dropout"],
                               targets=config["targets"])
    attach_lora(loaded.model, lora, base_int8=config["base_int8"], base=base)
    load_adapter(loaded.model, run)
    return loaded.model, loaded.config, base


def load_adapter(net: nn.Module, run: Path) -> None:
    """The trained adapter weights of a LoRA run into a model that already has adapters attached."""
    path = Path(run) / ADAPTER_WEIGHTS
    lora_lib.load_adapter_state(net, _read_safetensors(path), str(path))


def _save_pair(out: Path, weights_name: str, tensors: dict[str, torch.Tensor], train_state: dict[str, Any] | None,
               step: int) -> None:
    """A weights file and train_state.pt, both complete before either is renamed into place."""
    weights_tmp, state_tmp = temp_path_for(out / weights_name), temp_path_for(out / TRAIN_STATE)
    if (sharded := _SHARDED_DIR.get()) is not None:
        with atomic_path(out / TRAIN_STATE) as tmp:  # the commit point: names the complete sharded directory
            torch.save({**(train_state or {}), "step": step, SHARDED: sharded}, tmp)
        return
    try:
        save_file(tensors, str(weights_tmp), metadata={"format": "pt", "step": str(step)})
        if train_state is not None:
            torch.save({**train_state, "step": step}, state_tmp)
        # Both files are complete before either becomes visible: only these renames are not serialising.
        commit(weights_tmp, out / weights_name)
        if train_state is not None:
            commit(state_tmp, out / TRAIN_STATE)
        else:
            (out / TRAIN_STATE).unlink(missing_ok=True)  # a state from other weights must not linger
    finally:
        weights_tmp.unlink(missing_ok=True)
        state_tmp.unlink(missing_ok=True)


def save_adapter(out: Path, net: nn.Module, adapter_config: dict[str, Any], *, tokenizer_dir: Path,
                 generation_config: dict[str, Any], train_state: dict[str, Any] | None = None, step: int = 0) -> None:
    """A LoRA run directory: adapter.safetensors + adapter_config.json (naming the base), tokenizer, defaults."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / ADAPTER_CONFIG, adapter_config)
    atomic_write_json(out / GENERATION_CONFIG, generation_config)
    copy_tokenizer(tokenizer_dir, out)
    _save_pair(out, ADAPTER_WEIGHTS, lora_lib.adapter_state_dict(net), train_state, step)


def save_head(out: Path, net: SequenceHead, backbone_config: Any, *, tokenizer_dir: Path,
              train_state: dict[str, Any] | None = None, step: int = 0) -> None:
    """A head run: a whole checkpoint of the fine-tuned backbone plus head.safetensors and head_config.json."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / HEAD_CONFIG, net.config.to_dict())
    if _SHARDED_DIR.get() is None:  # else the head is in the sharded directory with the backbone
        with atomic_path(out / HEAD_WEIGHTS) as tmp:
            tensors = {n: p.detach().contiguous().cpu() for n, p in net.score.named_parameters()}
            save_file(tensors, str(tmp), metadata={"format": "pt", "step": str(step)})
    save_checkpoint(out, net.backbone, backbone_config, tokenizer_dir=tokenizer_dir, train_state=train_state,
                    step=step)
