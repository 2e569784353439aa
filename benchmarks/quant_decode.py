"""Batch-1 greedy decode speed of int8 and int4 weight-only models against our bf16, and the bandwidth bound.

What it measures
    Tokens per second of greedy decoding, one sequence, through lmforge's engine (the path `generate`, `serve`
    and `LM.generate` take), for three copies of one random model: bf16 (Linear weights prepacked for oneDNN,
    our fastest float decode on CPU), int8 per output channel, and int4 group-wise (g128) with an int8 head
    (`--head int4`: an int4 head too), both with bf16 activations as `lmforge compress quantize` writes them.
    Two shapes: GPT-2 124M (the `gpt2` preset: tied 50257×768 embedding, which the quantized head copies) and
    a Llama shape (TinyLlama 1.1B: width 2048, 22 layers, 32 heads / 4 KV heads, SwiGLU 5632, untied
    32000-token head).

    The int8 and int4 layers run lmforge's own AVX-512 kernels (lmforge/model/qmatvec.c); `LMFORGE_KERNELS=0`
    measures PyTorch's integer kernels instead, which stream about half the read bandwidth here.

How
    Each round decodes `--tokens` new tokens after a `--prompt`-token prompt with every variant in turn; a
    variant's speed is 1 / median time between consecutive tokens, pooled over `--rounds` rounds, so a burst
    of load from another process does not decide a ratio. The bound: a token reads every weight byte once
    (the embedding only as the head), so tokens/s ≤ read bandwidth / weight bytes per token; the bandwidth is
    the best of several sums over a 512 MiB buffer.

Run
    .venv/bin/python benchmarks/quant_decode.py                        # both shapes, int8 head for int4
    .venv/bin/python benchmarks/quant_decode.py --head int4 --models gpt2 --tokens 32 --rounds 3 --threads 2
    LMFORGE_KERNELS=0 .venv/bin/python benchmarks/quant_decode.py      # PyTorch's kernels, for the ratio
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from torch import nn

from lmforge.compress.report import decode_step_times
from lmforge.config import ModelConfig, preset
from lmforge.model.gpt import GPT
from lmforge.model.quant import QUANTIZED, quantize_model

SHAPES = {
    "gpt2": lambda: preset("gpt2"),
    "llama": lambda: ModelConfig(vocab_size=32000, hidden_size=2048, num_hidden_layers=22, num_attention_heads=32,
                                 num_key_value_heads=4, intermediate_size=5632, max_position_embeddings=2048,
                                 family="llama"),
}


def weight_bytes_per_token(model: GPT) -> int:
    """Bytes a decode step reads: every parameter but the embedding tables (one row each), plus the head."""
    skip = {id(model.embed.weight)} | ({id(model.pos_embed.weight)} if model.pos_embed is not None else set())
    total = sum(p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
                if id(p) not in skip)
    if not isinstance(model.lm_head, QUANTIZED) and id(model.lm_head.weight) in skip:  # tied float head
        total += model.lm_head.weight.numel() * model.lm_head.weight.element_size()
    return total


def measure_bandwidth(repeats: int = 5) -> float:
    buffer = torch.ones(128 * 1024 * 1024, dtype=torch.float32)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def variants(shape: str, group_size: int, head: str) -> dict[str, nn.Module]:
    torch.manual_seed(0)
    base = GPT(SHAPES[shape]()).to(torch.bfloat16).eval()
    out = {"bf16": base}
    for scheme in ("int8", "int4"):
        model = copy.deepcopy(base)
        quantize_model(model, scheme, group_size=group_size, head="int8" if scheme == "int8" else head,
                       scale_dtype=torch.bfloat16)
        out[scheme] = model.eval()
    return out


def bench(shape: str, args: argparse.Namespace, bandwidth: float) -> None:
    models = variants(shape, args.group_size, args.head)
    times: dict[str, list[float]] = {name: [] for name in models}
    for r in range(args.rounds):
        names = list(models) if r % 2 == 0 else list(models)[::-1]
        for name in names:
            times[name] += decode_step_times(models[name], new_tokens=args.tokens, prompt_tokens=args.prompt)
    speed = {name: 1 / statistics.median(t) for name, t in times.items()}
    params = sum(p.numel() for p in models["bf16"].parameters()) / 1e6
    for name, model in models.items():
        size = weight_bytes_per_token(model)
        bound = bandwidth / size
        ratio = "" if name == "bf16" else f"{speed[name] / speed['bf16']:.2f}x"
        print(f"{shape:<6} {params:>7.0f}M {name:<5} {size / 1e6:>9.1f} {speed[name]:>8.1f} {ratio:>7} "
              f"{bound:>8.1f} {100 * speed[name] / bound:>6.0f}%", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2,llama")
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--head", default="int8", help="the int4 model's head: int8 (as `compress quantize`) or int4")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, read bandwidth {bandwidth / 1e9:.1f} GB/s; "
          f"greedy, batch 1, {args.prompt}-token prompt, {args.tokens} new tokens × {args.rounds} rounds; "
          f"int4 group {args.group_size}, {args.head} head for int4")
    print(f"{'shape':<6} {'params':>8} {'type':<5} {'MB/token':>9} {'tok/s':>8} {'vs bf16':>7} {'bound':>8} "
          f"{'% bound':>7}")
    for shape in args.models.split(","):
        bench(shape, args, bandwidth)


if __name__ == "__main__":
    main()
