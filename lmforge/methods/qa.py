"""`lmforge finetune qa`: extractive question answering, a start/end span head on an encoder (SQuAD-style).

Each (question, context) pair becomes windows "[CLS] question [SEP] context-window [SEP]" of at most
`max_length` tokens, windows overlapping by `doc_stride` tokens (Devlin et al. 2019; the tokenizer's own
truncation with overflow, as transformers' run_qa.py does), so a long context is read whole. The target of a
window is the token span of the answer, or [CLS] (position 0) when the answer is not inside it. The loss is
the mean of the start and end cross-entropies. `predict_spans` is the one path from (question, contexts) to
answer spans: `lmforge answer --reader extractive` and the evaluation harness both call it.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lmforge.checkpoint import load_model, save_head
from lmforge.errors import ConfigError, DataError
from lmforge.model.heads import HeadConfig, SpanHead, pad_batch, pad_id, pair_token_types
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import LabelledLoader
from lmforge.train.shell import Context, Method, training_verb

QA_DEFAULTS = dict(batch_size=16, lr=5e-5, warmup_steps=10, schedule="linear", weight_decay=0.01, eval_every=100)
MAX_ANSWER_TOKENS = 30  # the longest span predict_spans considers, as in SQuAD baselines


@dataclass
class Example:
    """One question about one context, with its answers (character offsets into the context)."""

    id: str
    question: str
    context: str
    answers: list[tuple[str, int]]  # (text, start character)


def read_squad(path: Path) -> list[Example]:
    """SQuAD v1.1 JSON ({"data": [{"paragraphs": [{"context", "qas": [{"question", "answers"}]}]}]}); every
    answer must sit at its answer_start, or the error names the question."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise DataError(f"{path}: expected SQuAD format, a JSON object with a 'data' list of articles")
    examples = []
    for a, article in enumerate(data["data"]):
        for p, paragraph in enumerate(article.get("paragraphs", [])):
            where = f"{path}: data[{a}].paragraphs[{p}]"
            context = paragraph.get("context")
            if not isinstance(context, str) or not context.strip():
                raise DataError(f"{where}: 'context' missing or empty")
            for q, qa in enumerate(paragraph.get("qas", [])):
                here = f"{where}.qas[{q}]"
                if not isinstance(qa.get("question"), str) or not qa["question"].strip():
                    raise DataError(f"{here}: 'question' missing or empty")
                answers = []
                for answer in qa.get("answers", []):
                    text, start = answer.get("text"), answer.get("answer_start")
                    if not isinstance(text, str) or not isinstance(start, int) or \
                            context[start:start + len(text)] != text:
                        raise DataError(f"{here} (id {qa.get('id')!r}): answer {text!r} is not in the context at "
                                        f"answer_start={start}")
                    answers.append((text, start))
                if not answers and not qa.get("is_impossible"):
                    raise DataError(f"{here}: no answers (SQuAD v1.1 questions have at least one)")
                examples.append(Example(str(qa.get("id", f"{a}.{p}.{q}")), qa["question"], context, answers))
    if not examples:
        raise DataError(f"{path}: no questions")
    return examples


