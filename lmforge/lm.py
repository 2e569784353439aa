"""`LM`: a loaded model as one object — model, tokenizer and decoding defaults — and `lmforge.load`."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.config import ModelConfig
from lmforge.errors import ConfigError
from lmforge.infer.decode import SamplingParams, generate_batch
from lmforge.infer.decode import stream as stream_text
from lmforge.infer.engine import Engine
from lmforge.infer.score import perplexity_of
from lmforge.infer.seq2seq import Seq2SeqSearch, summary_prompt, translate_texts
from lmforge.infer.text import chat_prompt
from lmforge.model.bert import Encoder
from lmforge.model.gpt import GPT
from lmforge.model.quant import layout_of
from lmforge.model.seq2seq import Seq2Seq
from lmforge.precision import inference_dtype
from lmforge.tokenizer import Tokenizer

SAMPLING_KEYS = ("max_new_tokens", "temperature", "top_k", "top_p", "min_p", "repetition_penalty",
                 "presence_penalty", "frequency_penalty", "num_beams", "length_penalty")
ENGINE_ROWS = 16  # an LM's engine decodes up to this many prompts (or beams) of one `generate([...])` together


class LM:
    """A loaded model with its tokenizer; the methods are what applications call."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, generation_config: dict[str, Any] | None = None,
                 path: Path | None = None) -> None:
        self.model, self.tokenizer, self.path = model, tokenizer, path
        self.generation_config = generation_config or {}
        self.max_model_len: int | None = None  # most positions per request; None: as `Engine` chooses
        self.engine: Engine | None = None  # made by the first generation, reused by every later one
        self.compile = False  # decode through an inductor-compiled step (`lmforge.infer.compiled`)

    @property
    def config(self) -> ModelConfig:
        return self.model.config

    @property
    def is_seq2seq(self) -> bool:
        """An encoder-decoder (translate / summarize a source) rather than a decoder continuing a prompt."""
        return isinstance(self.model, Seq2Seq)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def require_decoder(self, verb: str) -> None:
        """Refuse, in words, an encoder (BERT-style) checkpoint where `verb` needs a model that predicts the
        next token: without this it fails deep inside decoding with a TypeError or AttributeError."""
        if isinstance(self.model, Encoder):
            where = f"{self.path}: " if self.path is not None else ""
            raise ConfigError(f"{where}an encoder (BERT-style) model cannot {verb}: it has no next-token head; "
                              "use a decoder checkpoint (pretrain / finetune full / an imported GPT, Llama, Qwen "
                              "model), or use this one with `predict`, `finetune classify` or `LM.embed`")

    def sampling(self, **overrides: Any) -> SamplingParams:
        """Decoding settings: the checkpoint's generation_config.json, then `overrides` that are not None."""
        settings = {k: v for k, v in self.generation_config.items() if k in SAMPLING_KEYS}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return SamplingParams(**settings)

    def _engine(self) -> Engine:
        """The one engine every generation of this LM runs through, made on first use. Its KV cache starts
        empty and grows to what requests need, up to `max_model_len`, instead of a new cache per call; a new
        engine is made only when the model, its device or dtype, or `max_model_len` changes."""
        weight, engine = next(self.model.parameters()), self.engine
        if (engine is None or engine.source is not self.model
                or (engine.device, engine.dtype) != (weight.device, weight.dtype)
                or self.max_model_len not in (None, engine.max_model_len)
                or self.compile != engine.compile):
            self.engine = Engine(self.model, self.tokenizer, max_batch=ENGINE_ROWS, max_model_len=self.max_model_len,
                                 preallocate=False, compile=self.compile)
        return self.engine

    def stream(self, prompt: str | list[int], **sampling: Any) -> Iterator[str]:
        """Generated text in pieces as it is produced (never a split character); the prompt may be token ids."""
        if isinstance(self.model, Seq2Seq):  # an encoder-decoder: the prompt is its source, the output one piece
            return iter([self.generate(prompt, **sampling)])
        return stream_text(self.model, self.tokenizer, prompt, self.sampling(**sampling), engine=self._engine())

    def generate(self, prompt: str | list[str], **sampling: Any) -> str | list[str]:
        """The completion of a prompt; for a list of prompts, their completions decoded as one batch.

        For a list, `seed` may be a list too (one per prompt); one int seed gives prompt i seed + i.
        An encoder-decoder translates the prompt (its source), as `translate`.
        """
        if isinstance(self.model, Seq2Seq):
            sampling.pop("stop", None)  # stop strings mean nothing to a source → target model
            return self.translate(prompt, **sampling)
        if isinstance(prompt, list):
            seed = sampling.pop("seed", None)
            params = ([self.sampling(seed=s, **sampling) for s in seed] if isinstance(seed, list)
                      else self.sampling(seed=seed, **sampling))
            return generate_batch(self.model, self.tokenizer, prompt, params, engine=self._engine())
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

    def translate(self, source: str | list[str], *, num_beams: int | None = None, max_new_tokens: int | None = None,
                  length_penalty: float | None = None, early_stopping: bool | str | None = None,
                  num_return_sequences: int = 1, batch_size: int = 16, **sampling: Any,
                  ) -> str | list[str] | list[list[str]]:
        """The output of an encoder-decoder (translation, summary) for a source or a list of sources.

        Beam search when `num_beams` > 1, else greedy (temperature 0) or sampling; unset options come from
        generation_config.json. With `num_return_sequences` n > 1 each source gives its n best outputs.
        """
        if not isinstance(self.model, Seq2Seq):
            raise ConfigError("translate needs an encoder-decoder (seq2seq) model; this checkpoint is a "
                              f"{type(self.model).__name__}. For a decoder-only model use generate or summarize")
        params = self.sampling(num_beams=num_beams, max_new_tokens=max_new_tokens, length_penalty=length_penalty,
                               **sampling)
        search = Seq2SeqSearch.from_generation_config(self.generation_config, early_stopping=early_stopping,
                                                      num_return_sequences=num_return_sequences)
        texts = [source] if isinstance(source, str) else list(source)
        outputs = translate_texts(self.model, self.tokenizer, texts, params, search, batch_size)
        results = [out if num_return_sequences > 1 else out[0] for out in outputs]
        return results[0] if isinstance(source, str) else results

    def summarize(self, text: str | list[str], *, max_new_tokens: int | None = None, **options: Any) -> str | list[str]:
        """A short summary of a text (or of each of a list): an encoder-decoder trained on (text, summary)
        pairs summarizes as it translates; a decoder-only (e.g. instruction-tuned) model is prompted
        (through its chat template when it has one) and decodes greedily unless told otherwise."""
        if isinstance(self.model, Seq2Seq):
            return self.translate(text, max_new_tokens=max_new_tokens, **options)
        texts = [text] if isinstance(text, str) else list(text)
        options.setdefault("temperature", 0.0)
        user_stop = list(options.pop("stop", None) or [])
        summaries = []
        for one in texts:
            prompt, stop = summary_prompt(self.tokenizer, one)
            stop = user_stop + stop
            summaries.append(self.generate(prompt, stop=stop, max_new_tokens=max_new_tokens or 128, **options).strip())
        return summaries[0] if isinstance(text, str) else summaries

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

    def perplexity(self, data: str | Path, *, field: str = "text", block_size: int | None = None,
                   stride: int | None = None, batch_size: int = 8, precision: str = "32",
                   progress: bool = True) -> dict[str, float | int]:
        """Perplexity and bits per byte on held-out text (a file, folder or packed dataset): see `eval perplexity`."""
        return perplexity_of(self.model, self.tokenizer, Path(data), field=field, block_size=block_size,
                             stride=stride, batch_size=batch_size, precision=precision, device=self.device,
                             progress=progress).to_dict()

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


def load(path: str | Path, *, device: str | None = None, dtype: torch.dtype | str | None = None,
         compile: bool = False) -> LM:
    """Load a checkpoint directory written by any lmforge stage, or a Hugging Face model folder.

    An HF folder (GPT-2, Llama, Mistral, Qwen2/2.5, Qwen3, BERT) is converted in memory, tensor by
    tensor; `lmforge convert from-hf` does the same once, to disk. A LoRA run loads as its base with the
    adapters attached (unmerged); a classify/regress run as its fine-tuned backbone.

    `dtype` None keeps the checkpoint's own; "auto" is the fastest to decode in: bfloat16 where the device
    has fast bf16 matmuls (AMX, a recent GPU), except for a quantized checkpoint, whose layout decides.
    `compile` decodes through a compiled step (`lmforge.infer.compiled`): faster, after a 20-90 s compile.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    loaded = load_model(path, dtype=None if dtype == "auto" else dtype, device=device)
    model = loaded.model.backbone if loaded.kind == "head" else loaded.model
    if dtype == "auto" and layout_of(model) is None and (fast := inference_dtype("auto", device)) is not None:
        model.to(fast)
    lm = LM(model, loaded.tokenizer, loaded.generation_config, Path(path))
    lm.compile = compile
    return lm
