"""`lmforge plan`: memory per rank of a training run before it starts, by strategy, and the batch that fits.

Weights, gradients and optimizer state are counted from the model's parameters (fp32 master weights, AdamW's
two moments; FSDP divides all three by the world size and adds the blocks it gathers). Activations are not
a rule of thumb: the model and loss run once on fake tensors (`FakeTensorMode`: shapes and dtypes, no
memory, seconds even for a 1B model) under autograd's saved-tensor hooks, so the count is what this code
keeps for the backward pass — with bf16 autocast, the fused attention, LoRA's frozen base and activation
checkpointing as they really behave.

Peak per rank = weights + optimizer state + the larger of (activations + the loss gradient and the head's
gradient, allocated at the start of the backward pass) and (all gradients, at its end). Checked against the
peak resident memory of small CPU runs in tests/train/test_plan.py.
"""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal

import torch
from torch import nn

from lmforge.checkpoint import build_model, resolve_model_config
from lmforge.errors import ConfigError
from lmforge.model import lora as lora_lib
from lmforge.train.distributed import blocks, checkpoint_activations
from lmforge.train.losses import lm_loss

GiB = 2**30
OPTIMIZER_STATES = {"adamw": 2, "adam": 2, "rmsprop": 2, "sgd": 1}  # fp32 tensors per trainable parameter
MFU = 0.4  # assumed share of the peak FLOP/s a step achieves, for the time estimate


@dataclass
class Estimate:
    """Bytes per rank of one strategy."""

    strategy: str
    weights: int
    gradients: int
    optimizer: int
    activations: int
    peak: int
    max_batch_size: int | None = None
    seconds_per_step: float | None = None


def parse_memory(text: str | float | None) -> int | None:
    """"80GB", "80GiB", "512MB", or a number of GiB."""
    if text is None:
        return None
    if isinstance(text, int | float):
        return int(float(text) * GiB)
    match = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(i?B)?\s*", str(text), re.IGNORECASE)
    if not match:
        raise ConfigError(f"memory={text!r}: give a size such as 80GB, 24GiB or 512MB")
    scale = {"": GiB, "K": 2**10, "M": 2**20, "G": GiB, "T": 2**40}[match.group(2).upper()]
    return int(float(match.group(1)) * scale)


Builder = Callable[[], nn.Module]


def model_builder(model: str, method: str = "pretrain", lora_r: int = 8, lora_targets: str = "q,v") -> Builder:
    """Builds the model a method trains (LoRA: adapters on a frozen base), on whatever device is current:
    `meta` to count parameters, fake tensors to count activations — never real memory."""
    config = resolve_model_config(model)

    def build() -> nn.Module:
        net = build_model(config)
        if method == "lora":
            targets = [t.strip() for t in lora_targets.split(",") if t.strip()]
            lora_lib.apply_lora(net, lora_lib.LoRAConfig(r=lora_r, targets=targets))
        return net

    return build


def meta_model(build: Builder) -> nn.Module:
    with torch.device("meta"):
        return build()


def _saved_bytes(net: nn.Module, batch_size: int, block_size: int, precision: str) -> int:
    """Bytes of the distinct tensors autograd keeps for backward over one forward and loss (parameters not
    counted: they are weights)."""
    params = {p.untyped_storage()._cdata for p in net.parameters()}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage._cdata not in params:
            seen[storage._cdata] = storage.nbytes()
        return t

    vocab = net.config.vocab_size
    x = torch.randint(0, vocab, (batch_size, block_size))
    with (torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t),
          torch.autocast("cpu", torch.bfloat16, enabled=precision == "bf16-mixed")):
        lm_loss(net, x, x)
    return sum(seen.values())


