"""Exported models in their runtimes against lmforge on the same checkpoint: parity, perplexity, decode speed.

What it measures
    For lmforge itself (fp32, bf16), llama.cpp on `lmforge export gguf` files (f32, bf16, q8_0, q4_0, through
    llama-cpp-python) and onnxruntime on `lmforge export onnx` (fp32), all in one process on one checkpoint:
    - the largest |logit difference| from our fp32 model over a held-out text (`--text`, up to the context),
    - perplexity on that text (what a quantized type costs),
    - batch-1 greedy decode tokens/s after a `--prompt`-token prompt, and whether the greedy tokens are ours.
    The checkpoint is `--model` (any directory `lmforge.load` opens, e.g. the demo's runs/demo/model), or a
    preset with random weights.

How
    Decode speed: every new token is time-stamped as it arrives; a side's speed is 1 / median time between
    consecutive tokens, pooled over `--rounds` rounds in which the sides take turns, so a burst of load
    from another process does not decide a ratio. Every side uses `--threads` threads. llama.cpp runs with
    an f32 KV cache (its default f16 cache alone moves logits by ~2e-3) and is fed one token per call
    (n_ubatch=1): on AMX CPUs its q8_0/q4_0 AMX kernels crash on batches of ≥ 2 tokens
    (ggml-org/llama.cpp#20824), and decoding is one token per call anyway.

Run
    .venv/bin/python benchmarks/export_decode.py --model runs/demo/model --text held_out.txt
    .venv/bin/python benchmarks/export_decode.py --preset llama-tiny --types f32,q8_0 --dtypes fp32 --rounds 2
"""

from __future__ import annotations

import argparse
import itertools
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

import lmforge
from lmforge.export.gguf import export_gguf
from lmforge.export.onnx import export_onnx
from lmforge.infer.decode import SamplingParams, generate_tokens
from lmforge.lm import LM
from lmforge.tokenizer import Tokenizer

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
Side = tuple[Callable[[list[int]], np.ndarray], Callable[[list[int], int], tuple[list[int], list[float]]]]


def checkpoint(args: argparse.Namespace, tmp: Path) -> Path:
    """`--model`, or `--preset` with random weights (std 0.02) and a small byte-level tokenizer."""
    if args.model:
        return Path(args.model)
    from lmforge.config import preset
    from lmforge.model.gpt import GPT
    from lmforge.tokenizer import train_tokenizer

    corpus = tmp / "corpus.txt"
    corpus.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    tokenizer = Tokenizer.load(train_tokenizer(corpus, tmp / "tok", vocab_size=300))
    torch.manual_seed(0)
    model = GPT(preset(args.preset, vocab_size=args.vocab_size))
    return LM(model.eval(), tokenizer, {"temperature": 0.0}).save(tmp / "ckpt")


def stamps_to_steps(stamps: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(stamps)]


