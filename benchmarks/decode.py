"""Batch-1 greedy decode speed: lmforge (eager and compiled) against transformers' `generate` and llama.cpp.

What it measures
    Tokens per second of greedy decoding, one sequence, after the prompt, on the same random weights in
    every runtime: GPT-2 124M (transformers' GPT2Config defaults) and the ~30M Llama shape llama.cpp is
    fastest against us on (vocab 4096, width 512, 8 layers, 8 heads, SwiGLU 1408), in fp32 and bf16.
    - transformers: `generate` on the model it built;
    - lmforge: that checkpoint imported by `lmforge.model.hf.load_hf_model` (identical weights), decoded by
      the engine eagerly and through its compiled step (`Engine(compile=True)`, what `--compile true` and
      `lmforge.load(..., compile=True)` use; compile time reported, not timed in tokens/s);
    - llama.cpp (through llama-cpp-python, bf16 only): `lmforge export gguf --type bf16` of the same weights,
      run as `export_decode.py` runs it (f32 KV cache, one token per call).
    The script checks each side's greedy tokens against transformers'.

How
    Each side decodes `--tokens` new tokens after a `--prompt`-token random prompt; every new token is
    time-stamped as it arrives, and a side's speed is 1 / median time between consecutive tokens, pooled
    over `--rounds` rounds in which the sides take turns, so a burst of load from another process does not
    decide a ratio.

    The bound: decoding one token must read every weight matrix once (the embedding table only once more,
    as the head), so tokens/s cannot exceed the machine's memory bandwidth / weight bytes per token. The
    bandwidth is measured here as the best of several full reads (a sum) of a 512 MiB buffer.

Run
    .venv/bin/python benchmarks/decode.py                       # both models, fp32 and bf16
    .venv/bin/python benchmarks/decode.py --models llama30m --dtypes bf16 --tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from lmforge.infer.engine import Engine, Request
from lmforge.infer.sampling import SamplingParams
from lmforge.model.hf import load_hf_model

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def hf_model(name: str) -> torch.nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if name == "gpt2":
        return GPT2LMHeadModel(GPT2Config()).eval()
    config = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=2048,
                         rms_norm_eps=1e-5, tie_word_embeddings=False)
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


def engine_side(engine: Engine) -> Callable[[list[int], int], tuple[list[int], list[float]]]:
    def run(prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
        params = SamplingParams(max_new_tokens=tokens, temperature=0, stop_at_eos=False)
        out, stamps = [], []
        with torch.inference_mode():
            for output in engine.generate(Request(prompt, params)):
                stamps.append(time.perf_counter())
                out += output.token_ids
        return out, step_times(stamps)

    return run


def llama_cpp_side(ours: torch.nn.Module, tmp: Path, threads: int
                   ) -> Callable[[list[int], int], tuple[list[int], list[float]]]:
    """llama.cpp on our bf16 GGUF export of the same weights (a small byte-level tokenizer rides along: the
    prompt is token ids, so it only has to exist)."""
    from export_decode import llama_cpp  # the same llama.cpp loop as the export benchmark (one directory)

    from lmforge.export.gguf import export_gguf
    from lmforge.lm import LM
    from lmforge.tokenizer import Tokenizer, train_tokenizer

    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tokenizer = Tokenizer.load(train_tokenizer(corpus, tmp / "tok", vocab_size=300))
    checkpoint = LM(ours, tokenizer).save(tmp / "ckpt")
    path = export_gguf(checkpoint, tmp / "model.gguf", type="bf16", overwrite=True)
    return llama_cpp(path, ours.config.max_position_embeddings, threads)[1]


def hf_side(model: torch.nn.Module) -> Callable[[list[int], int], tuple[list[int], list[float]]]:
    return lambda prompt, tokens: run_hf(model, prompt, tokens)


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
    length = args.prompt + args.tokens
    sides = {"transformers": hf_side(hf), "lmforge": engine_side(Engine(ours, max_batch=1, max_model_len=length))}
    compile_seconds = float("nan")
    if args.compile:
        compiled = engine_side(Engine(ours, max_batch=1, max_model_len=length, compile=True))
        start = time.perf_counter()
        compiled(prompt, 2)  # the compile, outside the timing
        compile_seconds = time.perf_counter() - start
        sides["compiled"] = compiled
    with tempfile.TemporaryDirectory() as tmp:
        if args.llama_cpp and dtype_name == "bf16":
            sides["llama.cpp"] = llama_cpp_side(ours, Path(tmp), torch.get_num_threads())
        times: dict[str, list[float]] = {side: [] for side in sides}
        same = {side: True for side in sides}
        for r in range(args.rounds):
            results = {}
            for side, run in list(sides.items())[::1 if r % 2 == 0 else -1]:
                results[side], steps = run(prompt, args.tokens)
                times[side] += steps
            for side in sides:
                same[side] &= results[side] == results["transformers"]
    speed = {side: 1 / statistics.median(t) for side, t in times.items()}
    bound = bandwidth / weight_bytes_per_token(ours)
    return {"speed": speed, "bound": bound, "same": same, "compile_s": compile_seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="gpt2,llama30m")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", type=int, default=1, help="also the compiled step (1/0)")
    parser.add_argument("--llama-cpp", type=int, default=1, help="also llama.cpp on a bf16 GGUF export (1/0)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    bandwidth = measure_bandwidth()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, measured read bandwidth "
          f"{bandwidth / 1e9:.1f} GB/s; greedy, batch 1, {args.prompt}-token prompt, {args.tokens} new tokens")
    print("tokens/s; ratios are against transformers (×hf) and llama.cpp (×cpp); % of the bandwidth bound; "
          "'same' = greedy tokens equal transformers'")
    for name in args.models.split(","):
        for dtype_name in args.dtypes.split(","):
            r = bench(name, dtype_name, args, bandwidth)
            speed, hf_speed, cpp = r["speed"], r["speed"]["transformers"], r["speed"].get("llama.cpp")
            cells = []
            for side, s in speed.items():
                ratios = f"{s / hf_speed:.2f}×hf" + (f" {s / cpp:.2f}×cpp" if cpp else "")
                cells.append(f"{side} {s:.1f} ({ratios}, {100 * s / r['bound']:.0f}%, same {r['same'][side]})")
            compiled = f"; compile {r['compile_s']:.0f} s" if args.compile else ""
            print(f"{name} {dtype_name} (bound {r['bound']:.0f}{compiled}):\n    " + "\n    ".join(cells), flush=True)


if __name__ == "__main__":
    main()
