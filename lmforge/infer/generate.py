"""`lmforge generate`: complete a prompt, or answer one chat message, from the command line or Python.

`lmforge generate --model runs/a --prompt ...` and `lmforge.generate(model="runs/a", prompt=...)` are the
same function; both decode through `LM`, so through the one engine.
"""

from __future__ import annotations

from pathlib import Path

from lmforge.errors import ConfigError
from lmforge.lm import load


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
) -> str:
    """Complete a prompt, or answer one chat message, with a trained or imported model.

    Unset sampling options come from the checkpoint's generation_config.json.

    Args:
        model: Checkpoint directory, LoRA run or Hugging Face model folder.
        prompt: Text to continue.
        chat: Instead of a prompt, a user message answered through the tokenizer's chat template.
        system: A system message before `chat`.
        max_new_tokens: Most tokens to generate.
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

    Returns:
        The completion, without the prompt.
    """
    if (prompt is None) == (chat is None):
        raise ConfigError("give exactly one of --prompt (text to continue) and --chat (a message to answer)")
    lm = load(model, device=device)
    sampling = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                    repetition_penalty=repetition_penalty, presence_penalty=presence_penalty,
                    frequency_penalty=frequency_penalty, num_beams=num_beams, length_penalty=length_penalty,
                    stop=stop, seed=seed)
    if chat is not None:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": chat}]
        return lm.chat(messages, **sampling)
    return lm.generate(prompt, **sampling)