def activation_bytes(build: Builder, batch_size: int, block_size: int, precision: str,
                     checkpointing: bool) -> int:
    """Activations kept for the backward pass; with checkpointing, what stays outside the blocks plus each
    block's input plus one block's recomputed activations."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        fake = build()
        full = _saved_bytes(fake, batch_size, block_size, precision)
        if not checkpointing:
            return full
        n = checkpoint_activations(fake)
        outside = _saved_bytes(fake, batch_size, block_size, precision)
    width = fake.config.hidden_size * (2 if precision == "bf16-mixed" else 4)
    return outside + n * batch_size * block_size * width + (full - outside) // max(n, 1)


def estimate(build: Builder, strategy: str, *, batch_size: int, block_size: int, precision: str, world_size: int,
             optimizer: str = "adamw", checkpointing: bool = False, activations: int | None = None) -> Estimate:
    """Peak bytes per rank of training the model `build` makes under `strategy` (see the module docstring)."""
    net = meta_model(build)
    unique = {id(p): p for p in net.parameters()}.values()
    total = sum(p.numel() for p in unique)
    trainable = sum(p.numel() for p in unique if p.requires_grad)
    shard = world_size if strategy == "fsdp" else 1
    weights = 4 * total // shard
    if strategy == "fsdp":  # the root (embeddings, head) stays gathered; a block and the next (prefetch) too
        per_block = max((sum(p.numel() for p in b.parameters()) for b in blocks(net)), default=0)
        in_blocks = sum(p.numel() for b in blocks(net) for p in b.parameters())
        gathered = 2 if precision == "bf16-mixed" else 4
        weights += gathered * (total - in_blocks + 2 * per_block)
    elif precision == "bf16-mixed":  # autocast keeps a bf16 copy of each matrix for the step
        weights += 2 * sum(p.numel() for p in unique if p.dim() == 2)
    gradients = 4 * trainable // shard
    if strategy == "ddp" and world_size > 1:
        gradients += 4 * trainable  # DDP's communication buckets hold a copy of the gradients
    states = 4 * OPTIMIZER_STATES[optimizer] * trainable // shard
    if activations is None:
        activations = activation_bytes(build, batch_size, block_size, precision, checkpointing)
    head = net.lm_head.weight if hasattr(net, "lm_head") else None
    head_grad = 4 * head.numel() // shard if head is not None and head.requires_grad else 0
    loss_grad = 4 * batch_size * block_size * net.config.vocab_size  # d loss / d logits, fp32
    peak = weights + states + max(activations + loss_grad + head_grad, gradients)
    return Estimate(strategy, weights, gradients, states, activations, peak)


def plan(
    model: str = "llama-tiny",
    *,
    method: Literal["pretrain", "full", "lora"] = "pretrain",
    batch_size: int = 8,
    block_size: int | None = None,
    precision: Literal["bf16-mixed", "32"] = "bf16-mixed",
    world_size: int = 1,
    strategy: Literal["ddp", "fsdp"] | None = None,
    optimizer: Literal["adamw", "adam", "rmsprop", "sgd"] = "adamw",
    activation_checkpointing: bool = False,
    lora_r: int = 8,
    lora_targets: str = "q,v",
    memory: str | None = None,
    tflops: float | None = None,
) -> dict[str, Any]:
    """Memory per rank of a training run, before starting it: weights, gradients, optimizer state and
    activations under DDP and FSDP, and the largest batch per process that fits `memory`.

    Args:
        model: A preset name (see `lmforge models`) or a checkpoint directory.
        method: pretrain and full fine-tuning train every weight; lora only adapters (the base frozen).
        batch_size: Examples per process per micro-batch.
        block_size: Tokens per example (default: the model's context).
        precision: "bf16-mixed" or "32".
        world_size: Processes (GPUs) training together.
        strategy: "ddp" or "fsdp"; default: both.
        optimizer: The optimizer (AdamW and Adam keep two fp32 tensors per trainable parameter, SGD one).
        activation_checkpointing: Recompute each block's activations in the backward pass.
        lora_r: LoRA rank (method lora).
        lora_targets: LoRA target layers (method lora).
        memory: Memory per device, e.g. 80GB: adds the largest batch per process that fits (90% of it).
        tflops: Peak TFLOP/s per device: adds a time per optimizer step, assuming 40% of it is reached.

    Returns:
        Parameters and, per strategy, bytes per rank of each part, the peak, and what was asked for.
    """
    if world_size < 1 or batch_size < 1:
        raise ConfigError(f"world_size={world_size} and batch_size={batch_size} must be at least 1")
    build = model_builder(model, method, lora_r, lora_targets)
    net = meta_model(build)
    block_size = block_size or net.config.max_position_embeddings
    if block_size > net.config.max_position_embeddings:
        raise ConfigError(f"block_size={block_size} exceeds {model}'s context ({net.config.max_position_embeddings})")
    budget = parse_memory(memory)
    rows = []
    for name in [strategy] if strategy else ["ddp", "fsdp"]:
        est = estimate(build, name, batch_size=batch_size, block_size=block_size, precision=precision,
                       world_size=world_size, optimizer=optimizer, checkpointing=activation_checkpointing)
        if budget is not None:
            est.max_batch_size = max_batch_size(build, name, block_size, precision, world_size, optimizer,
                                                activation_checkpointing, budget, est, batch_size)
        if tflops:
            flops = net.flops_per_token(block_size) * batch_size * block_size
            est.seconds_per_step = flops / (tflops * 1e12 * MFU)
        rows.append(est)
    total = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values())
    trainable = sum(p.numel() for p in {id(p): p for p in net.parameters()}.values() if p.requires_grad)
    result = {"model": str(model), "method": method, "parameters": total, "trainable": trainable,
              "batch_size": batch_size, "block_size": block_size, "precision": precision, "world_size": world_size,
              "memory": budget, "per_rank": [asdict(r) for r in rows]}
    print(table(result), file=sys.stderr)
    return result


def max_batch_size(build: Builder, strategy: str, block_size: int, precision: str, world_size: int, optimizer: str,
                   checkpointing: bool, budget: int, at: Estimate, batch_size: int) -> int:
    """Activations grow linearly with the batch (measured at `batch_size`), so the largest batch whose peak
    stays within 90% of `budget` (allocator slack and buffers take the rest) follows without a search."""
    vocab = meta_model(build).config.vocab_size
    one = estimate(build, strategy, batch_size=1, block_size=block_size, precision=precision, world_size=world_size,
                   optimizer=optimizer, checkpointing=checkpointing,
                   activations=at.activations // batch_size)
    fixed = one.peak - (one.activations + 4 * block_size * vocab)
    per_example = at.activations // batch_size + 4 * block_size * vocab
    return max(0, int((0.9 * budget - fixed) // per_example))


def table(result: dict[str, Any]) -> str:
    lines = [f"{result['model']} ({result['method']}): {result['parameters'] / 1e6:,.1f}M parameters, "
             f"{result['trainable'] / 1e6:,.2f}M trainable; batch {result['batch_size']} × {result['block_size']} "
             f"tokens per process, {result['precision']}, {result['world_size']} process(es)",
             f"{'per rank (GiB)':<16}{'weights':>9}{'grads':>9}{'optim':>9}{'activ.':>9}{'peak':>9}"
             + ("  max batch" if result["memory"] else "") + ("  s/step" if result["per_rank"][0]["seconds_per_step"]
                                                             else "")]
    for row in result["per_rank"]:
        line = f"{row['strategy']:<16}" + "".join(f"{row[k] / GiB:>9.2f}" for k in
                                                  ("weights", "gradients", "optimizer", "activations", "peak"))
        if result["memory"]:
            line += f"{row['max_batch_size']:>11}"
        if row["seconds_per_step"]:
            line += f"{row['seconds_per_step']:>8.2f}"
        lines.append(line)
    return "\n".join(lines)


def check_fits(build: Builder, strategy: str, *, batch_size: int, block_size: int, precision: str, world_size: int,
               optimizer: str, checkpointing: bool, budget: int) -> Estimate:
    """Refuse, before any step, a run whose planned peak per rank exceeds `budget`, saying what would fit."""
    est = estimate(build, strategy, batch_size=batch_size, block_size=block_size, precision=precision,
                   world_size=world_size, optimizer=optimizer, checkpointing=checkpointing)
    if est.peak > budget:
        fits = max_batch_size(build, strategy, block_size, precision, world_size, optimizer, checkpointing, budget,
                              est, batch_size)
        hint = (f"--batch-size {fits} (with --grad-accum to keep the global batch)" if fits else
                "--strategy fsdp on more processes, --activation-checkpointing, or a smaller --block-size")
        raise ConfigError(f"this run needs about {est.peak / GiB:.2f} GiB per process ({strategy}, batch "
                          f"{batch_size} × {block_size} tokens, {precision}) but --memory-limit is {budget / GiB:.2f} "
                          f"GiB; try {hint} (`lmforge plan` shows the parts)")
    return est


def check_run(model: nn.Module, *, strategy: str, batch_size: int, block_size: int | None, precision: str,
              world_size: int, optimizer: str, checkpointing: bool, memory_limit: str | None,
              device: torch.device) -> None:
    """Before training: refuse a run whose planned peak exceeds `memory_limit`; with no limit given, warn
    when it exceeds the GPU's memory. Plans decoders that train every weight (pretraining, full fine-tuning)."""
    budget = parse_memory(memory_limit)
    given = budget is not None
    if budget is None and device.type == "cuda":
        budget = torch.cuda.get_device_properties(device).total_memory
    trains_all = all(p.requires_grad for p in model.parameters())
    if budget is None or block_size is None or not hasattr(model, "lm_head") or not trains_all:
        return
    config = model.config
    try:
        check_fits(lambda: build_model(config), strategy, batch_size=batch_size, block_size=block_size,
                   precision=precision, world_size=world_size, optimizer=optimizer, checkpointing=checkpointing,
                   budget=budget)
    except ConfigError as e:
        if given:
            raise
        print(f"warning: {str(e).replace('--memory-limit is', 'the device has')}", file=sys.stderr)
