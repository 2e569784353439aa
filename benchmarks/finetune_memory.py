"""Memory and speed of fine-tuning one ~110M-parameter Llama-style model: full vs LoRA vs LoRA over an int8 base.

Each method runs `lmforge finetune full|lora` in its own subprocess (so peak RSS is its own), on the same
SFT data, windows and steps. Reported per method: tokens/s (mean over the steps after the first), the
peak RSS of the whole process, and the peak RSS of the training phase alone (the kernel's high-water mark is
reset via /proc/self/clear_refs when the loop starts, after returning freed heap memory with malloc_trim, so
loading the fp32 checkpoint — the same for every method — does not hide the difference training makes).

Full fine-tuning holds weights + gradients + two AdamW moments (16 bytes per parameter in fp32); LoRA holds the
frozen weights (4 bytes, or 1 byte + a scale per row in int8) plus adapters, their gradients and moments.

    .venv/bin/python benchmarks/finetune_memory.py [--steps 5] [--batch-size 1] [--block-size 256]
"""

from __future__ import annotations

import argparse
import csv
import ctypes
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SHAPE = dict(vocab_size=32000, hidden_size=768, num_hidden_layers=12, num_attention_heads=12, num_key_value_heads=12,
             intermediate_size=2048, max_position_embeddings=256, tie_word_embeddings=True)
METHODS = {"full": {}, "lora": {"lora_targets": "q,k,v,o,gate,up,down", "lora_r": 16, "lora_alpha": 32},
           "lora-int8": {"lora_targets": "q,k,v,o,gate,up,down", "lora_r": 16, "lora_alpha": 32, "base_int8": True}}


def status_kib(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{key} not in /proc/self/status")


def setup(root: Path) -> tuple[Path, Path]:
    """A random-weight checkpoint of SHAPE with a tokenizer, and SFT data made of real WordNet glosses."""
    import lmforge
    from lmforge.config import preset
    from lmforge.lm import LM
    from lmforge.model.gpt import GPT
    from lmforge.tokenizer import Tokenizer

    with open(ROOT / "datasets" / "wordnet_topics" / "train.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(r["text"] for r in rows))
    tok = Tokenizer.load(lmforge.train_tokenizer(corpus, root / "tok", vocab_size=1024))
    base = LM(GPT(preset("llama-tiny", **SHAPE)), tok).save(root / "base")
    data = root / "sft.jsonl"
    with open(data, "w") as f:
        for r in rows:
            f.write(json.dumps({"instruction": "Which kind of thing does this definition describe?",
                                "input": r["text"], "output": r["label"]}) + "\n")
    return base, data


def run_one(method: str, base: Path, data: Path, out: Path, steps: int, batch_size: int, block_size: int,
            precision: str) -> dict[str, float]:
    """In this process: fine-tune, then report speed and memory as JSON on stdout's last line."""
    import lmforge.methods.sft as lm
    import lmforge.train.shell as shell

    loop_train = shell.train
    marks: dict[str, int] = {}

    def measured_train(*args, **kwargs):
        # Weights freed while loading (the fp32 copy an int8 base replaces) sit in glibc's heap until trimmed;
        # hand them back so the training peak counts what training holds, then reset the high-water mark.
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        marks["before_train_kib"] = status_kib("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")
        return loop_train(*args, **kwargs)

    shell.train = measured_train
    verb = lm.finetune_full if method == "full" else lm.finetune_lora
    verb(base, data, out, max_steps=steps, batch_size=batch_size, block_size=block_size, precision=precision,
         log_every=1, warmup_steps=1, progress=False, **METHODS[method])
    rates = [json.loads(line)["tokens_per_s"] for line in (out / "metrics.jsonl").read_text().splitlines()][1:]
    return {"tokens_per_s": sum(rates) / len(rates), "train_peak_mib": status_kib("VmHWM") / 1024,
            "process_peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "before_train_mib": marks["before_train_kib"] / 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=256)
    parser.add_argument("--precision", default="32", choices=["32", "bf16-mixed"])
    parser.add_argument("--run", choices=list(METHODS), help=argparse.SUPPRESS)  # one method, in a subprocess
    parser.add_argument("--base", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        result = run_one(args.run, args.base, args.data, args.out, args.steps, args.batch_size, args.block_size,
                         args.precision)
        print(json.dumps(result))
        return
    with tempfile.TemporaryDirectory() as tmp:
        base, data = setup(Path(tmp))
        from lmforge.lm import load

        params = load(base).model.num_params()
        results = {}
        for method in METHODS:
            cmd = [sys.executable, __file__, "--run", method, "--base", str(base), "--data", str(data),
                   "--out", str(Path(tmp) / method), "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                   "--block-size", str(args.block_size), "--precision", args.precision]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode:
                sys.exit(f"{method} failed:\n{proc.stderr}")
            print(proc.stderr.strip().splitlines()[0], file=sys.stderr)
            results[method] = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"\n{params / 1e6:.0f}M-parameter Llama-style model, {args.steps} steps of "
          f"{args.batch_size}×{args.block_size} tokens, precision {args.precision}")
    print(f"{'method':<10} {'tokens/s':>9} {'RSS at start':>13} {'training peak':>14} {'process peak':>13}  "
          "training peak vs full")
    full = results["full"]["train_peak_mib"]
    for method, r in results.items():
        print(f"{method:<10} {r['tokens_per_s']:>9.1f} {r['before_train_mib']:>9.0f} MiB "
              f"{r['train_peak_mib']:>10.0f} MiB {r['process_peak_mib']:>9.0f} MiB  {r['train_peak_mib'] / full:.2f}x")


if __name__ == "__main__":
    main()
