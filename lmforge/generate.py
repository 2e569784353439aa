"""Autoregressive decoding: sample one token from the logits, append it, repeat.

The pieces are kept separate so the inference engine (batching, serving) can reuse them:
`sample_next` turns a batch of logits into tokens, `generate_tokens` drives one sequence through a
KV cache, and `stream` / `generate` turn tokens into text with stop strings.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.tokenizer import IncrementalDecoder

if TYPE_CHECKING:
    from lmforge.model.gpt import KVCache
    from lmforge.tokenizer import Tokenizer


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Args:
        max_new_tokens: Most tokens to generate after the prompt.
        temperature: Divides the logits; below 1 sharpens, above 1 flattens; 0 is greedy (argmax).
        top_k: Sample only among the k most likely tokens (Fan et al. 2018); None keeps all.
        top_p: Nucleus sampling (Holtzman et al. 2020): the smallest set of tokens whose probability
            sums to at least top_p; 1.0 keeps all.
        repetition_penalty: CTRL's penalty (Keskar et al. 2019) on tokens already in the prompt or output;
            above 1 discourages repeats, 1.0 is off.
        stop: Strings that end generation; the text returned stops just before the first one.
        seed: Makes sampling reproducible; None draws from torch's global generator.
        stop_at_eos: End at the tokenizer's end-of-sequence token.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1, or None to keep every token")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 is off)")
        if any(not s for s in self.stop):
            raise ConfigError(f"stop={self.stop!r} contains an empty string, which would stop at once")


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): divide positive logits and multiply negative ones of seen tokens.

    Dividing both signs by the penalty would make a disliked token *more* likely; this always lowers it.
    """
    scores = logits.gather(-1, seen)
    scores = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits.scatter(-1, seen, scores)


def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Keep exactly the k largest logits (ties broken by index) and mask the rest to -inf."""
    values, indices = logits.topk(min(k, logits.shape[-1]), dim=-1)
    return torch.full_like(logits, float("-inf")).scatter(-1, indices, values)


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose probabilities sum to at least p.

    A token is dropped when the tokens ranked above it already reach p, so the top one always stays.
    """
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    drop = (mass_before >= p).scatter(-1, order, mass_before >= p)
    return logits.masked_fill(drop, float("-inf"))


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: Tensor | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V]: penalty → temperature → top-k → top-p → multinomial.

    `seen` holds token ids [B, S] already in each sequence (prompt and output) for the repetition penalty;
    repeats in it are harmless. The logits are not modified.
    """
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0 and seen.numel():
        logits = apply_repetition_penalty(logits, seen.to(logits.device, torch.long), params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator).squeeze(-1)


def fit_prompt(prompt: Tensor, max_new_tokens: int, context: int) -> tuple[Tensor, int]:
    """Cut the prompt from the left so prompt + new tokens fit the context; keep at least one prompt token.

    The most recent text matters most to the next token, so the oldest is dropped. When max_new_tokens
    alone fills the context, generation ends early as the context fills.
    """
    if prompt.numel() == 0:
        raise ConfigError("prompt is empty: the model needs at least one token to condition on")
    keep = max(1, context - max_new_tokens)
    if prompt.numel() > keep:
        warnings.warn(f"prompt of {prompt.numel()} tokens + max_new_tokens={max_new_tokens} exceeds the "
                      f"context of {context}; keeping the last {keep} prompt tokens", stacklevel=3)
        prompt = prompt[-keep:]
    return prompt, min(max_new_tokens, context - prompt.numel())


@torch.inference_mode()
def _forward(model: nn.Module, idx: Tensor, cache: KVCache) -> Tensor:
    return model(idx, cache=cache)[:, -1, :]


def generate_tokens(model: nn.Module, prompt_ids: list[int] | Tensor, params: SamplingParams,
                    eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt, one at a time, through a KV cache.

    The prompt is run once (prefill); each later step feeds only the newest token, so a step costs
    one position instead of the whole sequence. A prompt that leaves no room for max_new_tokens is cut
    from the left (with a warning), see `fit_prompt`. The end-of-sequence token is not yielded.

    Grad mode is switched off per forward call rather than around the loop, so the caller's code between
    yields runs with its own autograd state. The model is put in eval mode and restored when the
    iterator finishes or is closed.
    """
    device = next(model.parameters()).device
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() > 1 and prompt.shape[0] != 1:
        raise ConfigError(f"prompt_ids has shape {tuple(prompt.shape)}; generate_tokens takes one sequence")
    prompt = prompt.reshape(-1)
    prompt, max_new = fit_prompt(prompt, params.max_new_tokens, model.config.max_position_embeddings)
    if max_new == 0:
        return
    generator = None
    if params.seed is not None:
        generator = torch.Generator(device=device).manual_seed(params.seed)
    n = prompt.numel()
    tokens = torch.empty(1, n + max_new, dtype=torch.long, device=device)
    tokens[0, :n] = prompt.to(device)
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            cache = model.new_cache(1, max_length=n + max_new)
        logits = _forward(model, tokens[:, :n], cache)
        for i in range(max_new):
            token = sample_next(logits, params, generator, seen=tokens[:, :n + i])
            token_id = int(token.item())
            if params.stop_at_eos and eos_id is not None and token_id == eos_id:
                return
            tokens[0, n + i] = token_id
            yield token_id
            if i + 1 < max_new:
                logits = _forward(model, tokens[:, n + i:n + i + 1], cache)
    finally:
        model.train(was_training)


def _held_tail(text: str, stop: list[str]) -> int:
    """Length of the longest end of `text` that could still grow into a stop string."""
    for n in range(min(len(text), max(map(len, stop)) - 1), 0, -1):
        if any(s.startswith(text[-n:]) for s in stop):
            return n
    return 0


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the generated text in pieces as tokens arrive, ending before any stop string.

    Pieces never split a multi-byte character (IncrementalDecoder) and never show any of a stop string:
    text that could be its start is held back until the next tokens complete it (and it is dropped) or
    rule it out (and it is released).
    """
    decoder = IncrementalDecoder(tokenizer, skip_special_tokens=True)
    tokens = generate_tokens(model, tokenizer.encode(prompt), params, eos_id=tokenizer.eos_id)
    pending = ""
    try:
        for token in tokens:
            pending += decoder.push(token)
            if not params.stop:
                if pending:
                    yield pending
                pending = ""
                continue
            hits = [i for i in (pending.find(s) for s in params.stop) if i >= 0]
            if hits:
                if min(hits):
                    yield pending[:min(hits)]
                return
            ready = len(pending) - _held_tail(pending, params.stop)
            if ready:
                yield pending[:ready]
                pending = pending[ready:]
        pending += decoder.flush()
        hits = [i for i in (pending.find(s) for s in params.stop) if i >= 0]
        if hits:
            pending = pending[:min(hits)]
        if pending:
            yield pending
    finally:
        tokens.close()


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole completion of `prompt` as one string; exactly the concatenation of `stream`."""
    return "".join(stream(model, tokenizer, prompt, params))