def windows(tokenizer: Tokenizer, question: str, context: str, max_length: int, doc_stride: int) -> list[Any]:
    """The tokenizer's encodings of (question, context) cut into overlapping windows over the context; the
    stride shrinks to half the room a long question leaves, so windows always move forward."""
    room = max_length - len(tokenizer.hf.encode(question, add_special_tokens=False).ids) - 3
    if room < 8:
        raise DataError(f"question {question[:60]!r} leaves {room} of {max_length} tokens for the context; "
                        "shorten it or raise max_length")
    hf = _window_tokenizer(tokenizer.hf, max_length, min(doc_stride, room // 2))
    first = hf.encode(question, context)
    return [first, *first.overflowing]


_WINDOWING: dict[tuple[int, int, int], tuple[Any, Any]] = {}


def _window_tokenizer(source: Any, max_length: int, doc_stride: int) -> Any:
    """A copy of `source` that truncates with overflow (the shared tokenizer must keep its own settings)."""
    key = (id(source), max_length, doc_stride)
    if key not in _WINDOWING:
        from tokenizers import Tokenizer as HFTokenizer

        hf = HFTokenizer.from_str(source.to_str())
        hf.no_padding()
        hf.enable_truncation(max_length, stride=doc_stride, strategy="only_second")
        _WINDOWING[key] = (source, hf)  # holding `source` keeps its id from being reused
    return _WINDOWING[key][1]


def span_targets(encoding: Any, answer: tuple[str, int]) -> tuple[int, int]:
    """Token positions of the answer's first and last characters in a window, (0, 0) if it is not all there."""
    text, start = answer
    end = start + len(text)
    first = last = None
    for i, (seq, (a, b)) in enumerate(zip(encoding.sequence_ids, encoding.offsets)):
        if seq != 1:
            continue
        if first is None and a <= start < b:
            first = i
        if a < end <= b:
            last = i
    if first is None or last is None or last < first:
        return 0, 0
    return first, last


def sep_token(tokenizer: Tokenizer) -> int:
    """The id that ends the question in a pair (BERT's [SEP]), read off the tokenizer's own pair template."""
    encoding = tokenizer.hf.encode("a", "b")
    return encoding.ids[encoding.sequence_ids.index(1) - 1]


def _features(tokenizer: Tokenizer, examples: list[Example], max_length: int, doc_stride: int
              ) -> tuple[list[list[int]], Tensor]:
    ids, targets = [], []
    for example in examples:
        for window in windows(tokenizer, example.question, example.context, max_length, doc_stride):
            ids.append(window.ids)
            targets.append(span_targets(window, example.answers[0]) if example.answers else (0, 0))
    return ids, torch.tensor(targets, dtype=torch.long)


def span_loss(model: SpanHead, x: dict[str, Tensor], y: Tensor, *, sep_id: int) -> tuple[Tensor, Tensor]:
    """Summed (CE(start) + CE(end)) / 2 over the windows of a batch, and their count."""
    types = pair_token_types(x["input_ids"], x["attention_mask"], sep_id)
    logits = model(x["input_ids"], x["attention_mask"], types).float()
    start = F.cross_entropy(logits[..., 0], y[:, 0], reduction="sum")
    end = F.cross_entropy(logits[..., 1], y[:, 1], reduction="sum")
    return (start + end) / 2, torch.tensor(len(y), device=logits.device)


@training_verb("finetune qa", out=Path("runs/qa"), **QA_DEFAULTS)
def finetune_qa(
    ctx: Context,
    model: Path | None = None,
    data: Path | None = None,
    *,
    val_data: Path | None = None,
    max_length: int = 384,
    doc_stride: int = 128,
    dropout: float = 0.1,
) -> Method:
    """Fine-tune an encoder (BERT, MiniLM) for extractive question answering on SQuAD-format JSON.

    Args:
        model: Encoder checkpoint: ours, a Hugging Face BERT directory, or a BertForQuestionAnswering one (its
            span head is kept and trained further).
        data: SQuAD v1.1-format JSON: {"data": [{"paragraphs": [{"context", "qas": [{"question", "answers":
            [{"text", "answer_start"}]}]}]}]}.
        val_data: Held-out questions in the same format, for the validation loss.
        max_length: Tokens per window (question + context + 3 special tokens).
        doc_stride: Tokens that consecutive windows over a long context share.
        dropout: Dropout before the span head.

    Returns:
        The run directory (a head run: `lmforge answer --reader extractive --model RUN` reads it).
    """
    if model is None or data is None:
        raise ConfigError("--model and --data are required (an encoder and a SQuAD-format .json file), "
                          "or --resume to continue a run")
    if ctx.resume is not None:
        loaded = load_model(ctx.resume, dtype=torch.float32)
        net = loaded.model
    else:
        loaded = load_model(Path(model), dtype=torch.float32)
        if loaded.kind == "head" and isinstance(loaded.model, SpanHead):
            net = loaded.model
        elif loaded.kind == "encoder":
            net = SpanHead(loaded.model, HeadConfig(task="qa", pooling="cls", dropout=dropout, max_length=max_length))
        else:
            raise ConfigError(f"{model}: is a {loaded.kind} model; extractive QA trains a span head on an encoder "
                              "(BERT / MiniLM)")
    length = min(net.config.max_length, loaded.config.max_position_embeddings)
    if doc_stride >= length - 16:
        raise ConfigError(f"doc_stride={doc_stride} must be well under max_length={length}")
    dist, cfg, sep_id = ctx.dist, ctx.cfg, sep_token(loaded.tokenizer)

    def loader(path: Path, train: bool) -> LabelledLoader:
        ids, targets = _features(loaded.tokenizer, read_squad(path), length, doc_stride)
        batch_size = cfg.batch_size if train else max(1, min(cfg.batch_size, len(ids) // dist.world_size))
        return LabelledLoader(ids, targets, batch_size, pad_id(loaded.tokenizer), seed=cfg.seed, shuffle=train,
                              block_size=length, rank=dist.rank, world_size=dist.world_size)

    train_loader = loader(Path(data), True)
    val_loader = loader(Path(val_data), False) if val_data is not None else None

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_head(out, net, loaded.config, tokenizer_dir=loaded.path, train_state=train_state, step=step)

    answerable = int((train_loader.targets[:, 0] > 0).sum())
    summary = (f"qa: span head on an encoder; {len(train_loader.ids)} windows of ≤ {length} tokens "
               f"({answerable} holding their answer)")
    return Method(net, train_loader, functools.partial(span_loss, sep_id=sep_id), save, val_loader=val_loader,
                  summary=summary)


@dataclass
class Span:
    """An answer found in one of the contexts: its text, where it is, and its start + end logit."""

    text: str
    context: int  # index into the contexts given
    start: int  # character offsets into that context
    end: int
    score: float


@torch.no_grad()
def predict_spans(net: SpanHead, tokenizer: Tokenizer, question: str, contexts: list[str], *,
                  doc_stride: int = 128, max_answer_tokens: int = MAX_ANSWER_TOKENS, batch_size: int = 16
                  ) -> list[Span]:
    """For each context, its best span (highest start + end logit, end not before start, at most
    `max_answer_tokens` long, inside the context), searched over all its windows; best first."""
    net.eval()
    device = next(net.parameters()).device
    length = min(net.config.max_length, net.backbone.config.max_position_embeddings)
    encoded = [(c, w) for c, context in enumerate(contexts)
               for w in windows(tokenizer, question, context, length, doc_stride)]
    best: dict[int, Span] = {}
    for start in range(0, len(encoded), batch_size):
        batch = encoded[start:start + batch_size]
        x = pad_batch([w.ids for _, w in batch], pad_id(tokenizer))
        types = torch.zeros_like(x["input_ids"])
        for r, (_, w) in enumerate(batch):
            types[r, :len(w.type_ids)] = torch.tensor(w.type_ids)
        logits = net(x["input_ids"].to(device), x["attention_mask"].to(device), types.to(device)).float().cpu()
        for r, (c, w) in enumerate(batch):
            span = _best_span(logits[r, :len(w.ids)], w, contexts[c], c, max_answer_tokens)
            if span is not None and (c not in best or span.score > best[c].score):
                best[c] = span
    return sorted(best.values(), key=lambda s: -s.score)


def _best_span(logits: Tensor, window: Any, context: str, index: int, max_tokens: int) -> Span | None:
    inside = torch.tensor([s == 1 for s in window.sequence_ids])
    if not inside.any():
        return None
    start_logits = logits[:, 0].masked_fill(~inside, float("-inf"))
    end_logits = logits[:, 1].masked_fill(~inside, float("-inf"))
    scores = start_logits[:, None] + end_logits[None, :]  # [start, end]
    n = scores.shape[0]
    ones = torch.ones(n, n, dtype=torch.bool)
    allowed = ones.triu() & ~ones.triu(max_tokens)  # end ≥ start, end − start < max_tokens
    scores = scores.masked_fill(~allowed, float("-inf"))
    flat = int(scores.argmax())
    i, j = divmod(flat, n)
    if not torch.isfinite(scores[i, j]):
        return None
    a, b = window.offsets[i][0], window.offsets[j][1]
    return Span(context[a:b], index, a, b, float(scores[i, j]))
