"""Perplexity and bits per byte of a causal LM over text, with a sliding window for long inputs.

Perplexity = exp(mean token NLL) depends on the tokenizer; bits per byte = total NLL / (ln 2 · UTF-8
bytes) does not, so it compares models with different vocabularies (as in the Pile paper, Gao et al. 2020).
`LM.perplexity` and the `lmforge eval perplexity` verb both come here.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.data.readers import iter_texts
from lmforge.errors import ConfigError, DataError
from lmforge.precision import autocast
from lmforge.progress import Progress
from lmforge.tokenizer import Tokenizer


@dataclass
class PerplexityResult:
    perplexity: float
    nll: float  # mean negative log-likelihood per scored token, in nats
    bits_per_byte: float
    tokens: int
    bytes: int
    block_size: int
    stride: int

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


def token_stream(tokenizer: Tokenizer, data: Path, field: str = "text") -> tuple[list[int], list[bool], int]:
    """Token ids [eos, doc₁, eos, doc₂, …], which targets to score (not the separators), and UTF-8 bytes.

    The leading eos gives every document's first token a context, as a new document has in training.
    A directory written by `lmforge data pack` contributes its val split.
    """
    eos = tokenizer.eos_id
    if (Path(data) / "meta.json").exists():
        from lmforge.data.pack import PackedDataset

        val = PackedDataset(Path(data), "val")
        ids = [eos, *val.window(0, val.num_tokens).tolist()]
        score = [t != eos for t in ids]
        text_bytes = len(tokenizer.decode([t for t in ids if t != eos]).encode("utf-8"))
        return ids, score, text_bytes
    ids, score, text_bytes = [eos], [False], 0
    for doc in iter_texts(data, text_field=field):
        doc_ids = tokenizer.encode(doc)
        ids += [*doc_ids, eos]
        score += [True] * len(doc_ids) + [False]
        text_bytes += len(doc.encode("utf-8"))
    return ids, score, text_bytes


@torch.no_grad()
def sliding_nll(model: nn.Module, ids: list[int], score: list[bool], block_size: int, stride: int, *,
                batch_size: int = 8, device: torch.device | str = "cpu", precision: str = "32",
                progress: bool = True) -> tuple[float, int]:
    """Summed NLL and count over scored targets; each target is scored once, with ≥ block_size−stride context.

    Windows of `block_size` inputs advance by `stride`; a window scores only targets the previous one
    did not, as in Hugging Face's perplexity guide.
    """
    total, count = 0.0, 0
    for _, logits, y in _windows(model, ids, score, block_size, stride, batch_size=batch_size, device=device,
                                 precision=precision, progress=progress):
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((y != -100).sum())
    return total, count


@torch.no_grad()
def token_logprobs(model: nn.Module, ids: list[int], *, block_size: int | None = None, stride: int | None = None,
                   batch_size: int = 8, device: torch.device | str = "cpu", precision: str = "32") -> list[float]:
    """log p(ids[i] | ids[:i]) for every i ≥ 1, through the same sliding windows as perplexity, so a text
    longer than the context is scored whole (each token with ≥ block_size − stride tokens before it)."""
    context = model.config.max_position_embeddings
    block_size = min(block_size or context, context)
    stride = stride or max(1, block_size // 2)
    out = [0.0] * max(0, len(ids) - 1)
    for windows, logits, y in _windows(model, ids, [True] * len(ids), block_size, stride, batch_size=batch_size,
                                       device=device, precision=precision, progress=False):
        logp = -F.cross_entropy(logits.float().transpose(1, 2), y.clamp(min=0), reduction="none")
        for row, (begin, end, _) in enumerate(windows):
            for t in (y[row, :end - begin] != -100).nonzero().flatten().tolist():
                out[begin + t] = logp[row, t].item()
    return out


def _windows(model: nn.Module, ids: list[int], score: list[bool], block_size: int, stride: int, *, batch_size: int,
             device: torch.device | str, precision: str, progress: bool
             ) -> Iterator[tuple[list[tuple[int, int, int]], Tensor, Tensor]]:
    """Batches of (windows as (begin, end, first target scored), logits, targets with -100 where not scored)."""
    n = len(ids)
    windows: list[tuple[int, int, int]] = []  # (begin, end, first target index scored)
    begin, scored_to = 0, 0
    while scored_to < n - 1:
        end = min(begin + block_size, n - 1)
        windows.append((begin, end, scored_to + 1))
        scored_to = end
        begin += stride
    tokens = torch.tensor(ids, dtype=torch.long)
    mask = torch.tensor(score, dtype=torch.bool)
    bar = Progress(len(windows), "perplexity", unit="windows", enabled=progress)
    model.eval()
    for i in range(0, len(windows), batch_size):
        chunk = windows[i:i + batch_size]
        length = max(end - begin for begin, end, _ in chunk)
        x = torch.zeros(len(chunk), length, dtype=torch.long)
        y = torch.full((len(chunk), length), -100, dtype=torch.long)
        for row, (begin, end, first) in enumerate(chunk):
            x[row, :end - begin] = tokens[begin:end]
            targets = tokens[begin + 1:end + 1].clone()
            keep = mask[begin + 1:end + 1].clone()
            keep[:first - begin - 1] = False
            y[row, :end - begin] = torch.where(keep, targets, -100)
        with autocast(precision, torch.device(device)):
            logits = model(x.to(device))
        yield chunk, logits, y.to(device)
        bar.update(min(i + batch_size, len(windows)))
    bar.close()


def perplexity_of(model: nn.Module, tokenizer: Tokenizer, data: Path, *, field: str = "text",
                  block_size: int | None = None, stride: int | None = None, batch_size: int = 8,
                  precision: str = "32", device: torch.device | str = "cpu", progress: bool = True
                  ) -> PerplexityResult:
    """Score every text under `data` (or a packed dataset's val split) with windows of `block_size` tokens
    advancing by `stride` (default: the model's context, and half of it, or all but an n-gram's n−1)."""
    context = model.config.max_position_embeddings
    block_size = context if block_size is None else block_size
    if not 0 < block_size <= context:
        raise ConfigError(f"block_size={block_size} must be between 1 and the model's context ({context})")
    if stride is None:  # a model that reads only its last `history` tokens (an n-gram) needs no more overlap
        history = getattr(model, "history", None)
        stride = block_size - history if history is not None and history < block_size else max(1, block_size // 2)
    if not 0 < stride <= block_size:
        raise ConfigError(f"stride={stride} must be between 1 and block_size={block_size}")
    ids, score, text_bytes = token_stream(tokenizer, Path(data), field)
    if not any(score):
        raise DataError(f"{data}: no text to score")
    nll, count = sliding_nll(model, ids, score, block_size, stride, batch_size=batch_size, device=device,
                             precision=precision, progress=progress)
    return PerplexityResult(perplexity=math.exp(nll / count), nll=nll / count,
                            bits_per_byte=nll / (math.log(2) * text_bytes), tokens=count, bytes=text_bytes,
                            block_size=block_size, stride=stride)
