"""Instruction-tuning data: read SFT formats, render them with the chat template, mask the loss, pack windows.

Formats, one example per JSONL line (or CSV / TSV / Parquet row, read by `lmforge.data.readers.read_rows`):
  chat        {"messages": [{"role": "system"|"user"|"assistant", "content": ...}, ...]}    (OpenAI)
              {"conversations": [{"from": "system"|"human"|"gpt", "value": ...}, ...]}      (ShareGPT)
  Alpaca      {"instruction": ..., "input": ... (optional), "output": ...}  → one user and one assistant turn
  completion  {"prompt": ..., "completion": ...}                            → raw text, no template

Loss masking: only the assistant's tokens are targets (every assistant turn, or the last one); system
and user turns and the template's own "assistant header" get IGNORE_INDEX. Assistant spans are found by
rendering the conversation incrementally — the text up to a turn's generation prompt, then up to the
turn's end — and mapping those character spans onto tokens through the tokenizer's offsets, so any chat
template whose renders are prefixes of each other works, whatever its markup.

Packing several examples into one window happens at training time (`lmforge.train.loaders.SFTLoader`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from lmforge.data.readers import read_rows
from lmforge.errors import ConfigError, DataError
from lmforge.tokenizer import CHATML_TEMPLATE, Tokenizer

ROLES = ("system", "user", "assistant")
SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant",
                  "chatgpt": "assistant", "bing": "assistant", "bard": "assistant"}
TrainOn = Literal["all", "last"]


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
    for line_no, row in read_rows(path):
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
