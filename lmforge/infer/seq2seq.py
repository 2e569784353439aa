"""Decoding an encoder-decoder: the encoder runs once per source, the decoder one token at a time.

Each batch of sources is encoded once; every decoder layer projects the encoder output to cross-attention
keys/values once (`Seq2SeqCache`), and the decoder's own keys/values grow by one position per step, so a
step costs one token's worth of work. Rows leave the batch as their sources finish.

Tokens are chosen by the same code as for decoder-only models: `sample_batch` (greedy, temperature,
top-k/p, penalties) and `BeamSearch` (length penalty, early stopping, n-best). Constraints follow
transformers' `generate`, so an imported Marian or T5 model decodes to the same tokens: tokens a model may
never produce (`suppress_ids`, Marian's pad) are masked, and `forced_eos_id` ends every output that is still
running at the last step with eos (Marian's `forced_eos_token_id`).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.errors import ConfigError
from lmforge.infer.beam import BeamSearch
from lmforge.infer.sampling import SamplingParams, sample_batch
from lmforge.infer.text import chat_prompt
from lmforge.model.seq2seq import Seq2Seq
from lmforge.tokenizer import Tokenizer

EARLY_STOPPING = (False, True, "never")
# Prompt for summarizing with a decoder-only model; a chat model gets it as the user's message.
SUMMARY_INSTRUCTION = "Summarize the following text in one or two sentences.\n\n{text}"


@dataclass
class Seq2SeqSearch:
    """How an encoder-decoder picks its output, beyond `SamplingParams` (max_new_tokens, num_beams,
    length_penalty, temperature, ... which it reads from there).

    Args:
        early_stopping: Beam search: False, True or "never", as transformers' `generate` (see `BeamSearch`).
        num_return_sequences: The n best outputs per source (beam search; at most num_beams).
        forced_eos_id: End any output still running at the last step with this token (Marian).
        suppress_ids: Tokens never generated (e.g. Marian's pad token, its `bad_words_ids`).
    """

    early_stopping: bool | str = False
    num_return_sequences: int = 1
    forced_eos_id: int | None = None
    suppress_ids: list[int] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.early_stopping not in EARLY_STOPPING:
            raise ConfigError(f"early_stopping={self.early_stopping!r} must be one of {EARLY_STOPPING}")
        if self.num_return_sequences < 1:
            raise ConfigError(f"num_return_sequences={self.num_return_sequences} must be at least 1")

    @classmethod
    def from_generation_config(cls, generation: dict[str, Any], **overrides: Any) -> Seq2SeqSearch:
        """The settings of a checkpoint's generation_config.json (ours or transformers'), then `overrides`."""
        suppress = [ids[0] for ids in generation.get("bad_words_ids") or [] if len(ids) == 1]
        settings = {"early_stopping": generation.get("early_stopping", False),
                    "forced_eos_id": generation.get("forced_eos_token_id"),
                    "suppress_ids": suppress + list(generation.get("suppress_tokens") or [])}
        settings.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**settings)


def source_ids(model: Seq2Seq, tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """Sources as the model was trained to read them: bare tokens (ours) or ending in eos (Marian, T5),
    cut to the model's positions (with a note on stderr saying how many were). An empty source becomes
    [eos] so its attention has a key to see."""
    config = model.config
    room = config.max_positions - int(config.source_eos)
    out, cut = [], 0
    for ids in tokenizer.encode_batch(texts, add_bos=False):
        cut += len(ids) > room
        ids = ids[:room] + ([config.eos_id] if config.source_eos else [])
        out.append(ids or [config.eos_id])
    if cut:
        print(f"note: {cut} of {len(texts)} source(s) longer than the model's {room} tokens were cut to them; "
              "the rest of each is not in the output", file=sys.stderr)
    return out


def _pad(model: Seq2Seq, sources: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    width = max(len(s) for s in sources)
    src = torch.full((len(sources), width), model.config.pad_id, dtype=torch.long)
    for i, s in enumerate(sources):
        src[i, :len(s)] = torch.tensor(s, dtype=torch.long)
    lengths = torch.tensor([len(s) for s in sources])
    return src.to(device), (torch.arange(width)[None, :] < lengths[:, None]).to(device)


def _constrain(logp: Tensor, step: int, max_new: int, search: Seq2SeqSearch) -> Tensor:
    """Suppressed tokens to -inf and, at the last step, everything but the forced eos (transformers' processors),
    in place on logits [B, V] (sampling) or log-probabilities (beam search: scores are not renormalized)."""
    if search.suppress_ids:
        logp[:, search.suppress_ids] = float("-inf")
    if search.forced_eos_id is not None and step == max_new - 1:
        logp[:] = float("-inf")
        logp[:, search.forced_eos_id] = 0.0
    return logp


@torch.no_grad()
def decode_sources(model: Seq2Seq, sources: list[list[int]], params: SamplingParams, search: Seq2SeqSearch,
                   end_ids: set[int], batch_size: int = 16) -> list[list[list[int]]]:
    """For each source (token ids), its best `num_return_sequences` outputs (token ids, no start or end).

    Sources are decoded `batch_size` at a time (times num_beams rows), longest first so a batch holds
    sources of similar length.
    """
    if batch_size < 1:
        raise ConfigError(f"batch_size={batch_size} must be at least 1")
    if search.num_return_sequences > params.num_beams:
        raise ConfigError(f"num_return_sequences={search.num_return_sequences}: the n best come from beam search, "
                          f"so at most num_beams={params.num_beams}; give --num-beams "
                          f"{max(search.num_return_sequences, 4)} or more")
    model.eval()
    limit = model.config.max_positions if model.config.position != "relative" else params.max_new_tokens
    max_new = min(params.max_new_tokens, limit)
    order = sorted(range(len(sources)), key=lambda i: -len(sources[i]))
    results: list[list[list[int]]] = [[] for _ in sources]
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        src, mask = _pad(model, [sources[i] for i in chunk], model.embed.weight.device)
        if max_new == 0:
            outputs = [[[]] for _ in chunk]
        elif params.num_beams > 1:
            outputs = _beam(model, src, mask, params, search, max_new, end_ids)
        else:
            seeds = [None if params.seed is None else params.seed + i for i in chunk]  # source i: seed + i
            outputs = [[ids] for ids in _sample(model, src, mask, params, search, max_new, end_ids, seeds)]
        for i, out in zip(chunk, outputs):
            results[i] = out
    return results


def _sample(model: Seq2Seq, src: Tensor, mask: Tensor, params: SamplingParams, search: Seq2SeqSearch,
            max_new: int, end_ids: set[int], seeds: list[int | None]) -> list[list[int]]:
    """Greedy or sampled decoding of a batch: one token per row per step; a row leaves at its end token."""
    B, device = src.shape[0], src.device
    memory = model.encode(src, mask)
    cache = model.new_cache(B, max_new)
    generators = [torch.Generator(device).manual_seed(s) if s is not None else None for s in seeds]
    outputs: list[list[int]] = [[] for _ in range(B)]
    rows = list(range(B))  # which source each row of the running batch is
    feed = torch.full((B, 1), model.config.decoder_start_id, dtype=torch.long, device=device)
    V = model.config.vocab_size
    counts = torch.zeros(B, V, dtype=torch.long, device=device) if params.penalized else None
    for step in range(max_new):
        logits = model.decode(feed, memory if step == 0 else None, mask, cache)[:, -1].float()
        logits = _constrain(logits, step, max_new, search)
        seen = counts > 0 if counts is not None else None
        tokens = sample_batch(logits, [params] * len(rows), [generators[r] for r in rows], seen, counts)
        keep = []
        for i, (row, token) in enumerate(zip(rows, tokens.tolist())):
            if token not in end_ids:
                outputs[row].append(token)
                keep.append(i)
        if not keep:
            break
        if counts is not None:
            counts[torch.arange(len(rows), device=device), tokens] += 1
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=device)
            cache.select(index)
            mask, tokens = mask[index], tokens[index]
            counts = counts[index] if counts is not None else None
            rows = [rows[i] for i in keep]
        feed = tokens[:, None]
    return outputs


def _beam(model: Seq2Seq, src: Tensor, mask: Tensor, params: SamplingParams, search: Seq2SeqSearch,
          max_new: int, end_ids: set[int]) -> list[list[list[int]]]:
    """Beam search for a batch of sources: `num_beams` rows each, one `BeamSearch` per source; a finished
    source's rows leave the batch, the others' cache rows follow the beams they continue."""
    B, k, device = src.shape[0], params.num_beams, src.device
    memory = model.encode(src, mask)
    cache = model.new_cache(B, max_new)
    searches = [BeamSearch(params, end_ids, max_new, search.early_stopping) for _ in range(B)]
    start = torch.full((B, 1), model.config.decoder_start_id, dtype=torch.long, device=device)
    logits = model.decode(start, memory, mask, cache)[:, -1].float()  # all beams are the start token: one row
    groups = [logits[i:i + 1] for i in range(B)]
    expand = torch.arange(B, device=device).repeat_interleave(k)
    cache.select(expand)
    mask = mask[expand]
    active = list(range(B))
    for step in range(max_new):
        rows, feed, still = [], [], []
        for g, s in enumerate(active):
            beam = searches[s]
            order = beam.step(_constrain(F.log_softmax(groups[g], dim=-1), step, max_new, search), normalized=True)
            if not beam.done:
                still.append(s)
                rows += [g * k + o for o in order]
                feed += beam.feed
        if not still:
            break
        index = torch.tensor(rows, device=device)
        cache.select(index)
        mask, active = mask[index], still
        logits = model.decode(torch.tensor(feed, device=device)[:, None], None, mask, cache)[:, -1].float()
        groups = [logits[g * k:(g + 1) * k] for g in range(len(active))]
    return [beam.n_best(search.num_return_sequences) for beam in searches]


def summary_prompt(tokenizer: Tokenizer, text: str, instruction: str = SUMMARY_INSTRUCTION) -> tuple[str, list[str]]:
    """What a decoder-only model is given to summarize `text`, and the strings that end its answer: the
    instruction as a user turn through the chat template when the tokenizer has one, else a plain
    completion prompt ending in "Summary:" that stops at the end of the line."""
    if tokenizer.chat_template is not None:
        return chat_prompt(tokenizer, [{"role": "user", "content": instruction.format(text=text)}])
    return f"{instruction.format(text=text)}\n\nSummary:", ["\n"]


def translate_texts(model: Seq2Seq, tokenizer: Tokenizer, texts: list[str], params: SamplingParams,
                    search: Seq2SeqSearch, batch_size: int = 16) -> list[list[str]]:
    """Each text's n best outputs as text (special tokens dropped): what `translate` and `summarize` return."""
    ends = set(tokenizer.stop_ids) | {model.config.eos_id}
    outputs = decode_sources(model, source_ids(model, tokenizer, texts), params, search, ends, batch_size)
    return [[tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in n_best] for n_best in outputs]
