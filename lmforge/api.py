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
from lmforge.errors import CheckpointError, ConfigError
from lmforge.generate import SamplingParams, generate_batch
from lmforge.generate import stream as stream_text
from lmforge.infer.text import chat_prompt
from lmforge.model.bert import Encoder
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer
from lmforge.train.checkpoint import TOKENIZER_FILES, load_weights, save_checkpoint

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "num_beams", "length_penalty")


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

    def generate(self, prompt: str | list[str], **sampling: Any) -> str | list[str]:
        """The completion of a prompt; for a list of prompts, their completions decoded as one batch."""
        if isinstance(prompt, list):
            return generate_batch(self.model, self.tokenizer, prompt, self.sampling(**sampling))
        return "".join(self.stream(prompt, **sampling))

    def chat(self, messages: list[dict[str, str]], **sampling: Any) -> str:
        """The assistant's reply to a conversation, through the tokenizer's chat template."""
        prompt, turn_end = chat_prompt(self.tokenizer, messages)
        stop = list(sampling.pop("stop", None) or []) + turn_end
        return self.generate(prompt, stop=stop, **sampling)

    def chat_stream(self, messages: list[dict[str, str]], **sampling: Any) -> Iterator[str]:
        """The assistant's reply in pieces as it is produced."""
        prompt, turn_end = chat_prompt(self.tokenizer, messages)
        stop = list(sampling.pop("stop", None) or []) + turn_end
        return self.stream(prompt, stop=stop, **sampling)

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

    @torch.no_grad()
    def embed(self, texts: list[str], *, normalize: bool = True, batch_size: int = 32) -> torch.Tensor:
        """One vector per text [N, hidden] from an encoder, pooled as its config says (sentence embeddings).

        Texts are truncated to the model's context; `normalize` gives unit vectors (cosine = dot product).
        """
        if not isinstance(self.model, Encoder):
            raise ConfigError("embed needs an encoder model (BERT/MiniLM); this checkpoint is a decoder")
        limit = self.model.config.max_position_embeddings
        vectors = []
        for start in range(0, len(texts), batch_size):
            encodings = self.tokenizer.hf.encode_batch(texts[start:start + batch_size], add_special_tokens=True)
            ids = [e.ids[:limit] for e in encodings]
            width = max(len(i) for i in ids)
            pad = self.model.config.pad_token_id
            idx = torch.tensor([i + [pad] * (width - len(i)) for i in ids], device=self.device)
            mask = torch.tensor([[1] * len(i) + [0] * (width - len(i)) for i in ids], device=self.device)
            types = torch.tensor([e.type_ids[:limit] + [0] * (width - len(i)) for e, i in zip(encodings, ids)],
                                 device=self.device)
            pooled = self.model.pool(self.model(idx, types, mask), mask).float()
            vectors.append(F.normalize(pooled, dim=-1) if normalize else pooled)
        return torch.cat(vectors)

    def save(self, out: str | Path) -> Path:
        """Write a checkpoint directory (weights, config, tokenizer, generation defaults), without train state."""
        out = Path(out)
        save_checkpoint(out, self.model, self.config, generation_config=self.generation_config)
        self.tokenizer.save(out)
        return out


def load(path: str | Path, *, device: str | None = None, dtype: torch.dtype | None = None) -> LM:
    """Load a checkpoint directory written by any lmforge stage, or a Hugging Face model folder.

    An HF folder (GPT-2, Llama, Mistral, Qwen2/2.5, Qwen3, BERT) is converted in memory, tensor by
    tensor; `lmforge convert from-hf` does the same once, to disk. A LoRA run loads as its base with the
    adapters attached (unmerged).
    """
    from lmforge.convert import generation_from_hf, load_config
    from lmforge.model.hf import build_model, is_hf_checkpoint, load_hf_model, read_hf_config

    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a checkpoint directory")
    if (path / "adapter_config.json").is_file() and not (path / "model.safetensors").exists():
        from lmforge.finetune.lm import load_lora  # a LoRA run: its base plus the adapters, unmerged

        lm = load_lora(path)
        lm.model.to(device=device or ("cuda" if torch.cuda.is_available() else "cpu"), dtype=dtype)
        return lm
    if is_hf_checkpoint(path):
        model, _ = load_hf_model(path, dtype)
        generation_config = generation_from_hf(path, read_hf_config(path))
    else:
        for name in ("config.json", "model.safetensors", TOKENIZER_FILES[0]):
            if not (path / name).exists():
                raise CheckpointError(f"{path}: {name} is missing; a checkpoint directory holds config.json, "
                                      "model.safetensors and tokenizer.json")
        model = build_model(load_config(path))
        load_weights(model, path)
        gen_path = path / "generation_config.json"
        generation_config = json.loads(gen_path.read_text()) if gen_path.exists() else {}
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device=device, dtype=dtype)
    model.eval()
    tokenizer = Tokenizer.load(path)
    tokenizer.stop_ids |= set(generation_config.get("eos_token_id") or [])
    return LM(model, tokenizer, generation_config, path)


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
