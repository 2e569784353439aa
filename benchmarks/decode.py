"""Batch-1 greedy decode speed: lmforge's engine against transformers' `generate`, and the bandwidth bound.

What it measures
    Tokens per second of greedy decoding, one sequence, after the prompt, on the same random weights in
    both libraries: GPT-2 124M (transformers' GPT2Config defaults) and a ~33M-parameter Llama shape
    (vocab 32000, width 512, 6 layers, 8 heads, 2 KV heads, SwiGLU 1408, tied embeddings), in fp32 and bf16.
    Our model is the transformers checkpoint imported by `lmforge.model.hf.load_hf_model`, so both read
    identical weights; the script checks the two produce the same greedy tokens.

How
    Each library decodes `--tokens` new tokens after a `--prompt`-token random prompt; every new token is
    time-stamped as it arrives (a transformers streamer; our `generate_tokens` iterator), and a side's
    speed is 1 / median time between consecutive tokens, pooled over `--rounds` rounds that alternate the
    two sides, so a burst of load from another process does not decide the ratio.

    The bound: decoding one token must read every weight matrix once (the embedding table only once more,
    as the head), so tokens/s cannot exceed the machine's memory bandwidth / weight bytes per token. The
    bandwidth is measured here as the best of several full reads (a sum) of a 512 MiB buffer.

Run
    .venv/bin/python benchmarks/decode.py                       # both models, fp32 and bf16
    .venv/bin/python benchmarks/decode.py --models gpt2 --dtypes bf16 --tokens 64 --rounds 3 --threads 2
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from pathlib import Path

import torch

from lmforge.infer.decode import SamplingParams, generate_tokens
from lmforge.model.hf import load_hf_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(name: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config()).eval()
    config = LlamaConfig(vocab_size=32000, hidden_size=512, intermediate_size=1408, num_hidden_layers=6,
                         num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


def ours_from(hf: torch.nn.Module) -> torch.nn.Module:
    with tempfile.TemporaryDirectory() as tmp:
        hf.save_pretrained(tmp)
        model, _ = load_hf_model(Path(tmp))
    return model.eval()


def weight_bytes_per_token(model: torch.nn.Module) -> int:
    """Every parameter but the embedding tables (a token reads one row), plus the head's full matrix."""
    skip = {id(model.embed.weight)} | ({id(model.pos_embed.weight)} if model.pos_embed is not None else set())
    params = {id(p): p for p in model.parameters() if id(p) not in skip}
    total = sum(p.numel() * p.element_size() for p in params.values())
    return total + model.lm_head.weight.numel() * model.lm_head.weight.element_size()


def measure_bandwidth(repeats: int = 5) -> float:
    """Best read bandwidth in bytes/s over a buffer far larger than any cache."""
    buffer = torch.ones(128 * 1024 * 1024, dtype=torch.float32)  # 512 MiB
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        buffer.sum()
        best = min(best, time.perf_counter() - start)
    return buffer.numel() * 4 / best


def step_times(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def run_ours(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    params = SamplingParams(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
    out, stamps = [], []
    for token in generate_tokens(model, prompt, params):
        stamps.append(time.perf_counter())
        out.append(token)
    return out, step_times(stamps)


def run_hf(model: torch.nn.Module, prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
    from transformers.generation.streamers import BaseStreamer

    class Stamps(BaseStreamer):
        def __init__(self) -> None:
            self.times: list[float] = []

        def put(self, value: torch.Tensor) -> None:
            self.times.append(time.perf_counter())

        def end(self) -> None:
            pass

    streamer = Stamps()
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=tokens,
                             min_new_tokens=tokens, pad_token_id=0, streamer=streamer)
    return out[0, len(prompt):].tolist(), step_times(streamer.times[1:])  # the first put is the prompt


def bench(name: str, dtype_name: str, args: argparse.Namespace, bandwidth: float) -> dict[str, float]:
    dtype = DTYPES[dtype_name]
    hf = hf_model(name)
    ours = ours_from(hf).to(dtype)
    hf = hf.to(dtype)
    prompt = torch.randint(0, hf.config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0))
    prompt = prompt.tolist()
    times: dict[str, list[float]] = {"transformers": [], "lmforge": []}
    agree = []
    for r in range(args.rounds):
        order = [("transformers", run_hf, hf), ("lmforge", run_ours, ours)]
        results = {}
        for side, fn, model in order if r % 2 == 0 else order[::-1]:
            toks, steps = fn(model, prompt, args.tokens)
            times[side] += steps
            results[side] = toks
        agree.append(results["transformers"] == results["lmforge"])
    speed = {side: 1 / statistics.median(t) for side, t in times.items()}
    bound = bandwidth / weight_bytes_per_token(ours)
    return {**speed, "bound": bound, "same_tokens": all(agree)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2,llama30m")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; greedy, batch 1, {args.prompt}-token prompt, {args.tokens} new tokens")
    print(f"{'model':<10} {'dtype':<5} {'transformers':>12} {'lmforge':>9} {'ratio':>6} {'bound':>7} "
          f"{'% bound':>8}  same tokens")
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            r = bench(name, dtype_name, args, bandwidth)
            print(f"{name:<10} {dtype_name:<5} {r['transformers']:>12.1f} {r['lmforge']:>9.1f} "
                  f"{r['lmforge'] / r['transformers']:>5.2f}x {r['bound']:>7.1f} "
                  f"{100 * r['lmforge'] / r['bound']:>7.0f}%  {r['same_tokens']}", flush=True)


if __name__ == "__main__":
    main()
