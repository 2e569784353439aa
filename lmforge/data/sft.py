"""Instruction-tuning data: read SFT formats, render them with the chat template, mask the loss, pack windows.

Formats, one example per JSONL line (or CSV row):
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}    (OpenAI)
              {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}      (ShareGPT)
  Alpaca      {"instruction": ..., "input": ... (optional), "output": ...}  → one user and one assistant turn
  completion  {"prompt": ..., "completion": ...}                            → raw text, no template

Loss masking: only the assistant's tokens are targets (every assistant turn, or the last one); system
and user turns and the template's own "assistant header" get IGNORE_INDEX. Assistant spans are found by
rendering the conversation incrementally — the text up to a turn's generation prompt, then up to the
turn's end — and mapping those character spans onto tokens through the tokenizer's offsets, so any chat
template whose renders are prefixes of each other works, whatever its markup.

Packing: several examples share one window; each restarts its positions at 0 and attends only to
itself through a block-diagonal causal mask, so a packed example computes exactly what it would alone.
"""

from __future__ import annotations

import csv
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.datasets import iter_jsonl_rows
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

IGNORE_INDEX = -100  # lmforge.train.loop.IGNORE_INDEX (not imported: data must load without the trainer)
ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
TrainOn = Literal["all", "last"]


def read_records(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, row) for every non-blank JSONL line or CSV row (line of the row's start)."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            try:
                if reader.fieldnames is None:  # reads the header line
                    raise DataError(f"{path}: empty CSV file (no header row)")
                line_no = reader.line_num + 1
                for row in reader:
                    if row and any(v for v in row.values() if v):
                        if None in row:
                            raise DataError(f"{path}:{line_no}: more fields than the header's {reader.fieldnames}")
                        yield line_no, row
                    line_no = reader.line_num + 1
            except (csv.Error, UnicodeDecodeError) as e:
                raise DataError(f"{path}:{line_no}: unreadable CSV ({e})") from None
        return
    if not path.name.lower().endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        raise DataError(f"{path}: expected a .jsonl (optionally .gz / .zst) or .csv file")
    yield from iter_jsonl_rows(path)


def _text_field(row: dict[str, Any], key: str, where: str, optional: bool = False) -> str:
    value = row.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        found = "missing" if key not in row else f"a {type(value).__name__}, not a string"
        raise DataError(f"{where}: field {key!r} is {found} (found keys: {sorted(row)})")
    return value


def to_example(row: dict[str, Any], where: str) -> list[dict[str, str]] | tuple[str, str]:
    """A conversation (list of role/content messages) or a (prompt, completion) pair; `where` = file:line."""
    if "messages" in row or "conversations" in row:
        key = "messages" if "messages" in row else "conversations"
        turns = row[key]
        if not isinstance(turns, list) or not turns:
            raise DataError(f"{where}: {key!r} must be a non-empty list of turns")
        messages = []
        for i, turn in enumerate(turns):
            if not isinstance(turn, dict):
                raise DataError(f"{where}: {key}[{i}] must be an object, got {type(turn).__name__}")
            if key == "messages":
                role, content = turn.get("role"), turn.get("content")
                if role not in ROLES:
                    raise DataError(f"{where}: messages[{i}] has role {role!r}; expected one of {ROLES}")
            else:
                role, content = SHAREGPT_ROLES.get(str(turn.get("from"))), turn.get("value")
                if role is None:
                    raise DataError(f"{where}: conversations[{i}] has from={turn.get('from')!r}; expected one of "
                                    f"{sorted(SHAREGPT_ROLES)}")
            if not isinstance(content, str):
                raise DataError(f"{where}: {key}[{i}] has no text content (got {type(content).__name__})")
            messages.append({"role": role, "content": content})
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: no assistant turn in this conversation; there is nothing to train on")
        return messages
    if "instruction" in row and "output" in row:
        instruction = _text_field(row, "instruction", where)
        extra = _text_field(row, "input", where, optional=True)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": _text_field(row, "output", where)}]
    if "prompt" in row and "completion" in row:
        return _text_field(row, "prompt", where), _text_field(row, "completion", where)
    raise DataError(f"{where}: not an SFT example: expected 'messages' (or ShareGPT 'conversations'), "
                    f"'instruction'+'output' (Alpaca) or 'prompt'+'completion'; found keys {sorted(row)}")


@dataclass
class Example:
    """Token ids and, per token, whether it is a training target (the assistant's or the completion's)."""

    ids: list[int]
    trained: list[bool]


def _render(tokenizer: Tokenizer, messages: list[dict[str, str]], generation_prompt: bool) -> str:
    if tokenizer.chat_template is None:  # imported models ship theirs; ChatML is our tokenizers' default
        tokenizer.chat_template = CHATML_TEMPLATE
    return tokenizer.apply_chat_template(messages, add_generation_prompt=generation_prompt)


def assistant_spans(tokenizer: Tokenizer, messages: list[dict[str, str]],
                    train_on: TrainOn = "all") -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans of the assistant replies to train on.

    A span starts after the template's generation prompt (the header the model is given at inference)
    and ends where the turn's render ends, trailing whitespace excluded, so it holds the reply and the
    template's end-of-turn token (which the model must learn to emit).
    """
    text = _render(tokenizer, messages, False)
    spans = []
    for k, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, messages[:k], True)
        through = _render(tokenizer, messages[:k + 1], False)
        if not (text.startswith(through) and through.startswith(before)):
            raise ConfigError("the chat template does not render a conversation as a prefix of its continuation "
                              f"(turn {k}); assistant turns cannot be located for loss masking")
        spans.append((len(before), len(through.rstrip())))
    return text, spans[-1:] if train_on == "last" else spans


def encode_chat(tokenizer: Tokenizer, messages: list[dict[str, str]], train_on: TrainOn = "all") -> Example:
    text, spans = assistant_spans(tokenizer, messages, train_on)
    encoding = tokenizer.hf.encode(text, add_special_tokens=False)
    # A token is the assistant's when it starts inside a span (a token never straddles a special token).
    trained = [any(a <= start < b for a, b in spans) for start, _ in encoding.offsets]
    ids = list(encoding.ids)
    bos = tokenizer.token_str("bos_token")
    if tokenizer.add_bos and tokenizer.bos_id is not None and not (bos and text.startswith(bos)):
        ids, trained = [tokenizer.bos_id, *ids], [False, *trained]
    return Example(ids, trained)


def encode_completion(tokenizer: Tokenizer, prompt: str, completion: str) -> Example:
    """Raw text, no template: prompt tokens masked, completion tokens and a closing eos trained."""
    prompt_ids = tokenizer.encode(prompt)
    completion_ids = tokenizer.encode(completion, add_bos=False)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    return Example(prompt_ids + completion_ids + eos, [False] * len(prompt_ids) + [True] * (len(completion_ids) + 1))


def load_sft(path: Path, tokenizer: Tokenizer, *, train_on: TrainOn = "all",
             max_length: int | None = None) -> list[Example]:
    """Every example of an SFT file, encoded and masked; examples longer than `max_length` tokens are cut."""
    if train_on not in ("all", "last"):
        raise ConfigError(f"train_on={train_on!r} is not one of 'all', 'last'")
    examples, cut, dropped = [], 0, 0
    for line_no, row in read_records(Path(path)):
        ex = to_example(row, f"{path}:{line_no}")
        example = encode_chat(tokenizer, ex, train_on) if isinstance(ex, list) else encode_completion(tokenizer, *ex)
        if max_length is not None and len(example.ids) > max_length:
            cut += 1
            example = Example(example.ids[:max_length], example.trained[:max_length])
        if not any(example.trained[1:]):
            dropped += 1  # nothing left to learn: its reply lies past the cut (or the first token alone)
            continue
        examples.append(example)
    if cut or dropped:
        print(f"note: {path}: {cut} example(s) cut to {max_length} tokens, {dropped} dropped with no target left",
              file=sys.stderr)
    if not examples:
        raise DataError(f"{path}: no usable examples")
    return examples


def block_diagonal_mask(segments: Tensor) -> Tensor:
    """[B, 1, T, T] (True = attend): causal within each example (segment id > 0), nothing across examples.

    Padding (segment 0) attends only to itself, so no softmax row is empty (which would be NaN).
    """
    same = segments[:, :, None] == segments[:, None, :]
    T = segments.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segments.device).tril()
    real = (segments > 0)[:, :, None]
    eye = torch.eye(T, dtype=torch.bool, device=segments.device)
    return ((same & causal & real) | eye)[:, None]


def sft_loss(model: nn.Module, x: dict[str, Tensor], y: Tensor) -> Tensor:
    """Cross-entropy over the assistant tokens of packed windows (position resets + block-diagonal mask)."""
    logits = model(x["input_ids"], positions=x["positions"], attention_mask=block_diagonal_mask(x["segments"]))
    return F.cross_entropy(logits.flatten(0, 1).float(), y.flatten(), ignore_index=IGNORE_INDEX)


class SFTLoader:
    """Batches of SFT windows: examples in a seeded order per epoch, packed next-fit into `block_size` tokens.

    x is a dict: input_ids, positions (restart at 0 per example) and segments (1, 2, ... per example, 0
    for padding); y holds the next token where it is a target, IGNORE_INDEX elsewhere. With pack=False
    each window holds one example. The order, hence the packing, depends on (seed, epoch) alone, so the
    state (epoch, index) resumes at the exact batch.
    """

    def __init__(self, examples: list[Example], block_size: int, batch_size: int, pad_id: int, *, seed: int = 0,
                 pack: bool = True, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        if block_size < 2 or batch_size < 1:
            raise ConfigError(f"block_size={block_size} must be at least 2 and batch_size={batch_size} at least 1")
        too_long = [i for i, e in enumerate(examples) if len(e.ids) - 1 > block_size]
        if too_long:
            raise ConfigError(f"example {too_long[0]} has {len(examples[too_long[0]].ids)} tokens, more than "
                              f"block_size+1={block_size + 1}; load it with max_length=block_size+1")
        self.examples, self.block_size, self.batch_size, self.pad_id = examples, block_size, batch_size, pad_id
        self.seed, self.pack, self.shuffle, self.rank, self.world_size = seed, pack, shuffle, rank, world_size
        self.epoch, self.index = 0, 0
        self._cached: tuple[int, list[list[int]]] | None = None
        if self.batches_per_epoch < 1:
            raise DataError(f"{len(examples)} examples make {len(self._windows())} windows of {block_size} tokens, "
                            f"fewer than one batch of {batch_size * world_size}; use a smaller --batch-size")

    def _windows(self) -> list[list[int]]:
        if self._cached is not None and self._cached[0] == self.epoch:
            return self._cached[1]
        order = (np.random.default_rng((self.seed, self.epoch)).permutation(len(self.examples)) if self.shuffle
                 else np.arange(len(self.examples)))
        windows: list[list[int]] = []
        used = self.block_size
        for i in map(int, order):
            n = len(self.examples[i].ids) - 1
            if self.pack and used + n <= self.block_size:
                windows[-1].append(i)
                used += n
            else:
                windows.append([i])
                used = n
        self._cached = (self.epoch, windows)
        return windows

    @property
    def batches_per_epoch(self) -> int:
        return len(self._windows()) // (self.batch_size * self.world_size)

    def window(self, members: list[int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        T = self.block_size
        ids = torch.full((T,), self.pad_id, dtype=torch.long)
        targets = torch.full((T,), IGNORE_INDEX, dtype=torch.long)
        positions = torch.zeros(T, dtype=torch.long)
        segments = torch.zeros(T, dtype=torch.long)
        at = 0
        for seg, i in enumerate(members, start=1):
            ex = self.examples[i]
            n = len(ex.ids) - 1
            tokens = torch.tensor(ex.ids)
            ids[at:at + n] = tokens[:-1]
            targets[at:at + n] = torch.where(torch.tensor(ex.trained[1:]), tokens[1:], IGNORE_INDEX)
            positions[at:at + n] = torch.arange(n)
            segments[at:at + n] = seg
            at += n
        return ids, targets, positions, segments

    def next_batch(self) -> tuple[dict[str, Tensor], Tensor]:
        windows = self._windows()
        start = self.index * self.batch_size * self.world_size + self.rank * self.batch_size
        rows = [self.window(w) for w in windows[start:start + self.batch_size]]
        self.index += 1
        if self.index >= self.batches_per_epoch:
            self.epoch, self.index = self.epoch + 1, 0
        ids, targets, positions, segments = (torch.stack(t) for t in zip(*rows))
        return {"input_ids": ids, "positions": positions, "segments": segments}, targets

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "index": self.index, "seed": self.seed, "block_size": self.block_size,
                "batch_size": self.batch_size, "pack": self.pack, "world_size": self.world_size}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("seed", "block_size", "batch_size", "pack", "world_size"):
            if state.get(key, getattr(self, key)) != getattr(self, key):
                raise ConfigError(f"cannot resume: the run used {key}={state[key]}, this loader has "
                                  f"{getattr(self, key)}")
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
