"""How the next token is chosen: sampling settings and the logits transforms, for one row or a batch.

Order, as in Hugging Face and vLLM: penalties (on raw logits) → temperature → top-k → top-p → min-p → draw.
Each row of a batch has its own settings and its own random generator, so a request samples the same
tokens alone or batched with others.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lmforge.errors import ConfigError

MAX_LOGPROBS = 20  # OpenAI's limit on top logprobs per position


@dataclass
class SamplingParams:
    """How to pick each next token and when to stop.

    Args:
        max_new_tokens: Most tokens to generate after the prompt.
        temperature: Divides the logits; below 1 sharpens, above 1 flattens; 0 is greedy (argmax).
        top_k: Sample only among the k most likely tokens (Fan et al. 2018); None keeps all.
        top_p: Nucleus sampling (Holtzman et al. 2020): the smallest set of tokens whose probability
            sums to at least top_p; 1.0 keeps all.
        min_p: Drop tokens less likely than min_p times the most likely one (Nguyen et al. 2024); 0 is off.
        repetition_penalty: CTRL's penalty (Keskar et al. 2019) on tokens already in the prompt or output;
            above 1 discourages repeats, 1.0 is off.
        presence_penalty: OpenAI's: subtracted once from the logit of every token already generated.
        frequency_penalty: OpenAI's: subtracted per earlier occurrence in the generated tokens.
        stop: Strings that end generation; the text returned stops just before the first one.
        seed: Makes sampling reproducible; None draws from torch's global generator.
        stop_at_eos: End at the tokenizer's end-of-sequence token.
        logprobs: Also report the chosen token's log-probability and this many most likely alternatives.
        num_beams: Above 1, beam search (deterministic) instead of sampling.
        length_penalty: Beam search ranks finished beams by sum(log p) / length**length_penalty.
    """

    max_new_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stop_at_eos: bool = True
    logprobs: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        if self.max_new_tokens < 0:
            raise ConfigError(f"max_new_tokens={self.max_new_tokens} must be >= 0")
        if self.temperature < 0:
            raise ConfigError(f"temperature={self.temperature} must be >= 0 (0 means greedy)")
        if self.top_k is not None and self.top_k < 1:
            raise ConfigError(f"top_k={self.top_k} must be >= 1, or None to keep every token")
        if not 0 < self.top_p <= 1:
            raise ConfigError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.min_p <= 1:
            raise ConfigError(f"min_p={self.min_p} must be in [0, 1]")
        if self.repetition_penalty <= 0:
            raise ConfigError(f"repetition_penalty={self.repetition_penalty} must be > 0 (1.0 is off)")
        if any(not s for s in self.stop):
            raise ConfigError(f"stop={self.stop!r} contains an empty string, which would stop at once")
        if self.logprobs is not None and not 0 <= self.logprobs <= MAX_LOGPROBS:
            raise ConfigError(f"logprobs={self.logprobs} must be between 0 and {MAX_LOGPROBS}")
        if self.num_beams < 1:
            raise ConfigError(f"num_beams={self.num_beams} must be >= 1")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def penalized(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


def apply_repetition_penalty(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): divide positive logits and multiply negative ones of seen tokens.

    Dividing both signs by the penalty would make a disliked token *more* likely; this always lowers it.
    `seen` holds token ids [B, S]; repeats in it are harmless.
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


def min_p_filter(logits: Tensor, min_p: float) -> Tensor:
    """Drop tokens whose probability is below min_p × the top probability (the top one always stays)."""
    probs = logits.softmax(dim=-1)
    return logits.masked_fill(probs < min_p * probs.amax(dim=-1, keepdim=True), float("-inf"))


def penalize(logits: Tensor, params: Sequence[SamplingParams], seen: Tensor, counts: Tensor) -> Tensor:
    """All three penalties for a batch [B, V]: CTRL's on `seen` (bool [B, V], prompt and output), then
    OpenAI's `logit -= frequency·count + presence·[count > 0]` on `counts` [B, V] of generated tokens."""
    device = logits.device
    rep = torch.tensor([p.repetition_penalty for p in params], device=device)[:, None]
    if (rep != 1).any():
        logits = torch.where(seen, torch.where(logits > 0, logits / rep, logits * rep), logits)
    freq = torch.tensor([p.frequency_penalty for p in params], device=device)[:, None]
    presence = torch.tensor([p.presence_penalty for p in params], device=device)[:, None]
    if (freq != 0).any() or (presence != 0).any():
        counts = counts.to(logits.dtype)
        logits = logits - counts * freq - (counts > 0).to(logits.dtype) * presence
    return logits


def sample_row(logits: Tensor, params: SamplingParams, generator: torch.Generator | None) -> Tensor:
    """Token ids [..., 1] from penalized logits [..., V] under one set of params: temperature, filters, draw."""
    if params.greedy:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / params.temperature
    if params.top_k is not None:
        logits = top_k_filter(logits, params.top_k)
    if params.top_p < 1.0:
        logits = top_p_filter(logits, params.top_p)
    if params.min_p > 0.0:
        logits = min_p_filter(logits, params.min_p)
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)


def sample_batch(logits: Tensor, params: Sequence[SamplingParams], generators: Sequence[torch.Generator | None],
                 seen: Tensor | None = None, counts: Tensor | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V], each row with its own settings and generator.

    When every row is greedy and unpenalized (the common serving case) this is one argmax; otherwise
    penalties are applied to the whole batch and each row is filtered and drawn with its own generator,
    so its draws do not depend on what else is in the batch.
    """
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    if seen is not None and counts is not None and any(p.penalized for p in params):
        logits = penalize(logits, params, seen, counts)
    if all(p.greedy for p in params):
        return logits.argmax(dim=-1)
    return torch.cat([sample_row(logits[i], p, g) for i, (p, g) in enumerate(zip(params, generators))])


def sample_next(logits: Tensor, params: SamplingParams, generator: torch.Generator | None = None,
                seen: Tensor | None = None) -> Tensor:
    """Next token ids [B] from logits [B, V] under one set of params; `seen` [B, S] holds ids already in
    each sequence (prompt and output) for the repetition penalty. The logits are not modified."""
    logits = logits.float()
    if seen is not None and params.repetition_penalty != 1.0 and seen.numel():
        logits = apply_repetition_penalty(logits, seen.to(logits.device, torch.long), params.repetition_penalty)
    return sample_row(logits, params, generator).squeeze(-1)
