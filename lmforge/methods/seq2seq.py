"""Encoder-decoder training (`lmforge pretrain --task seq2seq`): teacher forcing on (source, target) pairs.

The decoder reads [decoder_start] + target and predicts target + [eos] (teacher forcing, Vaswani et al. 2017):
every target position trains in one pass. Batches are padded, so the encoder gets a mask of its real tokens
and padded label positions are IGNORE_INDEX: the loss counts real target tokens only. Pairs are bucketed by
length (sorted within large random pools, the batches then shuffled; the fairseq/tensor2tensor practice) so
a batch holds pairs of similar lengths and little of it is padding; the padding fraction of an epoch, with
and without bucketing, is printed when training starts. The loop, resume and saving are the one shell's.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lmforge.checkpoint import load_weights, save_checkpoint
from lmforge.data.pairs import is_pairs_dir, load_pairs, split_file
from lmforge.errors import ConfigError, DataError
from lmforge.model.seq2seq import Seq2Seq, Seq2SeqConfig, seq2seq_preset
from lmforge.tokenizer import Tokenizer
from lmforge.train.losses import IGNORE_INDEX, seq2seq_loss
from lmforge.train.shell import Context, Method

POOL_BATCHES = 64  # batches per sorting pool: bigger pools bucket tighter, smaller ones keep batches more random

Example = tuple[list[int], list[int]]  # (source ids, target ids), no special tokens


class Seq2SeqLoader:
    """Padded (source, target) batches bucketed by length, in an order that depends on (seed, epoch) only.

    Each epoch: permute the pairs, sort each pool of POOL_BATCHES global batches by (source, target) length,
    cut into global batches of batch_size × world_size, and shuffle the batches. Rank r takes the r-th
    batch_size slice of each global batch. x = {"src", "src_mask", "tgt_in"}, y = labels.
    """

    def __init__(self, examples: list[Example], batch_size: int, *, pad_id: int, start_id: int, eos_id: int,
                 seed: int = 0, shuffle: bool = True, bucket: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be at least 1")
        if len(examples) < batch_size * world_size:
            raise DataError(f"{len(examples)} pairs are fewer than one batch of {batch_size * world_size}; "
                            "use a smaller --batch-size")
        self.examples, self.batch_size, self.rank, self.world_size = examples, batch_size, rank, world_size
        self.pad_id, self.start_id, self.eos_id = pad_id, start_id, eos_id
        self.seed, self.shuffle, self.bucket = seed, shuffle, bucket
        self.epoch = self.index = 0
        self._cached: tuple[int, list[np.ndarray]] | None = None
        self.batches_per_epoch = len(examples) // (batch_size * world_size)
        self.tokens_per_epoch = sum(len(t) + 1 for _, t in examples)
        self.block_size = max(len(t) + 1 for _, t in examples)  # the loop's sequence length for MFU

    def _batches(self, epoch: int) -> list[np.ndarray]:
        """The epoch's global batches (arrays of example indices)."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        rng = np.random.default_rng((self.seed, epoch))
        n = len(self.examples)
        order = rng.permutation(n) if self.shuffle else np.arange(n)
        size = self.batch_size * self.world_size
        if self.bucket:
            pool = size * POOL_BATCHES
            length = np.array([len(s) * 4096 + len(t) for s, t in self.examples])
            order = np.concatenate([chunk[np.argsort(length[chunk], kind="stable")]
                                    for chunk in np.array_split(order, max(1, -(-n // pool)))])
        batches = [order[i:i + size] for i in range(0, self.batches_per_epoch * size, size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        self._cached = (epoch, batches)
        return batches

    def collate(self, rows: list[Example]) -> tuple[dict[str, Tensor], Tensor]:
        S = max(len(s) for s, _ in rows)
        T = max(len(t) for _, t in rows) + 1
        src = torch.full((len(rows), S), self.pad_id, dtype=torch.long)
        tgt_in = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), T), IGNORE_INDEX, dtype=torch.long)
        for i, (s, t) in enumerate(rows):
            src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
            tgt_in[i, :len(t) + 1] = torch.tensor([self.start_id, *t], dtype=torch.long)
            labels[i, :len(t) + 1] = torch.tensor([*t, self.eos_id], dtype=torch.long)
        src_mask = torch.arange(S)[None, :] < torch.tensor([len(s) for s, _ in rows])[:, None]
        return {"src": src, "src_mask": src_mask, "tgt_in": tgt_in}, labels

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        batch = self._batches(self.epoch)[self.index]
        mine = batch[self.rank * self.batch_size:(self.rank + 1) * self.batch_size]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        return self.collate([self.examples[int(i)] for i in mine])

    def padding_fraction(self, epoch: int = 0) -> float:
        """Share of the padded source and target slots of one epoch's batches that hold padding."""
        real = slots = 0
        size = self.batch_size
        for batch in self._batches(epoch):
            for r in range(self.world_size):
                rows = [self.examples[int(i)] for i in batch[r * size:(r + 1) * size]]
                S, T = max(len(s) for s, _ in rows), max(len(t) for _, t in rows) + 1
                slots += len(rows) * (S + T)
                real += sum(len(s) + len(t) + 1 for s, t in rows)
        return 1 - real / max(1, slots)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "examples": len(self.examples), "bucket": self.bucket}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        mine = {"seed": self.seed, "batch_size": self.batch_size, "world_size": self.world_size,
                "examples": len(self.examples), "bucket": self.bucket}
        for key, value in mine.items():
            if key in state and state[key] != value:
                raise DataError(f"cannot resume the data position: the run had {key}={state[key]}, this one has "
                                f"{key}={value}; resume with the same data and settings")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])


def encode_pairs(path: Path, tokenizer: Tokenizer, max_source: int, max_target: int) -> tuple[list[Example], int]:
    """The pairs of a JSONL file as token ids, sources cut to `max_source` tokens and targets to `max_target`
    (which leaves room for the start and end tokens), and how many were cut."""
    rows = load_pairs(path)
    sources = tokenizer.encode_batch([r["source"] for r in rows], add_bos=False)
    targets = tokenizer.encode_batch([r["target"] for r in rows], add_bos=False)
    cut = sum(len(s) > max_source or len(t) > max_target for s, t in zip(sources, targets))
    return [(s[:max_source], t[:max_target]) for s, t in zip(sources, targets)], cut


def pairs_loaders(data: Path, tokenizer: Tokenizer, *, max_source: int, max_target: int, batch_size: int,
                  pad_id: int, start_id: int, eos_id: int, seed: int, rank: int, world_size: int
                  ) -> tuple[Seq2SeqLoader, Seq2SeqLoader | None, str]:
    """Training and validation loaders of a pairs directory (or a train JSONL file), and a summary line."""
    train, cut = encode_pairs(split_file(data, "train"), tokenizer, max_source, max_target)
    ids = {"pad_id": pad_id, "start_id": start_id, "eos_id": eos_id}
    loader = Seq2SeqLoader(train, batch_size, seed=seed, rank=rank, world_size=world_size, **ids)
    plain = Seq2SeqLoader(train, batch_size, seed=seed, bucket=False, world_size=world_size, **ids)
    summary = (f"data: {len(train):,} pairs, {loader.tokens_per_epoch:,} target tokens an epoch"
               f"{f' ({cut} cut to {max_source}/{max_target} tokens)' if cut else ''}; padding "
               f"{100 * loader.padding_fraction():.1f}% bucketed by length ({100 * plain.padding_fraction():.1f}% "
               "unbucketed)")
    val_loader = None
    valid_file = Path(data) / "valid.jsonl"
    if Path(data).is_dir() and valid_file.is_file():
        val, _ = encode_pairs(valid_file, tokenizer, max_source, max_target)
        per_rank = min(batch_size, len(val) // world_size)
        if per_rank >= 1:
            val_loader = Seq2SeqLoader(val, per_rank, shuffle=False, rank=rank, world_size=world_size, **ids)
            summary += f"; {len(val):,} validation pairs"
    return loader, val_loader, summary


def _special_ids(tokenizer: Tokenizer, where: Path) -> dict[str, int]:
    """pad, decoder start and eos ids of a tokenizer: the decoder starts from BOS (pad where there is none)."""
    if tokenizer.eos_id is None or tokenizer.pad_id is None:
        raise ConfigError(f"{where}: the tokenizer needs an eos and a pad token for an encoder-decoder (eos_token "
                          "and pad_token in tokenizer_config.json); `lmforge tokenizer train` reserves both")
    start = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.pad_id
    return {"pad_id": tokenizer.pad_id, "decoder_start_id": start, "eos_id": tokenizer.eos_id}


def seq2seq_method(ctx: Context, data: Path | None, tokenizer: Path | None, model: str | None, *,
                   block_size: int | None, dropout: float | None, label_smoothing: float | None) -> Method:
    """An encoder-decoder trained with teacher forcing on a pairs directory: `pretrain --task seq2seq`.

    `model` is a preset (default seq2seq-small) or a seq2seq checkpoint directory to continue from (its
    tokenizer then comes along); `block_size` cuts sources and targets (default: the model's max_positions).
    """
    if data is None:
        raise ConfigError("--data is required: a pairs directory written by `lmforge data pairs`")
    data = Path(data)
    if not (is_pairs_dir(data) or data.is_file()):
        raise ConfigError(f"--data {data}: not a pairs directory (no meta.json from `lmforge data pairs`) nor a "
                          "JSONL file of {\"source\", \"target\"} rows")
    overrides = {k: v for k, v in (("dropout", dropout), ("label_smoothing", label_smoothing)) if v is not None}
    start_from = ctx.resume if ctx.resume is not None else (Path(model) if model and Path(model).is_dir() else None)
    if start_from is not None:
        tokenizer_dir = start_from if ctx.resume is not None or tokenizer is None else Path(tokenizer)
        tok = Tokenizer.load(tokenizer_dir)
        config = Seq2SeqConfig.load(start_from / "config.json")
        config = config.replace(**overrides) if ctx.resume is None else config
        if tok.vocab_size > config.vocab_size:
            raise ConfigError(f"{tokenizer_dir}: a tokenizer of {tok.vocab_size} tokens for a model of "
                              f"vocab_size={config.vocab_size} ({start_from})")
        net = Seq2Seq(config)
        load_weights(net, start_from)
    else:
        if tokenizer is None:
            raise ConfigError("--tokenizer is required for a new encoder-decoder: the directory written by "
                              "`lmforge tokenizer train --data PAIRS --fields source,target`")
        tokenizer_dir = Path(tokenizer)
        tok = Tokenizer.load(tokenizer_dir)
        config = seq2seq_preset(model or "seq2seq-small", vocab_size=tok.vocab_size,
                                **_special_ids(tok, tokenizer_dir), **overrides)
        net = Seq2Seq(config)
    longest = block_size or config.max_positions
    if longest > config.max_positions:
        raise ConfigError(f"block_size={longest} exceeds the model's max_positions={config.max_positions}")
    cfg, dist = ctx.cfg, ctx.dist
    loader, val_loader, data_summary = pairs_loaders(
        data, tok, max_source=longest, max_target=longest - 1, batch_size=cfg.batch_size, pad_id=config.pad_id,
        start_id=config.decoder_start_id, eos_id=config.eos_id, seed=cfg.seed, rank=dist.rank,
        world_size=dist.world_size)
    generation_config = {"max_new_tokens": min(256, config.max_positions - 1), "num_beams": 1, "temperature": 0.0,
                         "length_penalty": 1.0, "eos_token_id": config.eos_id, "pad_token_id": config.pad_id,
                         "decoder_start_token_id": config.decoder_start_id}

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_checkpoint(out, net, config, tokenizer_dir=tokenizer_dir, generation_config=generation_config,
                        train_state=train_state, step=step)

    summary = (f"model: encoder-decoder, {net.num_params() / 1e6:.2f}M parameters ({config.n_encoder_layers}+"
               f"{config.n_decoder_layers} layers, d_model {config.d_model}), label smoothing "
               f"{config.label_smoothing:g}; {data_summary}")
    return Method(net, loader, seq2seq_loss, save, val_loader=val_loader, summary=summary)
