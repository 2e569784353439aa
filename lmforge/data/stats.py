"""`lmforge data stats`: what a corpus holds, as JSON, a Markdown summary and PNG histograms.

Read before training: a length histogram shows truncated scrapes and boilerplate spikes, the language
table shows leakage from other languages, and the removals table (from a `clean`/`dedup` manifest)
shows which rule is doing the work, the usual first sign of a threshold set wrong.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from lmforge.data.filters import identify_language
from lmforge.data.readers import Skip, TextUnit, read_documents
from lmforge.errors import DataError
from lmforge.io import atomic_write_json, atomic_write_text, check_output
from lmforge.progress import Progress


def _histogram(values: list[int], png: Path, title: str, xlabel: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    data = np.asarray(values, dtype=np.float64)
    # Lengths span orders of magnitude: log-spaced bins show short scraps and long dumps alike.
    bins = np.logspace(0, np.log10(max(data.max(), 10)), 40) if len(data) else 10
    ax.hist(data, bins=bins, color="#4a7bb7")
    ax.set_xscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _bars(counts: Counter, png: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    top = counts.most_common(15)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.bar([k for k, _ in top], [v for _, v in top], color="#4a7bb7")
    ax.set_ylabel("documents")
    ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    fig.savefig(png)
    plt.close(fig)


def _summary(values: list[int]) -> dict[str, float]:
    if not values:
        return {}
    a = np.asarray(values)
    return {"total": int(a.sum()), "mean": round(float(a.mean()), 1), "min": int(a.min()),
            "p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)), "max": int(a.max())}


def stats(data: Path, out: Path = Path("stats"), *, text_field: str = "text", text_unit: TextUnit = "file",
          glob: str | None = None, overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Describe a corpus: document lengths, languages, and removals by rule when it is a `clean` output.

    Writes stats.json, stats.md, length_chars.png, length_words.png and languages.png into `out`.
    Language comes from each document's `lang` field (written by `clean`), else from language ID.

    Args:
        data: A file or folder (any format `data clean` reads; a `clean` output folder uses its manifest).
        out: Folder for the report; refused if it holds anything, unless `overwrite`.
        text_field: JSONL key / CSV or Parquet column holding the text.
        text_unit: For plain-text files: one document per "file" or per blank-line "paragraph" block.
        glob: Only files under a folder whose relative path matches this pattern.
        overwrite: Replace the report files already in `out`.
        progress: Show a progress line.

    Returns:
        The contents of stats.json.
    """
    input, out = Path(data), Path(out)
    check_output(out, overwrite)
    chars: list[int] = []
    words: list[int] = []
    langs: Counter = Counter()
    skipped: Counter = Counter()
    bar = Progress(None, "stats", unit="docs", enabled=progress)
    for rec in read_documents(input, glob=glob, text_field=text_field, text_unit=text_unit, on_error="skip"):
        if isinstance(rec, Skip):
            skipped[rec.reason] += 1
            continue
        text = rec["text"]
        chars.append(len(text))
        words.append(len(text.split()))
        langs[rec.get("lang") or identify_language(text)[0]] += 1
        bar.update(len(chars))
    bar.close()
    if not chars:
        raise DataError(f"{input}: no documents to describe")
    manifest = input / "manifest.json" if input.is_dir() else None
    counts = json.loads(manifest.read_text())["counts"] if manifest is not None and manifest.exists() else None
    report: dict[str, Any] = {
        "input": str(input), "documents": len(chars), "skipped": dict(skipped),
        "chars": _summary(chars), "words": _summary(words), "languages": dict(langs.most_common()),
        "removals": counts,
    }
    out.mkdir(parents=True, exist_ok=True)
    _histogram(chars, out / "length_chars.png", "document length", "characters (log scale)")
    _histogram(words, out / "length_words.png", "document length", "whitespace words (log scale)")
    _bars(langs, out / "languages.png", "documents by language")
    atomic_write_json(out / "stats.json", report)
    atomic_write_text(out / "stats.md", _markdown(report))
    return report


def _markdown(r: dict[str, Any]) -> str:
    lines = [f"# Corpus statistics: `{r['input']}`", "", f"{r['documents']:,} documents.", "",
             "| length | total | mean | min | median | p90 | max |", "|---|---:|---:|---:|---:|---:|---:|"]
    for key in ("chars", "words"):
        s = r[key]
        lines.append(f"| {key} | {s['total']:,} | {s['mean']:,} | {s['min']:,} | {s['p50']:,.0f} | "
                     f"{s['p90']:,.0f} | {s['max']:,} |")
    lines += ["", "![length in characters](length_chars.png)", "", "![length in words](length_words.png)", "",
              "## Languages", "", "| language | documents | share |", "|---|---:|---:|"]
    for lang, n in r["languages"].items():
        lines.append(f"| {lang} | {n:,} | {100 * n / r['documents']:.1f}% |")
    lines += ["", "![languages](languages.png)", ""]
    c = r["removals"]
    if c:
        lines += ["## Removals by rule", "", f"Of {c['documents']:,} input documents, {c['kept']:,} kept.", "",
                  "| rule | removed | share of input |", "|---|---:|---:|"]
        for rule, n in sorted(c["removed"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| {rule} | {n:,} | {100 * n / max(c['documents'], 1):.1f}% |")
        for reason, n in sorted(c["skipped"].items(), key=lambda kv: -kv[1]):
            lines.append(f"| skipped: {reason} | {n:,} | {100 * n / max(c['documents'], 1):.1f}% |")
        if c.get("pii"):
            lines += ["", "PII replaced: " + ", ".join(f"{k} {v:,}" for k, v in c["pii"].items()) + "."]
        lines.append("")
    if r["skipped"]:
        lines += ["Unreadable records in this input: "
                  + ", ".join(f"{k} {v:,}" for k, v in r["skipped"].items()) + ".", ""]
    return "\n".join(lines)
