"""Training throughput of lmforge's GPT against a plain-PyTorch nanoGPT, on the shakespeare-char shape.

What it measures
    Tokens per second, and MFU, of three ways of training the same shape (6 layers, 6 heads, width 384,
    block 256, batch 12, vocab 65, no dropout, AdamW, grad clip 1.0), in fp32 and in bf16 autocast:

    - reference: nanoGPT's model.py written compactly below (fused c_attn, SDPA with is_causal=True,
      LayerNorm with bias, exact GELU MLP 4x, learned positions, tied embeddings) and nanoGPT's train.py
      step (autocast forward + loss, backward, clip_grad_norm_, AdamW step, zero_grad). nanoGPT only
      asks for fused AdamW on CUDA, so on CPU this is torch's default AdamW, as nanoGPT would run.
    - ours (train()): `GPT(preset("nanogpt-shakespeare"))` through the real `lmforge.train.loop.train`,
      which builds its optimizer with `build_optimizer`, runs `autocast` and `lm_loss`, and does its
      own bookkeeping (lr schedule, stop checks, loss accumulation) every step.
    - ours (bare loop): the same model, `build_optimizer`, `autocast` and `lm_loss` in a loop identical
      to the reference's, so (train() vs bare) is the loop's overhead and (bare vs reference) the model's.

How
    Every side reads the same in-memory batches of random tokens (fixed seed) through one loader class,
    which stamps `time.perf_counter()` on each `next_batch` call. Time between consecutive fetches is
    exactly one optimizer step (forward, backward, clip, AdamW, zero_grad, loop bookkeeping), so a block
    of warmup + steps + 1 fetches times `steps` steps after `warmup` untimed ones; the last step and
    everything outside the fetch window (train()'s optimizer construction, peak measurement, and the
    checkpoint it writes on exit) is untimed. Each side first runs one untimed block (thread pool,
    oneDNN kernel selection). The sides then alternate in blocks, several rounds, rotating
    their order each round, so machine noise lands on all of them alike. The headline tok/s of a side is
    tokens per step over its median timed step, pooled over rounds, so a burst from another process
    does not decide the ratio; the table also gives the plain mean (timed tokens / timed seconds) and
    the range of per-round ratios, and --json keeps every step's time.

    MFU = tok/s · FLOPs/token / peak, where FLOPs/token = 6N + 12·L·H·Q·T (PaLM appendix B) with N every
    parameter but the position table (the tied embedding counted once, as the head's matmul), computed
    by the same function for both models, and the peak is the matmul FLOP/s that
    `lmforge.precision.measure_peak_flops` measures on this machine, thread count and precision
    (re-measured every round, best kept).

Run
    .venv/bin/python benchmarks/train_throughput.py                      # both precisions, ~3-5 min on 2 cores
    .venv/bin/python benchmarks/train_throughput.py --precision bf16-mixed --steps 10 --rounds 5
    .venv/bin/python benchmarks/train_throughput.py --threads 2 --json runs/throughput.json

    Ends with one line per precision: `fp32: ours 3520 tok/s, reference 3410 tok/s, ratio 1.03x`
    ("ours" is the real train() path). The target is a ratio of at least 1.0x in both precisions.

Lockstep (the headline)
    Blocks still let a burst from another process land on one side. The final lines come from a run in
    which train()'s loader performs one reference step inside each fetch, so the two sides alternate
    step by step (LockstepBatches); each side's tok/s is from its median step.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import platform
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.config import preset
from lmforge.model.gpt import GPT
from lmforge.precision import autocast, cpu_has_fast_bf16, measure_peak_flops
from lmforge.train.loop import TrainConfig, train
from lmforge.train.losses import lm_loss
from lmforge.train.optim import build_optimizer, set_lr

PRESET = "nanogpt-shakespeare"
BATCH_SIZE = 12
LR, BETAS, WEIGHT_DECAY, GRAD_CLIP = 1e-3, (0.9, 0.99), 0.1, 1.0  # nanoGPT's config/train_shakespeare_char.py
PRECISIONS = {"32": "fp32", "bf16-mixed": "bf16"}
SIDES = ("reference", "ours (bare loop)", "ours (train())")
DEVICE = torch.device("cpu")


# --- nanoGPT's model.py, compactly (Karpathy, github.com/karpathy/nanoGPT) ---------------------------------


class RefAttention(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.c_attn, self.c_proj, self.n_head = nn.Linear(d, 3 * d), nn.Linear(d, d), n_head

    def forward(self, x: Tensor) -> Tensor:
        B, T, C = x.shape
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2)
                   for t in self.c_attn(x).split(C, dim=2))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=True)
        return self.c_proj(y.transpose(1, 2).contiguous().view(B, T, C))


class RefBlock(nn.Module):
    def __init__(self, d: int, n_head: int) -> None:
        super().__init__()
        self.ln_1, self.attn, self.ln_2 = nn.LayerNorm(d, bias=True), RefAttention(d, n_head), nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d))

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln_1(x))
        return x + self.mlp(self.ln_2(x))


class RefGPT(nn.Module):
    def __init__(self, vocab: int, block: int, n_layer: int, n_head: int, d: int) -> None:
        super().__init__()
        self.wte, self.wpe = nn.Embedding(vocab, d), nn.Embedding(block, d)
        self.h = nn.ModuleList(RefBlock(d, n_head) for _ in range(n_layer))
        self.ln_f, self.lm_head = nn.LayerNorm(d), nn.Linear(d, vocab, bias=False)
        self.wte.weight = self.lm_head.weight
        for name, p in self.named_parameters():
            if p.dim() >= 2:  # nanoGPT's _init_weights, residual projections scaled by 1/√(2·layers)
                std = 0.02 / math.sqrt(2 * n_layer) if name.endswith(("c_proj.weight", "mlp.2.weight")) else 0.02
                nn.init.normal_(p, mean=0.0, std=std)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: Tensor, targets: Tensor) -> Tensor:
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.h:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [{"params": [p for p in params if p.dim() >= 2], "weight_decay": WEIGHT_DECAY},
                  {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=LR, betas=BETAS)  # nanoGPT: fused only when on CUDA


# --- the harness --------------------------------------------------------------------------------------------


class TimedBatches:
    """The loader every side reads: the same pre-drawn batches in the same order, each fetch timestamped."""

    def __init__(self, batches: list[tuple[Tensor, Tensor]], block_size: int) -> None:
        self.batches, self.block_size = batches, block_size
        self.index = 0
        self.fetch_times: list[float] = []

    def next_batch(self) -> tuple[Tensor, Tensor]:
        self.fetch_times.append(time.perf_counter())
        x, y = self.batches[self.index % len(self.batches)]
        self.index += 1
        return x, y

    def state_dict(self) -> dict[str, Any]:
        return {"index": self.index}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.index = int(state["index"])

    def step_seconds(self, warmup: int, steps: int) -> list[float]:
        """Durations of steps warmup+1 .. warmup+steps, each from the fetch that starts it to the next fetch."""
        if len(self.fetch_times) < warmup + steps + 1:
            raise RuntimeError(f"only {len(self.fetch_times)} fetches for {warmup} warmup + {steps} timed steps "
                               "+ 1; did the training stop early?")
        window = self.fetch_times[warmup:warmup + steps + 1]
        return [b - a for a, b in itertools.pairwise(window)]


class LockstepBatches(TimedBatches):
    """train()'s loader that runs one reference step inside every fetch, so the two alternate step by step.

    Whatever else the machine does then hits both sides within the same second; ours' step is the time
    from one fetch's return to the next fetch's call, the reference's is the step run inside the fetch.
    """

    def __init__(self, batches: list[tuple[Tensor, Tensor]], block_size: int, reference_step: Callable[[], None],
                 ) -> None:
        super().__init__(batches, block_size)
        self.reference_step = reference_step
        self.ours: list[float] = []
        self.reference: list[float] = []
        self.returned_at: float | None = None

    def next_batch(self) -> tuple[Tensor, Tensor]:
        called_at = time.perf_counter()
        if self.returned_at is not None:
            self.ours.append(called_at - self.returned_at)
            self.reference_step()
            self.reference.append(time.perf_counter() - called_at)
        batch = super().next_batch()
        self.returned_at = time.perf_counter()
        return batch


def random_batches(n: int, vocab: int, block: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        tokens = torch.randint(0, vocab, (BATCH_SIZE, block + 1), generator=g)
        batches.append((tokens[:, :-1].contiguous(), tokens[:, 1:].contiguous()))
    return batches


def flops_per_token(model: nn.Module, n_layer: int, n_head: int, head_dim: int, seq_len: int,
                    position_table: Tensor) -> float:
    """6N + 12·L·H·Q·T, N = unique parameters minus the position table (the tied embedding is the head)."""
    n = sum(p.numel() for p in model.parameters()) - position_table.numel()
    return 6 * n + 12 * n_layer * n_head * head_dim * seq_len


def mean_loss(loss_sum: Tensor, targets: Tensor) -> Tensor:
    """lm_loss returns a sum and its target count (train() divides once per step); a bare step divides here."""
    return loss_sum / targets


def plain_loop(model: nn.Module, optimizer: torch.optim.Optimizer, loader: TimedBatches, n_steps: int,
               loss_of: Callable[[Tensor, Tensor], Tensor], amp: Callable[[], contextlib.AbstractContextManager],
               ) -> None:
    """nanoGPT train.py's step, grad_accum 1: forward and loss under autocast, backward, clip, step."""
    model.train()
    for _ in range(n_steps):
        x, y = loader.next_batch()
        set_lr(optimizer, LR)
        with amp():
            loss = loss_of(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), GRAD_CLIP)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


