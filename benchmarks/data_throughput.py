"""Throughput of the preprocessing stage, with 1 and 2 worker processes, in one run.

    python benchmarks/data_throughput.py              # ~200 MB generated corpus
    python benchmarks/data_throughput.py --mb 20      # a quick look

Generates a JSONL corpus of prose-like documents (Zipf-distributed words with English function words,
so the Gopher rules keep most of it; 5% exact and 5% near copies planted), then times
  1. `clean`: normalise + quality filters + language ID + PII scrub + exact dedup, and
  2. `dedup` with exact dedup off: MinHash signatures + LSH near-duplicate removal,
each with `--workers 1` and `--workers 2`, and prints MB/s (input bytes per wall second) and the
2-worker / 1-worker scaling ratio. Both steps parallelise over input files (shards), so the corpus is
written as many files. Not a test: numbers depend on the machine and on what else is running.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import tempfile
import time
from pathlib import Path

from lmforge.data import clean, dedup

FUNCTION = ["the", "of", "and", "to", "in", "a", "is", "that", "it", "was", "for", "on", "are", "with", "as", "be",
            "at", "by", "this", "have", "from", "or", "had", "not", "but", "what", "all", "were", "when", "we",
            "there", "can", "an", "your", "which", "their", "said", "if", "do", "will", "each", "about", "how"]


def _vocab(rng: random.Random, n: int = 20000) -> list[str]:
    letters = "etaoinshrdlcumwfgypbvkjxqz"
    weights = [13, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2, 2, 2, 2, 1.5, 1, 0.8, 0.2, 0.2, 0.1, 0.1]
    return ["".join(rng.choices(letters, weights, k=rng.randint(3, 9))) for _ in range(n)]


def generate(root: Path, mb: float, files: int = 32, seed: int = 0) -> int:
    """Write `files` JSONL files totalling about `mb` megabytes; returns the byte count."""
    expected = [root / f"part-{f:03d}.jsonl" for f in range(files)]
    if all(p.exists() for p in expected) and len(list(root.iterdir())) == files:  # reuse a corpus in --dir
        return sum(p.stat().st_size for p in expected)
    rng = random.Random(seed)
    vocab = _vocab(rng)
    cum, acc = [], 0.0
    for r in range(len(vocab)):
        acc += 1 / (r + 1)  # Zipf's law over the content vocabulary
        cum.append(acc)
    root.mkdir(parents=True, exist_ok=True)
    per_file, total, recent = int(mb * 1e6 / files), 0, []
    for f in range(files):
        size = 0
        with open(root / f"part-{f:03d}.jsonl", "w", encoding="utf-8") as out:
            while size < per_file:
                r = rng.random()
                if r < 0.05 and recent:
                    text = rng.choice(recent)  # exact copy
                elif r < 0.10 and recent:
                    words = rng.choice(recent).split()
                    words[rng.randrange(len(words))] = rng.choice(vocab)  # near copy: one word changed
                    text = " ".join(words)
                else:
                    sentences = []
                    for _ in range(rng.randint(8, 30)):
                        content = rng.choices(vocab, cum_weights=cum, k=rng.randint(5, 12))
                        words = [w if rng.random() < 0.6 else rng.choice(FUNCTION) for w in content]
                        sentences.append(" ".join(words).capitalize() + ".")
                    text = " ".join(sentences)
                    if rng.random() < 0.02:
                        text += f" Contact: user{rng.randint(1, 999)}@example.com"
                    recent = [*recent[-199:], text]
                line = json.dumps({"text": text}) + "\n"
                out.write(line)
                size += len(line)
        total += size
    return total


def _spin(_: int) -> int:
    s = 0
    for i in range(10_000_000):
        s += i
    return s


def machine_scaling() -> float:
    """The ceiling: how much faster 2 processes finish 2 pure-Python loops than 1 process, right now.

    On a shared machine other jobs take cores; read the pipeline's ratio against this one.
    """
    import multiprocessing as mp

    start = time.perf_counter()
    for i in range(2):
        _spin(i)
    serial = time.perf_counter() - start
    start = time.perf_counter()
    with mp.get_context("fork").Pool(2) as pool:
        pool.map(_spin, range(2))
    return serial / (time.perf_counter() - start)


def timed(fn, *args, **kwargs) -> tuple[float, dict]:
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return time.perf_counter() - start, result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mb", type=float, default=200.0, help="corpus size in megabytes")
    ap.add_argument("--files", type=int, default=32, help="input files (the unit of parallelism)")
    ap.add_argument("--dir", type=Path, default=None, help="work folder (default: a temporary one)")
    args = ap.parse_args()
    work = args.dir or Path(tempfile.mkdtemp(prefix="lmforge-bench-"))
    try:
        t0 = time.perf_counter()
        nbytes = generate(work / "raw", args.mb, args.files)
        mb = nbytes / 1e6
        print(f"corpus: {mb:.1f} MB in {args.files} files, generated in {time.perf_counter() - t0:.1f}s", flush=True)
        print(f"machine ceiling before: 2 processes run {machine_scaling():.2f}x faster than 1 (pure Python)",
              flush=True)
        rows = []
        for step in ("clean+filter+exact dedup", "MinHash near dedup"):
            speeds = {}
            for workers in (1, 2):
                out = work / f"out-{len(rows)}-{workers}"
                if step.startswith("clean"):
                    secs, res = timed(clean, work / "raw", out, workers=workers, progress=False)
                else:
                    secs, res = timed(dedup, work / "raw", out, exact=False, workers=workers, progress=False)
                speeds[workers] = mb / secs
                print(f"{step:26s} workers={workers}: {secs:7.1f}s  {speeds[workers]:6.2f} MB/s  "
                      f"kept {res['kept']:,}/{res['documents']:,}  removed {res['removed']}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
            rows.append((step, speeds[1], speeds[2]))
        print(f"machine ceiling after: {machine_scaling():.2f}x", flush=True)
        print("\n| step | 1 worker MB/s | 2 workers MB/s | scaling |\n|---|---:|---:|---:|")
        for step, one, two in rows:
            print(f"| {step} | {one:.2f} | {two:.2f} | {two / one:.2f}x |")
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