def ours(model: torch.nn.Module) -> Side:
    def logits(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids]))[0].float().numpy()

    def decode(prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
        out, stamps = [], []
        for token in generate_tokens(model, prompt, SamplingParams(max_new_tokens=tokens, temperature=0,
                                                                   stop_at_eos=False)):
            stamps.append(time.perf_counter())
            out.append(token)
        return out, stamps_to_steps(stamps)

    return logits, decode


def llama_cpp(path: Path, n_ctx: int, threads: int) -> Side:
    from llama_cpp import GGML_TYPE_F32, Llama

    llm = Llama(model_path=str(path), n_ctx=n_ctx, n_batch=1, n_ubatch=1, n_threads=threads,
                n_threads_batch=threads, logits_all=True, type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, verbose=False)

    def logits(ids: list[int]) -> np.ndarray:
        llm.reset()
        llm.eval(ids)
        return np.array(llm.scores[:len(ids)])

    def decode(prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
        llm.reset()
        llm.eval(prompt)
        out, stamps = [], []
        for _ in range(tokens):
            out.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
            stamps.append(time.perf_counter())
            llm.eval([out[-1]])
        return out, stamps_to_steps(stamps)

    return logits, decode


def onnxruntime(folder: Path, threads: int) -> Side:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    session = ort.InferenceSession(str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    empty = {i.name: np.zeros((1, i.shape[1], 0, i.shape[3]), np.float32)
             for i in session.get_inputs() if i.name.startswith("past_key_values.")}

    def step(ids: list[int], length: int, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        out = session.run(None, {"input_ids": np.array([ids]), "attention_mask": np.ones((1, length), np.int64),
                                 **past})
        return out[0][0], {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], out[1:])}

    def decode(prompt: list[int], tokens: int) -> tuple[list[int], list[float]]:
        logits, past = step(prompt, len(prompt), empty)
        out, stamps = [], []
        for _ in range(tokens):
            out.append(int(np.argmax(logits[-1])))
            stamps.append(time.perf_counter())
            logits, past = step(out[-1:], len(prompt) + len(out), past)
        return out, stamps_to_steps(stamps)

    return (lambda ids: step(ids, len(ids), empty)[0]), decode


def perplexity(logits: np.ndarray, ids: list[int]) -> float:
    logp = torch.log_softmax(torch.as_tensor(logits[:-1], dtype=torch.float64), dim=-1)
    return math.exp(-logp.gather(-1, torch.tensor(ids[1:])[:, None]).mean().item())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="checkpoint directory (default: --preset, random weights)")
    parser.add_argument("--preset", default="llama-tiny")
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--text", default=None, help="held-out text for parity and perplexity (default: README.md)")
    parser.add_argument("--types", default="f32,bf16,q8_0,q4_0", help="GGUF types for llama.cpp ('' for none)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="our dtypes (fp32 is the parity reference)")
    parser.add_argument("--onnx", type=int, default=1, help="also onnxruntime on the ONNX export (1/0)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = checkpoint(args, Path(tmp))
        reference = lmforge.load(ckpt, device="cpu", dtype=torch.float32)
        c = reference.config
        text = Path(args.text or Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
        ids = reference.tokenizer.encode(text)[:c.max_position_embeddings]
        prompt = ids[:args.prompt]
        args.tokens = min(args.tokens, c.max_position_embeddings - len(prompt))
        sides: dict[str, Side] = {}
        for dtype in args.dtypes.split(","):
            sides[f"lmforge {dtype}"] = ours(lmforge.load(ckpt, device="cpu", dtype=DTYPES[dtype]).model)
        for kind in filter(None, args.types.split(",")):
            path = export_gguf(ckpt, Path(tmp) / f"m-{kind}.gguf", type=kind)
            sides[f"llama.cpp {kind}"] = llama_cpp(path, c.max_position_embeddings, args.threads)
        if args.onnx:
            sides["onnxruntime fp32"] = onnxruntime(export_onnx(ckpt, Path(tmp) / "onnx"), args.threads)
        truth = ours(reference.model)[0](ids)
        quality = {}
        for name, (logits, _) in sides.items():
            got = logits(ids)
            quality[name] = (np.abs(got - truth).max(), perplexity(got, ids))
        times: dict[str, list[float]] = {name: [] for name in sides}
        tokens: dict[str, list[int]] = {}
        for r in range(args.rounds):
            for name, (_, decode) in list(sides.items())[:: 1 if r % 2 == 0 else -1]:
                tokens[name], steps = decode(prompt, args.tokens)
                times[name] += steps
    speed = {name: 1 / statistics.median(t) for name, t in times.items()}
    greedy = ours(reference.model)[1](prompt, args.tokens)[0]
    params = sum(p.numel() for p in reference.model.parameters())
    print(f"{ckpt}: {c.family}-shaped, {params / 1e6:.1f}M parameters, hidden {c.hidden_size}, {c.num_hidden_layers} "
          f"layers; torch {torch.__version__}, {args.threads} threads; parity and perplexity over {len(ids)} tokens; "
          f"greedy batch-1 decode of {args.tokens} tokens after {len(prompt)}, {args.rounds} rounds")
    base = [n for n in speed if n.startswith("lmforge")]
    print(f"{'side':<17} {'max|Δlogit|':>11} {'perplexity':>10} {'same tokens':>11} {'tok/s':>8}  "
          + "  ".join(f"{'÷ ' + n:>14}" for n in base))
    for name, s in speed.items():
        diff, ppl = quality[name]
        print(f"{name:<17} {diff:>11.1e} {ppl:>10.3f} {tokens[name] == greedy!s:>11} {s:>8.1f}  "
              + "  ".join(f"{s / speed[n]:>13.2f}x" for n in base))


if __name__ == "__main__":
    main()
