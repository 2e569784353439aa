"""`lmforge pretrain --model ngram-N`: an n-gram model is counted, not trained.

One pass over the packed train split counts every k-gram up to n (`lmforge/model/ngram.py` says how they
become probabilities). The result is a checkpoint directory like any other — config.json (model_type
"lmforge-ngram", the order, the discounts), the counts in model.safetensors, the tokenizer and generation
defaults — so `lmforge.load`, `eval`, `eval perplexity`, `generate` and `serve` take it unchanged. There is
no optimizer, so no loop, no train_state.pt and nothing to resume; metrics.jsonl gets one line with the
tokens counted, the n-grams stored, the val loss (nats per token, as the Transformer's is logged) and the
seconds it took.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from lmforge.checkpoint import check_out_dir, generation_defaults, save_checkpoint
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError, DataError
from lmforge.infer.score import sliding_nll
from lmforge.model.ngram import NgramLM
from lmforge.tokenizer import Tokenizer

WINDOW = 256  # positions scored per forward when measuring the val loss


def fit_ngram(data: Path, order: int, out: Path, *, discount: float | None = None, progress: bool = True) -> Path:
    """Count the train split of `data` into an order-`order` model in `out`; see the module docstring."""
    if data is None:
        raise ConfigError("--data is required (a directory written by `lmforge data pack`)")
    data, out = Path(data), Path(out)
    check_out_dir(out)
    start = time.perf_counter()
    train = PackedDataset(data, "train")
    tokens = train.window(0, train.num_tokens)
    model = NgramLM.fit(tokens, order, train.vocab_size, discount=discount)
    val_loss = _val_loss(model, data)
    tokenizer_dir = data / "tokenizer"
    out.mkdir(parents=True, exist_ok=True)
    save_checkpoint(out, model, model.config, tokenizer_dir=tokenizer_dir,
                    generation_config=generation_defaults(tokenizer_dir, Tokenizer.load(tokenizer_dir)))
    record = {"step": 0, "tokens": train.num_tokens, "ngrams": dict(zip(range(1, order + 1), model.config.sizes)),
              "elapsed_s": time.perf_counter() - start}
    if val_loss is not None:
        record["val_loss"] = val_loss
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")
    if progress:
        val = f", val loss {val_loss:.4f}" if val_loss is not None else ""
        print(f"{order}-gram {model.config.smoothing} on {train.num_tokens:,} tokens: "
              f"{sum(model.config.sizes):,} n-grams in {record['elapsed_s']:.1f}s{val}; saved in {out}",
              file=sys.stderr)
    return out


def _val_loss(model: NgramLM, data: Path) -> float | None:
    """Mean NLL per token over the val split (every target, each with its full n−1 token history)."""
    try:
        val = PackedDataset(data, "val")
    except DataError:
        return None
    ids = val.window(0, val.num_tokens).tolist()
    if len(ids) < 2:
        return None
    stride = WINDOW - model.history if model.history < WINDOW else 1
    total, count = sliding_nll(model, ids, [True] * len(ids), WINDOW, stride, progress=False)
    return total / count
