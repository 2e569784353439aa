"""Autoregressive decoding for one caller: prompt in, tokens or text out, through the inference engine.

The sampling settings and transforms live in `lmforge.infer.sampling` and the batching engine in
`lmforge.infer.engine`; this module is the single-caller face of them (what `LM.generate`, `LM.stream`
and `lmforge generate` use), so every path decodes the same way.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator, Sequence

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
             eos_id: int | None = None, engine: Engine | None = None) -> Iterator[Output]:
    """One request through `engine` (an LM's own), or a private engine sized to it; the model is in eval
    mode only while it runs."""
    prompt = torch.as_tensor(prompt_ids, dtype=torch.long)
    if prompt.dim() > 1 and prompt.shape[0] != 1:
        raise ConfigError(f"prompt_ids has shape {tuple(prompt.shape)}; generate_tokens takes one sequence")
    prompt, max_new = fit_prompt(prompt.reshape(-1), params.max_new_tokens, model.config.max_position_embeddings)
    if max_new == 0:
        return
    params = dataclasses.replace(params, max_new_tokens=max_new)
    if engine is None:
        engine = Engine(model, tokenizer, max_batch=params.num_beams, max_model_len=prompt.numel() + max_new,
                        eos_id=eos_id)
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


def stream(model: nn.Module, tokenizer: Tokenizer, prompt: str | list[int], params: SamplingParams,
           engine: Engine | None = None) -> Iterator[str]:
    """Yield the generated text in pieces as tokens arrive, ending before any stop string.

    Pieces never split a multi-byte character and never show any of a stop string (see `TextStream`).
    `engine` reuses a caller's engine (and its KV cache) instead of building one for this prompt.
    """
    ids = prompt if isinstance(prompt, list) else tokenizer.encode(prompt)  # ids: a prompt with sentinels (FIM)
    for out in _outputs(model, tokenizer, ids, params, engine=engine):
        if out.text:
            yield out.text


def generate(model: nn.Module, tokenizer: Tokenizer, prompt: str, params: SamplingParams) -> str:
    """The whole completion of `prompt` as one string; exactly the concatenation of `stream`."""
    return "".join(stream(model, tokenizer, prompt, params))


def generate_batch(model: nn.Module, tokenizer: Tokenizer, prompts: list[str],
                   params: SamplingParams | Sequence[SamplingParams], max_batch: int = 16,
                   engine: Engine | None = None) -> list[str]:
    """Completions of many prompts, decoded together (continuous batching); each equals its own `generate`.

    `params` is one setting for all (with a seed, prompt i samples with seed + i) or one per prompt. Each
    prompt is fitted to the context as `generate` fits it. `engine` reuses a caller's engine.
    """
    if isinstance(params, SamplingParams):
        params = [params if params.seed is None else dataclasses.replace(params, seed=params.seed + i)
                  for i in range(len(prompts))]
    if len(params) != len(prompts):
        raise ConfigError(f"{len(params)} sampling settings for {len(prompts)} prompts; give one, or one per prompt")
    requests = []
    for i, ids in enumerate(tokenizer.encode_batch(prompts)):
        p = params[i]
        prompt, max_new = fit_prompt(torch.tensor(ids, dtype=torch.long), p.max_new_tokens,
                                     model.config.max_position_embeddings)
        requests.append(Request(prompt.tolist(), dataclasses.replace(p, max_new_tokens=max_new), id=str(i)))
    if engine is None:
        length = max(len(r.prompt_ids) + r.params.max_new_tokens for r in requests) if requests else 1
        widest = max((r.width for r in requests), default=1)
        engine = Engine(model, tokenizer, max_batch=max(max_batch, widest), max_model_len=length)
    texts = [""] * len(prompts)

    def collect(out: Output) -> None:
        texts[int(out.request.id)] += out.text

    was_training = model.training
    model.eval()
    try:
        for r in requests:
            r.on_output = collect
            engine.add(r)
        while not all(r.finished for r in requests):
            engine.step()
    except BaseException:
        for r in requests:
            engine.cancel(r.id)
        raise
    finally:
        model.train(was_training)
    return texts
