"""`lmforge generate`: complete a prompt, or answer one chat message, from the command line or Python.

`lmforge generate --model runs/a --prompt ...` and `lmforge.generate(model="runs/a", prompt=...)` are the
same function; both decode through `LM`, so through the one engine.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.lm import LM, load
from lmforge.precision import InferenceDtype


def generate(
    model: Path,
    prompt: str | None = None,
    *,
    chat: str | None = None,
    system: str | None = None,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    min_p: float | None = None,
    repetition_penalty: float | None = None,
    presence_penalty: float | None = None,
    frequency_penalty: float | None = None,
    num_beams: int | None = None,
    length_penalty: float | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
    dtype: InferenceDtype = "auto",
    compile: bool = False,
) -> str:
    """Complete a prompt, or answer one chat message, with a trained or imported model.

    Unset sampling options come from the checkpoint's generation_config.json.

    Args:
        model: Checkpoint directory, LoRA run or Hugging Face model folder.
        prompt: Text to continue.
        chat: Instead of a prompt, a user message answered through the tokenizer's chat template.
        system: A system message before `chat`.
        max_new_tokens: Most tokens to generate. As the server rules: prompt + max_new_tokens must fit the
            model's context, else an error says how many fit; unset, the checkpoint's generation_config.json
            (else 64), cut to what fits.
        temperature: 0 is greedy; higher is more random.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling: the smallest set of tokens with this much probability.
        min_p: Drop tokens less likely than this fraction of the most likely one.
        repetition_penalty: Above 1 discourages repeating tokens (CTRL); 1 is off.
        presence_penalty: Subtracted from the logit of every token already generated (OpenAI's).
        frequency_penalty: Subtracted per earlier occurrence of a generated token (OpenAI's).
        num_beams: Above 1, beam search with this many beams instead of sampling.
        length_penalty: Beam search ranks endings by log-probability / length**length_penalty.
        stop: Strings that end the completion (not included in it).
        seed: Seed for reproducible sampling.
        device: "cpu", "cuda", ...; default CUDA when present.
        dtype: "auto" (default) decodes in bfloat16 where this machine has fast bf16 matmuls (AMX, a recent
            GPU), else in the checkpoint's own; "float32" or "bfloat16" forces one.
        compile: Decode through a compiled step: 1.5-3x faster per token on a CPU, after a 20-90 s compile
            (worth it for long replies, not for a few tokens).

    Returns:
        The completion, without the prompt.
    """
    if (prompt is None) == (chat is None):
        raise ConfigError("give exactly one of --prompt (text to continue) and --chat (a message to answer)")
    lm = load(model, device=device, dtype=dtype, compile=compile)
    lm.require_decoder("generate text")
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat or ""}]
    max_new_tokens = fit_budget(lm, prompt if chat is None else messages, max_new_tokens)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, num_beams=num_beams, length_penalty=length_penalty,
                    stop=stop, seed=seed)
    if chat is not None:
        return lm.chat(messages, **sampling)
    return lm.generate(prompt, **sampling)



def fit_budget(lm: LM, prompt: str | list[dict[str, str]], max_new_tokens: int | None) -> int | None:
    """The server's rule (`lmforge.infer.service.Service.budget`) for one prompt from the command line: a
    prompt + max_new_tokens beyond the context is refused with both counts, rather than the prompt's start
    silently cut; unset, the checkpoint's own setting, cut to what fits."""
    if lm.is_seq2seq:  # a source → target model: its output has a context of its own
        return max_new_tokens
    from lmforge.infer.text import chat_prompt

    text = prompt if isinstance(prompt, str) else chat_prompt(lm.tokenizer, prompt)[0]
    length, context = len(lm.tokenizer.encode(text)), lm.config.max_position_embeddings
    if length >= context:
        raise ConfigError(f"this model's maximum context length is {context} tokens; the prompt has {length}: "
                          "shorten it")
    if max_new_tokens is None:  # the checkpoint's setting (else SamplingParams' 64), cut to what fits
        return min(lm.sampling().max_new_tokens, context - length)
    if length + max_new_tokens > context:
        raise ConfigError(f"this model's maximum context length is {context} tokens; the prompt has {length} and "
                          f"--max-new-tokens asks for {max_new_tokens} more: ask for at most {context - length}")
    return max_new_tokens