def run_precision(precision: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    config = preset(PRESET)
    L, H, Q, T = config.num_hidden_layers, config.num_attention_heads, config.head_dim, config.max_position_embeddings
    torch.manual_seed(args.seed)
    ours = GPT(config)
    torch.manual_seed(args.seed)
    ref = RefGPT(config.vocab_size, T, L, H, config.hidden_size)
    torch.manual_seed(args.seed)
    ours_train = GPT(config)  # train() keeps its own model, so its steps never change what the bare loop sees

    fpt = {"reference": flops_per_token(ref, L, H, Q, T, ref.wpe.weight),
           "ours": flops_per_token(ours, L, H, Q, T, ours.pos_embed.weight)}
    if fpt["ours"] != fpt["reference"]:
        raise RuntimeError(f"the two models differ in shape: FLOPs/token {fpt} (compare their parameters)")
    if not math.isclose(fpt["ours"], ours.flops_per_token(T)):
        print(f"note: GPT.flops_per_token gives {ours.flops_per_token(T):.4g}, this benchmark {fpt['ours']:.4g}")

    batches = random_batches(args.data_batches, config.vocab_size, T, args.seed)
    ref_opt = ref.configure_optimizers()
    ours_opt = build_optimizer(ours, "adamw", LR, weight_decay=WEIGHT_DECAY, betas=BETAS)
    ref_amp = ((lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed"
               else contextlib.nullcontext)
    block_steps = args.warmup + args.steps + 1

    def run_reference(loader: TimedBatches, r: int) -> None:
        plain_loop(ref, ref_opt, loader, block_steps, ref, ref_amp)

    def run_bare(loader: TimedBatches, r: int) -> None:
        plain_loop(ours, ours_opt, loader, block_steps, lambda x, y: mean_loss(*lm_loss(ours, x, y)),
                   lambda: autocast(precision, DEVICE))

    def run_train(loader: TimedBatches, r: int) -> None:
        out = workdir / f"{precision}-round{r + 1}"
        out.mkdir()
        cfg = TrainConfig(max_steps=block_steps, batch_size=BATCH_SIZE, lr=LR, warmup_steps=0,
                          weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1], grad_clip=GRAD_CLIP,
                          precision=precision, save_every=10**9, log_every=10**9, eval_every=10**9, seed=args.seed)
        result = train(ours_train, loader, out, cfg, val_loader=None, progress=False)
        if result.step != block_steps:
            raise RuntimeError(f"train() stopped at step {result.step} of {block_steps} ({result.stopped_by})")
        shutil.rmtree(out)

    def lockstep() -> tuple[list[float], list[float]]:
        """(ours, reference) step seconds, alternating one to one, past the warmup steps."""
        ref_loader = TimedBatches(batches, T)
        loader = LockstepBatches(batches, T, lambda: plain_loop(ref, ref_opt, ref_loader, 1, ref, ref_amp))
        cfg = TrainConfig(max_steps=args.lockstep_steps + args.warmup + 1, batch_size=BATCH_SIZE, lr=LR,
                          warmup_steps=0, weight_decay=WEIGHT_DECAY, beta1=BETAS[0], beta2=BETAS[1],
                          grad_clip=GRAD_CLIP, precision=precision, save_every=10**9, log_every=10**9,
                          eval_every=10**9, seed=args.seed)
        out = workdir / f"{precision}-lockstep"
        out.mkdir()
        train(ours_train, loader, out, cfg, val_loader=None, progress=False)
        shutil.rmtree(out)
        return loader.ours[args.warmup:], loader.reference[args.warmup:]

    runners = {"reference": run_reference, "ours (bare loop)": run_bare, "ours (train())": run_train}
    steps: dict[str, list[list[float]]] = {side: [] for side in SIDES}  # per round, per step, seconds
    tokens_per_step = BATCH_SIZE * T
    for side in SIDES:  # once, untimed: thread pool, oneDNN kernel selection, first allocations
        runners[side](TimedBatches(batches, T), -1)
    peak = 0.0
    for r in range(args.rounds):
        # measure_peak_flops caches its first answer; re-measuring each round and keeping the best makes
        # the MFU denominator immune to another process running during one of the measurements.
        peak = max(peak, measure_peak_flops.__wrapped__(precision, DEVICE))
        order = SIDES[r % len(SIDES):] + SIDES[:r % len(SIDES)]
        for side in order:
            loader = TimedBatches(batches, T)
            runners[side](loader, r)
            steps[side].append(loader.step_seconds(args.warmup, args.steps))
        line = "  ".join(f"{side} {tokens_per_step / statistics.median(steps[side][-1]):6.0f}" for side in SIDES)
        print(f"  {PRECISIONS[precision]} round {r + 1}/{args.rounds}, tok/s of the median step: {line}", flush=True)

    result: dict[str, Any] = {"peak_flops": peak, "flops_per_token": fpt["ours"], "tokens_per_step": tokens_per_step,
                              "sides": {}}
    for side in SIDES:
        every_step = [t for block in steps[side] for t in block]
        tok_s = tokens_per_step / statistics.median(every_step)
        result["sides"][side] = {
            "tokens_per_s": tok_s, "tokens_per_s_mean": tokens_per_step * len(every_step) / sum(every_step),
            "mfu": tok_s * fpt["ours"] / peak,
            "tokens_per_s_per_round": [tokens_per_step / statistics.median(block) for block in steps[side]],
            "step_seconds": steps[side]}
    ours_steps, ref_steps = lockstep()
    result["lockstep"] = {"ours_tokens_per_s": tokens_per_step / statistics.median(ours_steps),
                          "reference_tokens_per_s": tokens_per_step / statistics.median(ref_steps),
                          "ratio": statistics.median(ref_steps) / statistics.median(ours_steps),
                          "ours_step_seconds": ours_steps, "reference_step_seconds": ref_steps}
    ref = result["sides"]["reference"]
    for side in SIDES[1:]:
        s = result["sides"][side]
        s["ratio"] = s["tokens_per_s"] / ref["tokens_per_s"]
        s["ratio_mean"] = s["tokens_per_s_mean"] / ref["tokens_per_s_mean"]
        s["ratio_per_round"] = [a / b for a, b in zip(s["tokens_per_s_per_round"], ref["tokens_per_s_per_round"])]
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--precision", choices=["both", "32", "bf16-mixed"], default="both")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per block (default 4)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps before each block (default 1)")
    parser.add_argument("--rounds", type=int, default=5, help="blocks per side, alternating (default 5)")
    parser.add_argument("--lockstep-steps", type=int, default=20,
                        help="steps of each side in the step-by-step alternation (default 20)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-batches", type=int, default=16, help="distinct random batches cycled through")
    parser.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    args = parser.parse_args()
    for name in ("steps", "rounds", "data_batches", "lockstep_steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.warmup < 0:
        parser.error("--warmup must be at least 0")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be at least 1")
        torch.set_num_threads(args.threads)

    precisions = ["32", "bf16-mixed"] if args.precision == "both" else [args.precision]
    print(f"{PRESET}, batch {BATCH_SIZE}; torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"fast bf16: {cpu_has_fast_bf16()}; {args.rounds} rounds × ({args.warmup} warmup + {args.steps} timed "
          "+ 1) steps per side", flush=True)
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="lmforge-bench-") as tmp:
        for precision in precisions:
            results[precision] = run_precision(precision, args, Path(tmp))

    print()
    print(f"{'precision':<10}{'side':<18}{'tok/s':>8}{'MFU':>7}{'vs ref':>8}{'rounds vs ref':>15}"
          f"{'mean tok/s':>12}{'vs ref':>8}")
    for precision, res in results.items():
        for side in SIDES:
            s = res["sides"][side]
            ratio = f"{s['ratio']:.2f}x" if "ratio" in s else ""
            spread = (f"{min(s['ratio_per_round']):.2f}-{max(s['ratio_per_round']):.2f}x"
                      if "ratio" in s else "")
            mean_ratio = f"{s['ratio_mean']:.2f}x" if "ratio" in s else ""
            print(f"{PRECISIONS[precision]:<10}{side:<18}{s['tokens_per_s']:>8.0f}{100 * s['mfu']:>6.1f}%"
                  f"{ratio:>8}{spread:>15}{s['tokens_per_s_mean']:>12.0f}{mean_ratio:>8}")
        print(f"{'':<10}peak {res['peak_flops'] / 1e9:.0f} GFLOP/s (measured {PRECISIONS[precision]} matmul), "
              f"{res['flops_per_token'] / 1e6:.1f} MFLOP/token, {res['tokens_per_step']} tokens/step")
    print("tok/s and MFU from the median step time (robust to other processes); mean tok/s = tokens / total time")
    print()
    print("lockstep: ours (train()) and the reference alternating one step each; the headline ratio")
    for precision, res in results.items():
        lock = res["lockstep"]
        print(f"{PRECISIONS[precision]}: ours {lock['ours_tokens_per_s']:.0f} tok/s, reference "
              f"{lock['reference_tokens_per_s']:.0f} tok/s, ratio {lock['ratio']:.2f}x "
              f"(MFU {100 * lock['ours_tokens_per_s'] * res['flops_per_token'] / res['peak_flops']:.1f}% vs "
              f"{100 * lock['reference_tokens_per_s'] * res['flops_per_token'] / res['peak_flops']:.1f}%)")

    if args.json is not None:
        report = {"preset": PRESET, "batch_size": BATCH_SIZE, "torch": torch.__version__,
                  "threads": torch.get_num_threads(), "machine": platform.processor() or platform.machine(),
                  "steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "seed": args.seed,
                  "results": {PRECISIONS[p]: r for p, r in results.items()}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
