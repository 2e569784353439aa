"""`lmforge compress prune`: remove weights (unstructured, N:M) or whole heads and FFN channels (structured).

Unstructured pruning zeroes individual weights of the blocks' Linear layers (not the embedding or the head):
  - magnitude: the smallest |W| of each layer (Han et al. 2015), exactly round(sparsity · numel) of them;
  - wanda: the smallest |W_ij|·‖X_j‖₂ of each output row, X_j being input feature j over calibration tokens
    (Sun et al. 2023, "A Simple and Effective Pruning Approach for LLMs"): a small weight on a loud input
    matters more than a large one on a quiet input;
  - N:M (`--nm 2:4`, either score): in every run of M consecutive inputs of a row keep the N best (the
    pattern sparse tensor cores accelerate; Mishra et al. 2021).
Zeros make the file no smaller and decoding no faster on a CPU without sparse kernels: judge them by perplexity.

Structured pruning removes whole attention heads (with grouped K/V: a K/V head and the query heads that share
it) or FFN channels, the same number in every layer, because Hugging Face configs hold one head count and one
intermediate size for all layers. The tensors shrink, so the config, the parameter count, the file and the
decode time shrink with them. Importance is the energy a unit adds to the residual stream over calibration
tokens (Σ‖head output·W_oᵀ‖², Σ a_j²·‖W_down[:, j]‖²), or without calibration data the norms of its weights.

`--recover-steps` then fine-tunes the pruned model on the calibration data through the one training shell,
with each pruned weight's gradient masked so that AdamW keeps it at exactly zero.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lmforge.checkpoint import Loaded, check_out_dir, load_decoder, save_checkpoint
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError
from lmforge.methods.pretrain import _val_loader
from lmforge.model.gpt import GPT
from lmforge.model.quant import layout_of
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import lm_loss
from lmforge.train.shell import Context, Method, training_verb

PruneMethod = Literal["magnitude", "wanda", "heads", "ffn"]
UNSTRUCTURED = ("magnitude", "wanda")


# ----------------------------------------------------------------------------------------------- scores

class Calibration:
    """What pruning needs to know of the activations, from one pass over calibration windows.

    `inputs[name]`: Σ over tokens of x_j² for each input feature j of every block Linear (Wanda's ‖X_j‖₂²);
    `heads[layer]`: Σ over tokens of ‖(head h's attention output)·W_o[:, h]ᵀ‖² for each query head h.
    """

    def __init__(self, net: GPT, windows: Tensor, batch_size: int = 8) -> None:
        self.inputs: dict[str, Tensor] = {}
        self.heads: dict[int, Tensor] = {}
        self.tokens = windows.numel()
        hooks = []
        for name, module in net.blocks.named_modules():
            if isinstance(module, nn.Linear):
                hooks.append(module.register_forward_pre_hook(self._input_hook(f"blocks.{name}")))
        for i, block in enumerate(net.blocks):
            hooks.append(block.attn.proj.register_forward_pre_hook(self._head_hook(i, block.attn)))
        try:
            with torch.no_grad():
                for start in range(0, len(windows), batch_size):
                    net(windows[start:start + batch_size])
        finally:
            for hook in hooks:
                hook.remove()

    def _input_hook(self, name: str):
        def hook(module: nn.Module, args: tuple[Tensor, ...]) -> None:
            x = args[0].detach().float().flatten(0, -2)
            self.inputs[name] = self.inputs.get(name, 0) + (x * x).sum(0)
        return hook

    def _head_hook(self, layer: int, attn: nn.Module):
        def hook(module: nn.Linear, args: tuple[Tensor, ...]) -> None:
            y = args[0].detach().float().flatten(0, -2).view(-1, attn.n_head, attn.head_dim)  # [tokens, H, d]
            w = module.weight.detach().float().view(-1, attn.n_head, attn.head_dim)  # [hidden, H, d]
            contribution = torch.einsum("thd,ohd->tho", y, w)  # each head's share of the residual update
            self.heads[layer] = self.heads.get(layer, 0) + (contribution ** 2).sum(dim=(0, 2))
        return hook


def calibration_windows(data: Path, net: GPT, tokens: int, block_size: int | None, seed: int = 0) -> Tensor:
    """About `tokens` tokens of a packed dataset's train split as [windows, block] ids, drawn at random."""
    dataset = PackedDataset(Path(data), "train")
    if dataset.vocab_size > net.config.vocab_size:
        raise ConfigError(f"--calibration {data}: its tokenizer has {dataset.vocab_size} tokens, the model "
                          f"{net.config.vocab_size}; pack the calibration text with the model's tokenizer")
    block = min(block_size or net.config.max_position_embeddings, net.config.max_position_embeddings)
    available = (dataset.num_tokens - 1) // block
    if available < 1:
        raise ConfigError(f"--calibration {data}: {dataset.num_tokens} tokens is shorter than one {block}-token "
                          "window; lower --block-size or give more text")
    count = max(1, min(available, tokens // block))
    starts = torch.randperm(available, generator=torch.Generator().manual_seed(seed))[:count].sort().values
    return torch.stack([torch.from_numpy(dataset.window(int(s) * block, block).astype("int64")) for s in starts])


def _keep_mask(score: Tensor, sparsity: float, nm: tuple[int, int] | None, per_row: bool) -> Tensor:
    """True where a weight stays: the lowest scores go, exactly round(sparsity · n) of them per row (or per
    matrix), or all but the N best of every M consecutive inputs."""
    rows, cols = score.shape
    if nm is not None:
        n, m = nm
        groups = score.reshape(rows, cols // m, m)
        keep = torch.zeros_like(groups, dtype=torch.bool)
        keep.scatter_(-1, groups.topk(n, dim=-1).indices, True)
        return keep.reshape(rows, cols)
    flat = score if per_row else score.reshape(1, -1)
    k = round(sparsity * flat.shape[1])
    keep = torch.ones_like(flat, dtype=torch.bool)
    keep.scatter_(1, flat.argsort(dim=1, stable=True)[:, :k], False)
    return keep.reshape(rows, cols)


def prune_unstructured(net: GPT, method: str, sparsity: float, nm: tuple[int, int] | None = None,
                       calibration: Calibration | None = None) -> dict[str, float]:
    """Zero weights of every block Linear in place; returns each layer's achieved sparsity."""
    achieved = {}
    for name, module in net.blocks.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        full = f"blocks.{name}"
        w = module.weight.data
        if nm is not None and w.shape[1] % nm[1]:
            raise ConfigError(f"--nm {nm[0]}:{nm[1]}: layer {full} has {w.shape[1]} inputs, not a multiple of {nm[1]}")
        score = w.abs().float()
        if method == "wanda":
            score = score * calibration.inputs[full].sqrt()[None, :]
        keep = _keep_mask(score, sparsity, nm, per_row=method == "wanda")
        w.mul_(keep)
        achieved[full] = 1 - keep.float().mean().item()
    return achieved


def _head_groups_scores(net: GPT, layer: int, calibration: Calibration | None) -> Tensor:
    """Importance of each K/V group (a K/V head and the query heads reading it) of one layer."""
    attn = net.blocks[layer].attn
    H, K, d = attn.n_head, attn.n_kv_head, attn.head_dim
    if calibration is not None:
        per_head = calibration.heads[layer]
    else:  # the OV circuit's weight norms: what a head can write, ‖W_o[:, h]‖·‖W_v[group(h)]‖
        w_o = attn.proj.weight.detach().float().view(-1, H, d).norm(dim=(0, 2))
        w_v = attn.qkv.weight.detach().float()[(H + K) * d:].view(K, d, -1).norm(dim=(1, 2))
        per_head = w_o * w_v.repeat_interleave(H // K)
    return per_head.view(K, H // K).sum(dim=1)


def _ffn_scores(net: GPT, layer: int, calibration: Calibration | None) -> Tensor:
    mlp = net.blocks[layer].mlp
    down = mlp.down.weight.detach().float().norm(dim=0)  # ‖W_down[:, j]‖
    if calibration is not None:
        return calibration.inputs[f"blocks.{layer}.mlp.down"] * down ** 2
    up = mlp.up.weight.detach().float().norm(dim=1)
    inner = mlp.down.in_features
    return down * (up[:inner] * up[inner:] if mlp.swiglu else up)


def _kept(scores: Tensor, remove: int) -> Tensor:
    """Indices of the units that stay, in their original order."""
    return scores.argsort(descending=True, stable=True)[:scores.numel() - remove].sort().values


def prune_structured(net: GPT, method: str, sparsity: float, calibration: Calibration | None = None
                     ) -> tuple[GPT, dict[int, list[int]]]:
    """A smaller GPT without the least important K/V groups (heads) or FFN channels (ffn) of every layer.

    Returns the new model and, per layer, the units removed (K/V group or channel indices)."""
    c = net.config
    units = c.num_key_value_heads if method == "heads" else c.intermediate_size
    remove = round(sparsity * units)
    if remove >= units:
        raise ConfigError(f"--sparsity {sparsity}: would remove all {units} "
                          f"{'K/V head groups' if method == 'heads' else 'FFN channels'} of each layer")
    state = {k: v.detach().clone() for k, v in net.state_dict().items()}
    removed: dict[int, list[int]] = {}
    H, K, d = c.num_attention_heads, c.num_key_value_heads, c.head_dim
    for i in range(c.num_hidden_layers):
        p = f"blocks.{i}."
        if method == "heads":
            scores = _head_groups_scores(net, i, calibration)
            groups = _kept(scores, remove)
            heads = (groups[:, None] * (H // K) + torch.arange(H // K)).flatten()
            rows = torch.cat([_rows(heads, d), H * d + _rows(groups, d), (H + K) * d + _rows(groups, d)])
            _select(state, p + "attn.qkv", rows=rows)
            _select(state, p + "attn.proj", cols=_rows(heads, d))
        else:
            scores = _ffn_scores(net, i, calibration)
            keep = _kept(scores, remove)
            up_rows = torch.cat([keep, c.intermediate_size + keep]) if net.blocks[i].mlp.swiglu else keep
            _select(state, p + "mlp.up", rows=up_rows)
            _select(state, p + "mlp.down", cols=keep)
        removed[i] = sorted(set(range(units)) - set(_kept(scores, remove).tolist()))
    if method == "heads":
        config = c.replace(num_attention_heads=H - remove * (H // K), num_key_value_heads=K - remove, head_dim=d)
    else:
        config = c.replace(intermediate_size=c.intermediate_size - remove)
    smaller = GPT(config)
    smaller.load_state_dict(state)
    return smaller.to(next(net.parameters()).dtype).eval(), removed


def _rows(units: Tensor, size: int) -> Tensor:
    return (units[:, None] * size + torch.arange(size)).flatten()


def _select(state: dict[str, Tensor], layer: str, rows: Tensor | None = None, cols: Tensor | None = None) -> None:
    """Keep only these output rows (weight and bias) or input columns (weight) of one Linear."""
    if rows is not None:
        state[layer + ".weight"] = state[layer + ".weight"][rows]
        if layer + ".bias" in state:
            state[layer + ".bias"] = state[layer + ".bias"][rows]
    if cols is not None:
        state[layer + ".weight"] = state[layer + ".weight"][:, cols]


def parse_nm(nm: str | None) -> tuple[int, int] | None:
    if nm is None:
        return None
    try:
        n, m = (int(v) for v in nm.split(":"))
    except ValueError:
        raise ConfigError(f"--nm {nm!r}: expected N:M, e.g. 2:4") from None
    if not 0 < n < m:
        raise ConfigError(f"--nm {nm}: need 0 < N < M")
    return n, m


def prune_model(net: GPT, method: PruneMethod, sparsity: float, *, nm: tuple[int, int] | None = None,
                calibration: Calibration | None = None) -> tuple[GPT, str]:
    """Prune a model by `method` (see the module docstring); returns the pruned model and a one-line summary."""
    if method in UNSTRUCTURED:
        prune_unstructured(net, method, sparsity, nm, calibration)
        weights = [m.weight for m in net.blocks.modules() if isinstance(m, nn.Linear)]
        total, zeros = sum(w.numel() for w in weights), sum(int((w == 0).sum()) for w in weights)
        pattern = f"{nm[0]}:{nm[1]}" if nm else f"{sparsity:.0%} per {'row' if method == 'wanda' else 'layer'}"
        return net, (f"{method} ({pattern}): {zeros:,} of {total:,} block weights are zero "
                     f"({zeros / total:.2%}); embeddings and head untouched")
    smaller, removed = prune_structured(net, method, sparsity, calibration)
    before, after = net.num_params(), smaller.num_params()
    what = (f"{len(removed[0])} of {net.config.num_key_value_heads} K/V head groups" if method == "heads"
            else f"{len(removed[0])} of {net.config.intermediate_size} FFN channels")
    return smaller, (f"{method}: removed {what} in each of {len(removed)} layers; "
                     f"{before / 1e6:.3f}M -> {after / 1e6:.3f}M parameters")


# ------------------------------------------------------------------------------------------- the verb

def _checked(model: Path, method: str, sparsity: float | None, nm: str | None, calibration: Path | None
             ) -> tuple[Loaded, float, tuple[int, int] | None]:
    loaded = load_decoder(Path(model), dtype=torch.float32)
    if loaded.kind != "decoder" or not isinstance(loaded.model, GPT) or layout_of(loaded.model):
        raise ConfigError(f"{model}: pruning applies to full-precision Transformer decoders (a LoRA run: merge it "
                          "first; a quantized checkpoint: prune the checkpoint it came from, then quantize)")
    pattern = parse_nm(nm)
    if pattern is not None and method not in UNSTRUCTURED:
        raise ConfigError(f"--nm applies to --method magnitude or wanda, not {method}")
    if pattern is not None:
        sparsity = 1 - pattern[0] / pattern[1]
    if sparsity is None or not 0 <= sparsity < 1:
        raise ConfigError(f"--sparsity {sparsity}: give the fraction to remove, in [0, 1) (or --nm N:M)")
    if method == "wanda" and calibration is None:
        raise ConfigError("--method wanda weighs each weight by its input's norm: it needs --calibration "
                          "(a directory written by `lmforge data pack` with the model's tokenizer)")
    if method == "heads" and loaded.model.config.position == "learned":
        raise ConfigError(f"{model}: --method heads on a GPT-2-shaped model: Hugging Face's GPT-2 derives "
                          "head_dim = n_embd / n_head, so fewer heads of the same size could not be exported; "
                          "prune FFN channels (--method ffn) or prune a Llama-shaped model")
    return loaded, sparsity, pattern


def _pruned(model: Path, method: PruneMethod, sparsity: float | None, nm: str | None, calibration: Path | None,
            calibration_tokens: int, block_size: int | None, seed: int) -> tuple[Loaded, GPT, str]:
    loaded, sparsity, pattern = _checked(model, method, sparsity, nm, calibration)
    calib = None
    if calibration is not None and method != "magnitude":
        windows = calibration_windows(calibration, loaded.model, calibration_tokens, block_size, seed)
        calib = Calibration(loaded.model, windows)
    net, summary = prune_model(loaded.model, method, sparsity, nm=pattern, calibration=calib)
    return loaded, net, summary + ("" if calib is None else f"; calibrated on {calib.tokens:,} tokens")


def _hold_zeros(net: GPT) -> int:
    """Mask the gradient of every zero block weight, so a pruned weight stays exactly zero under AdamW (its
    moments stay zero, and decoupled decay of zero is zero); returns how many weights are held."""
    held = 0
    for module in net.blocks.modules():
        if isinstance(module, nn.Linear):
            keep = module.weight.detach() != 0
            if not keep.all():
                module.weight.register_hook(lambda grad, keep=keep: grad * keep)
                held += int((~keep).sum())
    return held


@training_verb("compress prune", default_epochs=None, out=Path("runs/pruned"), lr=1e-4, warmup_steps=10,
               weight_decay=0.0, eval_every=100)
def prune_and_recover(
    ctx: Context,
    model: Path | None = None,
    calibration: Path | None = None,
    *,
    method: PruneMethod = "magnitude",
    sparsity: float | None = None,
    nm: str | None = None,
    calibration_tokens: int = 32768,
    block_size: int | None = None,
) -> Method:
    """Prune a decoder, then fine-tune it on the calibration data to recover (`prune --recover-steps N` calls this).

    Args:
        model: Full-precision checkpoint directory.
        calibration: Packed dataset (`lmforge data pack`, the model's tokenizer): calibration and training data.
        method: magnitude, wanda, heads or ffn (see `lmforge compress prune`).
        sparsity: Fraction of weights (magnitude, wanda) or of K/V head groups / FFN channels per layer to remove.
        nm: N:M semi-structured pattern, e.g. "2:4" (magnitude or wanda).
        calibration_tokens: Tokens of calibration data to measure activations on.
        block_size: Tokens per window (default: the model's context).

    Returns:
        The pruned, fine-tuned checkpoint directory.
    """
    if ctx.resume is not None:
        loaded = load_decoder(ctx.resume, dtype=torch.float32)
        net, summary = loaded.model, f"resuming recovery of {ctx.resume}"
    else:
        if model is None or calibration is None:
            raise ConfigError("--model and --calibration are required to recover a pruned model")
        loaded, net, summary = _pruned(model, method, sparsity, nm, calibration, calibration_tokens, block_size,
                                       ctx.cfg.seed)
    net.to(ctx.dist.device)
    held = _hold_zeros(net) if method in UNSTRUCTURED else 0
    block = min(block_size or net.config.max_position_embeddings, net.config.max_position_embeddings)
    cfg, dist = ctx.cfg, ctx.dist
    loader = WindowLoader(PackedDataset(Path(calibration), "train"), block, cfg.batch_size, rank=dist.rank,
                          world_size=dist.world_size, seed=cfg.seed)

    def save(out: Path, train_state: dict[str, Any] | None, step: int) -> None:
        save_checkpoint(out, net, net.config, tokenizer_dir=loaded.path, generation_config=loaded.generation_config,
                        train_state=train_state, step=step)

    val = _val_loader(Path(calibration), block, cfg.batch_size, dist.rank, dist.world_size)
    summary += f"; recovery fine-tuning on {calibration}" + (f" with {held:,} zeros held" if held else "")
    return Method(net, loader, lm_loss, save, val_loader=val, summary=summary)


def prune(
    model: Path | None = None,
    out: Path = Path("runs/pruned"),
    *,
    method: PruneMethod = "magnitude",
    sparsity: float | None = None,
    nm: str | None = None,
    calibration: Path | None = None,
    calibration_tokens: int = 32768,
    recover_steps: int = 0,
    lr: float = 1e-4,
    batch_size: int = 8,
    block_size: int | None = None,
    seed: int = 0,
    resume: Path | None = None,
    progress: bool = True,
) -> Path:
    """Prune a decoder: zero weights (magnitude, wanda, N:M) or remove heads / FFN channels (heads, ffn).

    Unstructured zeros keep every tensor's shape (no smaller file, no CPU speed-up: compare perplexity);
    heads and ffn remove the same number of units from every layer, so the config stays one a Hugging Face
    architecture can hold and `lmforge convert to-hf` exports it. Scores use --calibration activations when
    given (required for wanda), else weight norms.

    Args:
        model: Full-precision checkpoint directory (ours or a Hugging Face decoder).
        out: Directory to write; refused if it holds anything.
        method: "magnitude" (smallest |W| per layer), "wanda" (smallest |W|·‖X‖ per output row), "heads"
            (whole K/V head groups: a K/V head with its query heads) or "ffn" (FFN channels).
        sparsity: Fraction to remove: of each layer's weights (magnitude, wanda), or of each layer's K/V head
            groups / FFN channels (heads, ffn), rounded to whole units.
        nm: N:M pattern instead of a fraction, e.g. "2:4": N weights kept in every M consecutive inputs.
        calibration: Packed dataset (`lmforge data pack`, with the model's tokenizer) whose train split gives
            the activations and the recovery fine-tuning data.
        calibration_tokens: How many calibration tokens to run through the model for the scores.
        recover_steps: Fine-tune this many steps after pruning (0: none); zeros stay zero.
        lr: Recovery learning rate.
        batch_size: Recovery windows per step.
        block_size: Tokens per calibration / recovery window (default: the model's context).
        seed: Seed of the calibration windows and of recovery.
        resume: Continue an interrupted recovery in its own directory (with --recover-steps as the new limit).
        progress: Show recovery progress.

    Returns:
        The pruned checkpoint directory.
    """
    if recover_steps or resume is not None:
        if calibration is None and resume is None:
            raise ConfigError("--recover-steps fine-tunes on --calibration data; give --calibration")
        if resume is not None:
            return prune_and_recover(resume=resume, max_steps=recover_steps or None, progress=progress)
        return prune_and_recover(model, calibration, out, method=method, sparsity=sparsity, nm=nm,
                                 calibration_tokens=calibration_tokens, block_size=block_size, max_steps=recover_steps,
                                 lr=lr, batch_size=batch_size, seed=seed, progress=progress)
    if model is None:
        raise ConfigError("--model is required (a full-precision checkpoint directory)")
    out = Path(out)
    check_out_dir(out)
    loaded, net, summary = _pruned(model, method, sparsity, nm, calibration, calibration_tokens, block_size, seed)
    save_checkpoint(out, net, net.config, tokenizer_dir=loaded.path, generation_config=loaded.generation_config)
    print(f"{summary}; wrote {out}", file=sys.stderr)
    return out
