"""`lmforge pretrain`: a language model from scratch (or continued) on a packed dataset."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import torch

from lmforge.checkpoint import (
    build_model,
    generation_defaults,
    load_decoder,
    load_weights,
    read_config,
    resolve_model_config,
    save_checkpoint,
)
from lmforge.config import ModelConfig
from lmforge.data.pack import PackedDataset
from lmforge.data.pairs import is_pairs_dir
from lmforge.errors import ConfigError, DataError
from lmforge.methods.ngram import fit_ngram
from lmforge.methods.seq2seq import seq2seq_method
from lmforge.model.lstm import LSTMConfig
from lmforge.model.ngram import ngram_order
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import lm_loss
from lmforge.train.shell import Context, Method, training_verb

NGRAM_OPTIONS = {"data", "model", "out", "discount", "progress", "device"}  # the rest are for training by gradient


def _counts_ngrams(verb: Callable[..., Path]) -> Callable[..., Path]:
    """`--model ngram-N` is counted in one pass (`lmforge.methods.ngram`), not trained in the loop: there is no
    step to limit, no optimizer and nothing to resume, so any of those options given is refused by name."""
    signature = inspect.signature(verb)

    @functools.wraps(verb)
    def counted_or_trained(*args: Any, **kwargs: Any) -> Path:
        bound = signature.bind(*args, **kwargs)
        order = ngram_order(bound.arguments.get("model"))
        if order is None:
            return verb(*args, **kwargs)
        bound.apply_defaults()
        for name, value in bound.arguments.items():
            if name not in NGRAM_OPTIONS and value != signature.parameters[name].default:
                raise ConfigError(f"--{name.replace('_', '-')} does not apply to an n-gram model (it is counted in "
                                  "one pass over the data, not trained); drop it")
        values = bound.arguments
        return fit_ngram(values["data"], order, values["out"], discount=values["discount"], progress=values["progress"])

    return counted_or_trained


@_counts_ngrams
@training_verb("pretrain", default_epochs=None, out=Path("runs/pretrain"))
def pretrain(
    ctx: Context,
    data: Path | None = None,
    model: str | None = None,
    *,
    block_size: int | None = None,
    init: Literal["normal", "xavier", "he"] | None = None,
    dropout: float | None = None,
    discount: float | None = None,
    task: Literal["lm", "seq2seq"] = "lm",
    tokenizer: Path | None = None,
    label_smoothing: float | None = None,
) -> Method:
    """Train a language model from scratch on a packed dataset, or an encoder-decoder on (source, target) pairs.

    Run under `torchrun --nproc-per-node N` for data-parallel training (gloo on CPU, nccl on GPU);
    `batch_size` is then per process. Ctrl-C finishes the current step, saves, and exits. The baselines
    train the same way: `lstm-tiny` / `lstm-small` in this loop; `ngram-N` (N = 1..9) is counted in one pass
    (interpolated modified Kneser-Ney), seconds on a CPU, and takes no training options. `--task seq2seq`
    trains an encoder-decoder (`seq2seq-tiny`, `seq2seq-small`, ...) on a pairs directory with teacher forcing
    (`lmforge.methods.seq2seq`).

    Args:
        data: Directory written by `lmforge data pack`; for --task seq2seq, one written by `lmforge data pairs`.
        model: A preset name (see `lmforge models`), `ngram-N`, or a checkpoint directory to continue from
            (default: llama-tiny).
        block_size: Tokens per training window (default: the model's context length).
        init: Weight initialisation (normal = GPT-2 style, xavier, he); default from the preset.
        dropout: Dropout probability (default from the preset, 0 for all built-in presets).
        discount: n-gram models only: one absolute discount for every count (interpolated Kneser-Ney as
            NLTK computes it); default: modified Kneser-Ney's three discounts per order, estimated from the
            counts (Chen & Goodman 1998).
        task: "lm": a language model on packed text; "seq2seq": an encoder-decoder on pairs (default
            model seq2seq-small).
        tokenizer: --task seq2seq: the tokenizer directory (`lmforge tokenizer train --fields source,target`);
            default: the --model checkpoint's.
        label_smoothing: --task seq2seq: label smoothing ε of the training loss (default from the preset, 0.1).

    Returns:
        The checkpoint directory.
    """
    if task == "seq2seq":
        if init is not None or discount is not None:
            raise ConfigError("--init and --discount apply to language models, not --task seq2seq")
        return seq2seq_method(ctx, data, tokenizer, model, block_size=block_size, dropout=dropout,
                              label_smoothing=label_smoothing)
    if tokenizer is not None or label_smoothing is not None:
        raise ConfigError("--tokenizer and --label-smoothing apply to --task seq2seq (packed data holds its tokenizer)")
    if data is not None and is_pairs_dir(data):
        raise ConfigError(f"{data} holds (source, target) pairs: train an encoder-decoder on them with --task seq2seq "
                          "--tokenizer TOK, or pack text for a language model with `lmforge data pack`")
    if data is None:
        raise ConfigError("--data is required (a directory written by `lmforge data pack`)")
    if discount is not None:
        raise ConfigError(f"--discount applies to n-gram models (--model ngram-N), not {model or 'llama-tiny'}")
    data = Path(data)
    if ctx.resume is not None:
        config = read_config(ctx.resume)
        net = build_model(config)
        load_weights(net, ctx.resume)
    else:
        config = _model_config(model or "llama-tiny", data, init, dropout)
        net = build_model(config)
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


def _model_config(model: str, data: Path, init: str | None, dropout: float | None) -> ModelConfig | LSTMConfig:
    meta = PackedDataset(data, "train").meta
    overrides = {k: v for k, v in (("init", init), ("dropout", dropout)) if v is not None}
    if Path(model).is_dir():
        config = resolve_model_config(model, **overrides)
        if config.vocab_size < meta["vocab_size"]:
            raise ConfigError(f"{model}: vocab_size={config.vocab_size} is smaller than the tokenizer of "
                              f"{data} ({meta['vocab_size']})")
        _check_same_tokenizer(Path(model), data, meta)
        return config
    return resolve_model_config(model, vocab_size=meta["vocab_size"], **overrides)


def _check_same_tokenizer(model: Path, data: Path, meta: dict[str, Any]) -> None:
    """Refuse data packed with another tokenizer than the model's: its ids would mean other tokens, training
    would succeed, and the checkpoint would pair the model's embeddings with the data's tokenizer."""
    if not (model / "tokenizer.json").is_file() or not (data / "tokenizer" / "tokenizer.json").is_file():
        return  # nothing to compare (a bare config); the vocabulary size check above still holds
    theirs = Tokenizer.load(model)
    ours = meta.get("tokenizer_hash") or Tokenizer.load(data / "tokenizer").fingerprint
    if theirs.fingerprint != ours:
        raise ConfigError(
            f"{data} was packed with another tokenizer than {model}'s (tokenizer hash {ours}, vocabulary "
            f"{meta['vocab_size']} tokens; {model}: hash {theirs.fingerprint}, {theirs.vocab_size} tokens); "
            f"pack the corpus again with `lmforge data pack --tokenizer {model}`")


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
