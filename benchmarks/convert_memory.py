"""Peak memory of converting a ~500M-parameter checkpoint, against the size of its weights.

Builds a random Llama-shaped model with transformers (fp32, ~2 GB of weights), then measures, each in a
fresh process, the peak resident memory (ru_maxrss) of:
  - `lmforge convert from-hf` and `lmforge convert to-hf` (streamed, tensor by tensor),
  - `lmforge.load(hf_dir)` (the model in memory, built without a second copy),
  - transformers' `AutoModelForCausalLM.from_pretrained` (the peer, for scale),
  (both loads then read every weight once, as a forward pass would: transformers maps the file lazily,
  so untouched weights would not be counted),
  - a bare `import lmforge` (the interpreter + torch baseline included in every figure above).

    .venv/bin/python benchmarks/convert_memory.py [--work /tmp/convert_memory] [--layers 24]
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

BUILD = """
import sys, torch
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from tokenizers import Tokenizer, models, pre_tokenizers
out, layers = sys.argv[1], int(sys.argv[2])
cfg = AutoConfig.for_model("llama", vocab_size=32000, hidden_size=1280, intermediate_size=3456,
                           num_hidden_layers=layers, num_attention_heads=20, num_key_value_heads=4,
                           max_position_embeddings=2048, tie_word_embeddings=False)
torch.manual_seed(0)
model = AutoModelForCausalLM.from_config(cfg)
model.save_pretrained(out)
vocab = {f"t{i}": i for i in range(32000)}
tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
tok.pre_tokenizer = pre_tokenizers.Whitespace()
PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="t1", bos_token="t2").save_pretrained(out)
print(sum(p.numel() for p in model.parameters()))
"""


def measure(code: str, *args: str) -> float:
    """Run in a fresh parent, so each figure is that child's own peak, not a running maximum."""
    wrapper = ("import resource, subprocess, sys; subprocess.run([sys.executable, '-c', sys.argv[1], *sys.argv[2:]], "
               "check=True, stdout=subprocess.DEVNULL); "
               "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)")
    out = subprocess.run([sys.executable, "-c", wrapper, code, *args], check=True, capture_output=True, text=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", type=Path, default=Path("/tmp/convert_memory"))
    parser.add_argument("--layers", type=int, default=24)
    args = parser.parse_args()
    shutil.rmtree(args.work, ignore_errors=True)
    args.work.mkdir(parents=True)
    hf, ours, back = args.work / "hf", args.work / "ours", args.work / "back"
    params = int(subprocess.run([sys.executable, "-c", BUILD, str(hf), str(args.layers)], check=True,
                                capture_output=True, text=True).stdout.strip().splitlines()[-1])
    weights_mb = sum(p.stat().st_size for p in hf.glob("*.safetensors")) / 2**20
    rows = {
        "import lmforge (baseline)": measure("import lmforge"),
        "lmforge convert from-hf": measure("import sys, lmforge; lmforge.convert.from_hf(sys.argv[1], sys.argv[2])",
                                           str(hf), str(ours)),
        "lmforge convert to-hf": measure("import sys, lmforge; lmforge.convert.to_hf(sys.argv[1], sys.argv[2])",
                                         str(ours), str(back)),
        "lmforge.load(hf_dir)": measure(
            "import sys, lmforge; m = lmforge.load(sys.argv[1]).model; sum(float(p.sum()) for p in m.parameters())",
            str(hf)),
        "transformers from_pretrained": measure(
            "import sys, torch; from transformers import AutoModelForCausalLM; "
            "m = AutoModelForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32); "
            "sum(float(p.sum()) for p in m.parameters())", str(hf)),
    }
    baseline = rows["import lmforge (baseline)"]
    print(f"model: {params / 1e6:.0f}M parameters, {weights_mb:.0f} MB of fp32 weights")
    print(f"{'step':<32} {'peak RSS MB':>12} {'× weights':>10} {'above baseline × weights':>26}")
    for name, mb in rows.items():
        print(f"{name:<32} {mb:>12.0f} {mb / weights_mb:>10.2f} {(mb - baseline) / weights_mb:>26.2f}")
    print(json.dumps({"params": params, "weights_mb": round(weights_mb), **{k: round(v) for k, v in rows.items()}}))
    shutil.rmtree(args.work, ignore_errors=True)


if __name__ == "__main__":
    main()
