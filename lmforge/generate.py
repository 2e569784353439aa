"""Autoregressive decoding for one caller: prompt in, tokens or text out, through the inference engine.

The sampling settings and transforms live in `lmforge.infer.sampling` and the batching engine in
`lmforge.infer.engine`; this module is the single-caller face of them (what `LM.generate`, `LM.stream`
and `lmforge generate` use), so every path decodes the same way.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator

import torch
from torch import Tensor, nn

from lmforge.errors import ConfigError
from lmforge.infer.engine import Engine, Output, Request
from lmforge.infer.sampling import (
    SamplingParams,
    apply_repetition_penalty,
    min_p_filter,
    sample_next,
    top_k_filter,
    top_p_filter,
)
from lmforge.tokenizer import Tokenizer

__all__ = ["SamplingParams", "apply_repetition_penalty", "fit_prompt", "generate", "generate_batch",
           "generate_tokens", "min_p_filter", "sample_next", "stream", "top_k_filter", "top_p_filter"]


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
                      f"context of {context}; keeping the last {keep} prompt tokens", stacklevel=4)
        prompt = prompt[-keep:]
    return prompt, min(max_new_tokens, context - prompt.numel())


def _outputs(model: nn.Module, tokenizer: Tokenizer | None, prompt_ids: list[int] | Tensor, params: SamplingParams,
             eos_id: int | None = None) -> Iterator[Output]:
    """One request through a private engine sized to it; the model is in eval mode only while it runs."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() > 1 and prompt.shape[0] != 1:
        raise ConfigError(f"prompt_ids has shape {tuple(prompt.shape)}; generate_tokens takes one sequence")
    prompt, max_new = fit_prompt(prompt.reshape(-1), params.max_new_tokens, model.config.max_position_embeddings)
    if max_new == 0:
        return
    params = dataclasses.replace(params, max_new_tokens=max_new)
    engine = Engine(model, tokenizer, max_batch=1, max_length=prompt.numel() + max_new, eos_id=eos_id)
    was_training = model.training
    model.eval()
    try:
        yield from engine.generate(Request(prompt.tolist(), params))
    finally:
        model.train(was_training)


def generate_tokens(model: nn.Module, prompt_ids: list[int] | Tensor, params: SamplingParams,
                    eos_id: int | None = None) -> Iterator[int]:
    """Yield new token ids for one prompt, one at a time, through a KV cache.

    The prompt is run once (prefill); each later step feeds only the newest token. A prompt that leaves
    no room for max_new_tokens is cut from the left (with a warning), see `fit_prompt`. The
    end-of-sequence token is not yielded. Grad mode is off only inside each engine step, so the caller's
    code between yields keeps its own autograd state; a training model is put back in training mode.
    """
    for out in _outputs(model, None, prompt_ids, params, eos_id):
        yield from out.token_ids


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> Iterator[str]:
    """Yield the generated text in pieces as tokens arrive, ending before any stop string.

    Pieces never split a multi-byte character and never show any of a stop string (see `TextStream`).
    """
    for out in _outputs(model, tokenizer, tokenizer.encode(prompt), params):
        if out.text:
            yield out.text


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole completion of `prompt` as one string; exactly the concatenation of `stream`."""
    return "".join(stream(model, tokenizer, prompt, params))


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: list[str], params: SamplingParams,
                   max_batch: int = 16) -> list[str]:
    """Completions of many prompts, decoded together (continuous batching); each equals its own `generate`.

    Prompts must fit the context with max_new_tokens; with a seed, prompt i samples with seed + i.
    """
    ids = tokenizer.encode_batch(prompts)
    length = min(max(map(len, ids), default=1) + params.max_new_tokens, model.config.max_position_embeddings)
    engine = Engine(model, tokenizer, max_batch=max_batch, max_length=length)
    texts = [""] * len(prompts)
    requests = []
    for i, prompt in enumerate(ids):
        seed = None if params.seed is None else params.seed + i
        requests.append(engine.add(Request(prompt, dataclasses.replace(params, seed=seed), id=str(i))))
    was_training = model.training
    model.eval()
    try:
        while engine.has_work:
            for out in engine.step():
                texts[int(out.request.id)] += out.text
    finally:
        model.train(was_training)
    return texts
