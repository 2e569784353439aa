"""`lmforge.load`: a checkpoint directory as one object — model, tokenizer and decoding defaults.

Also the `generate` verb, so `lmforge generate --model runs/a --prompt ...` and
`lmforge.generate(model="runs/a", prompt=...)` are the same function.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.config import PRESETS, ModelConfig, preset
from lmforge.errors import CheckpointError
from lmforge.generate import SamplingParams
from lmforge.generate import stream as stream_text
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import TOKENIZER_FILES, load_weights, save_checkpoint

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty")


class LM:
    """A loaded model with its tokenizer; the methods are what applications call."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, generation_config: dict[str, Any] | None = None,
                 path: Path | None = None) -> None:
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.generation_config = generation_config or {}

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def sampling(self, **overrides: Any) -> SamplingParams:
        """Decoding settings: the checkpoint's generation_config.json, then `overrides` that are not None."""
        settings = {k: v for k, v in self.generation_config.items() if k in SAMPLING_KEYS}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**settings)

    def stream(self, prompt: str, **sampling: Any) -> Iterator[str]:
        """Generated text in pieces as it is produced (never a split character)."""
        return stream_text(self.model, self.tokenizer, prompt, self.sampling(**sampling))

    def generate(self, prompt: str, **sampling: Any) -> str:
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The assistant's reply to a conversation, through the tokenizer's chat template."""
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        im_end = "<|im_end|>" if self.tokenizer.token_to_id("<|im_end|>") is not None else None
        stop = list(sampling.pop("stop", None) or []) + ([im_end] if im_end else [])
        return self.generate(prompt, stop=stop, **sampling)

    @torch.no_grad()
    def logprobs(self, text: str) -> list[tuple[str, float]]:
        """Each token of `text` with log p(token | everything before it); the first is conditioned on eos."""
        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(text)]
        ids = ids[-self.config.max_position_embeddings - 1:]
        x = torch.tensor([ids[:-1]], device=self.device)
        self.model.eval()
        logp = F.log_softmax(self.model(x).float(), dim=-1)[0]
        targets = torch.tensor(ids[1:], device=self.device)
        values = logp.gather(-1, targets[:, None])[:, 0].tolist()
        return [(self.tokenizer.decode([t]), v) for t, v in zip(ids[1:], values)]

    def perplexity(self, data: str | Path, **kwargs: Any) -> dict[str, float | int]:
        from lmforge.eval.perplexity import perplexity

        return perplexity(self, Path(data), **kwargs)

    def save(self, out: str | Path) -> Path:
        """Write a checkpoint directory (weights, config, tokenizer, generation defaults), without train state."""
        out = Path(out)
        save_checkpoint(out, self.model, self.config, generation_config=self.generation_config)
        self.tokenizer.save(out)
        return out


def load(path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None) -> LM:
    """Load a checkpoint directory written by any lmforge stage."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    for name in ("config.json", "model.safetensors", TOKENIZER_FILES[0]):
        if not (path / name).exists():
            raise CheckpointError(f"{path}: {name} is missing; a checkpoint directory holds config.json, "
                                  "model.safetensors and tokenizer.json")
    config = ModelConfig.load(path / "config.json")
    model = GPT(config)
    load_weights(model, path)
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device=device, dtype=dtype)
    model.eval()
    gen_path = path / "generation_config.json"
    generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    return LM(model, Tokenizer.load(path), generation_config, path)


def generate(
    model: Path,
    prompt: str,
    *,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    repetition_penalty: float | None = None,
    stop: list[str] | None = None,
    seed: int | None = None,
    device: str | None = None,
) -> str:
    """Complete a prompt with a trained model.

    Unset sampling options come from the checkpoint's generation_config.json.

    Args:
        model: Checkpoint directory.
        prompt: Text to continue.
        max_new_tokens: Most tokens to generate.
        temperature: 0 is greedy; higher is more random.
        top_k: Sample among the k most likely tokens only.
        top_p: Nucleus sampling: the smallest set of tokens with this much probability.
        repetition_penalty: Above 1 discourages repeating tokens (CTRL); 1 is off.
        stop: Strings that end the completion (not included in it).
        seed: Seed for reproducible sampling.
        device: "cpu", "cuda", ...; default CUDA when present.

    Returns:
        The completion, without the prompt.
    """
    lm = load(model, device=device)
    return lm.generate(prompt, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       repetition_penalty=repetition_penalty, stop=stop, seed=seed)


def models() -> str:
    """List the built-in model presets with their sizes."""
    rows = ["preset                family  layers  width  heads  kv  context  params"]
    for name in PRESETS:
        c = preset(name)
        with torch.device("meta"):
            n = GPT(c).num_params()
        rows.append(f"{name:<21} {c.family:<7} {c.num_hidden_layers:>6} {c.hidden_size:>6} "
                    f"{c.num_attention_heads:>6} {c.num_key_value_heads:>3} {c.max_position_embeddings:>8} "
                    f"{n / 1e6:>6.1f}M")
    return "\n".join(rows)
