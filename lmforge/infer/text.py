"""From token ids to the text a user sees: incremental detokenization with stop strings, and chat prompts."""

from __future__ import annotations

from typing import Any

from lmforge.tokenizer import IM_END, IncrementalDecoder, Tokenizer


def held_tail(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    for n in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


class TextStream:
    """Text pieces for one sequence as its tokens arrive, ending before any stop string.

    Pieces never split a multi-byte character (IncrementalDecoder) and never show any of a stop string:
    text that could be its start is held back until the next tokens complete it (and it is dropped) or
    rule it out (and it is released).
    """

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
        self.stop = list(stop or [])
        self.pending = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        """The text now safe to show; sets `stopped` when a stop string appeared (nothing after it is shown)."""
        self.pending += self.decoder.push(token_id)
        return self._release(final=False)

    def finish(self) -> str:
        """Whatever is still held back, once no token will follow."""
        if self.stopped:
            return ""
        self.pending += self.decoder.flush()
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        if not self.stop:
            out, self.pending = self.pending, ""
            return out
        hits = [i for i in (self.pending.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.stopped = True
            out, self.pending = self.pending[:min(hits)], ""
            return out
        ready = len(self.pending) if final else len(self.pending) - held_tail(self.pending, self.stop)
        out, self.pending = self.pending[:ready], self.pending[ready:]
        return out


def chat_prompt(tokenizer: Tokenizer, messages: list[dict[str, Any]]) -> tuple[str, list[str]]:
    """The prompt for the assistant's next turn, and the strings that end that turn (ChatML's <|im_end|>)."""
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    stop = [IM_END] if tokenizer.token_to_id(IM_END) is not None else []
    return prompt, stop


def special_stop_ids(tokenizer: Tokenizer, stop: list[str]) -> set[int]:
    """Ids of stop strings that are special tokens (<|im_end|>): the streamed text skips special tokens,
    so these can only be caught by id, as the end-of-sequence token is."""
    ids = set()
    for s in stop:
        token_id = tokenizer.token_to_id(s)
        if token_id is not None and not tokenizer.decode([token_id], skip_special_tokens=True):
            ids.add(token_id)
    return ids
