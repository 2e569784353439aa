"""Low-rank adapters (LoRA, Hu et al. 2021): W·x + (α/r)·B·A·dropout(x), with W frozen and only A, B trained.

A is r×in (Kaiming-uniform init), B is out×r (zeros), so training starts exactly at the base model;
α/r keeps the update's size independent of the rank. Merging adds (α/r)·B·A into W once, after which
the model is a plain checkpoint again with no extra inference cost.

Our attention has one fused `attn.qkv` Linear and the SwiGLU MLP one fused `mlp.up` ([gate | up]).
User targets name the separate projections of the papers and of HF checkpoints (q, k, v, o, gate, up,
down, or q_proj, ...): q, k and v each get their own A, B pair whose output is added to that target's
slice of the fused qkv output (rows [0, H·d), [H·d, (H+K)·d), [(H+K)·d, (H+2K)·d)); gate and up likewise
on the two halves of `mlp.up`. That is exactly LoRA on separate q_proj/k_proj/v_proj layers. Any other
target is matched as the last part of a Linear layer's name (e.g. `query` in an encoder).
"""

from __future__ import annotations

import itertools
import math
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.quant import Int8Linear

ALIASES = {"q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o", "gate_proj": "gate", "up_proj": "up",
           "down_proj": "down"}
LINEAR_TYPES = (nn.Linear, Int8Linear)


@dataclass
class LoRAConfig:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list[str] = field(default_factory=lambda: ["q", "v"])

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora_r={self.r} must be at least 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora_dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise ConfigError("lora_targets is empty; name at least one layer (q, k, v, o, gate, up, down)")

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class LoRALinear(nn.Module):
    """A frozen base Linear (or Int8Linear) plus one (A, B) pair per targeted slice of its output rows."""

    def __init__(self, base: nn.Module, parts: dict[str, tuple[int, int]], config: LoRAConfig) -> None:
        super().__init__()
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = dict(sorted(parts.items(), key=lambda kv: kv[1][0]))
        self.scaling = config.scaling
        self.dropout = nn.Dropout(config.dropout)
        device = next(base.parameters()).device
        self.lora_A = nn.ParameterDict()
        self.lora_B = nn.ParameterDict()
        for name, (lo, hi) in self.parts.items():
            a = torch.empty(config.r, self.in_features, device=device)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # as Hu et al.'s reference code (and peft)
            self.lora_A[name] = nn.Parameter(a)
            self.lora_B[name] = nn.Parameter(torch.zeros(hi - lo, config.r, device=device))

    def delta(self, name: str) -> Tensor:
        """(α/r)·B·A for one part: what merging adds to its rows of the base weight."""
        return self.scaling * (self.lora_B[name] @ self.lora_A[name])

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        h = self.dropout(x)
        bounds = sorted({0, self.out_features, *(b for lo_hi in self.parts.values() for b in lo_hi)})
        chunks = list(y.split([hi - lo for lo, hi in itertools.pairwise(bounds)], dim=-1))
        for name, (lo, _) in self.parts.items():
            i = bounds.index(lo)
            update = (h @ self.lora_A[name].t().to(h.dtype)) @ self.lora_B[name].t().to(h.dtype)
            chunks[i] = chunks[i] + self.scaling * update
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks, dim=-1)

    def base_weight(self) -> Tensor:
        return self.base.dequantized_weight() if isinstance(self.base, Int8Linear) else self.base.weight.detach()

    def merged(self) -> nn.Linear:
        """A plain nn.Linear computing what this module computes (without dropout)."""
        weight = self.base_weight().float().clone()
        for name, (lo, hi) in self.parts.items():
            weight[lo:hi] += self.delta(name).detach().float()
        bias = self.base.bias
        linear = nn.Linear(self.in_features, self.out_features, bias=bias is not None, device=weight.device)
        with torch.no_grad():
            linear.weight.copy_(weight)
            if bias is not None:
                linear.bias.copy_(bias.detach())
        return linear


def _known_slices(model: nn.Module) -> dict[str, dict[str, tuple[int, int] | None]]:
    """Target name → {Linear module name: row slice of its output, None = all rows}, for our decoder's and
    encoder's fused layouts: an attention module with `qkv` and `proj`, an MLP with `up` and `down`."""
    found: dict[str, dict[str, tuple[int, int] | None]] = defaultdict(dict)
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(getattr(module, "qkv", None), LINEAR_TYPES) and hasattr(module, "head_dim"):
            q = module.n_head * module.head_dim
            kv = getattr(module, "n_kv_head", module.n_head) * module.head_dim
            found["q"][prefix + "qkv"] = (0, q)
            found["k"][prefix + "qkv"] = (q, q + kv)
            found["v"][prefix + "qkv"] = (q + kv, q + 2 * kv)
            found["o"][prefix + "proj"] = None
        elif isinstance(getattr(module, "up", None), LINEAR_TYPES) and isinstance(getattr(module, "down", None),
                                                                                   LINEAR_TYPES):
            inter = module.down.in_features
            if getattr(module, "swiglu", False):  # mlp.up computes [gate | up]
                found["gate"][prefix + "up"] = (0, inter)
                found["up"][prefix + "up"] = (inter, 2 * inter)
            else:
                found["up"][prefix + "up"] = None
            found["down"][prefix + "down"] = None
    return found


def resolve_targets(model: nn.Module, targets: list[str]) -> dict[str, dict[str, tuple[int, int]]]:
    """{Linear module name: {target: (row lo, row hi)}}; a target matching no layer is an error naming it."""
    known = _known_slices(model)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, LINEAR_TYPES)}
    plan: dict[str, dict[str, tuple[int, int]]] = defaultdict(dict)
    for target in targets:
        key = ALIASES.get(target, target)
        matches = known.get(key) or {n: None for n in linears if n == key or n.endswith("." + key)}
        if not matches:
            names = sorted(known) if known else sorted({n.rsplit(".", 1)[-1] for n in linears})
            hint = ("this model's MLP has no gate (GELU, not SwiGLU)" if key == "gate" and known
                    else f"targets for this model: {', '.join(names)}")
            raise ConfigError(f"LoRA target {target!r} matches no layer of this model; {hint}")
        for module_name, rows in matches.items():
            if module_name not in linears:
                raise ConfigError(f"LoRA target {target!r}: layer {module_name} is not a Linear layer")
            if module_name == "lm_head" or module_name.endswith(".lm_head"):
                continue
            plan[module_name][key] = rows or (0, linears[module_name].out_features)
    for module_name, parts in plan.items():
        spans = sorted(parts.values())
        if any(hi > lo for (_, hi), (lo, _) in itertools.pairwise(spans)):
            raise ConfigError(f"LoRA targets {sorted(parts)} overlap on layer {module_name}; name each part once")
    return dict(plan)


def apply_lora(model: nn.Module, config: LoRAConfig) -> dict[str, dict[str, tuple[int, int]]]:
    """Freeze every parameter of `model`, then put adapters on the targeted layers (in place)."""
    plan = resolve_targets(model, config.targets)
    for p in model.parameters():
        p.requires_grad_(False)
    for module_name, parts in plan.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, LoRALinear(getattr(parent, child), parts, config))
    return plan


def lora_modules(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """Only the adapter tensors: `<layer>.lora_A.<target>` and `<layer>.lora_B.<target>`."""
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if ".lora_" in n}


def load_adapter_state(model: nn.Module, tensors: dict[str, Tensor], source: str) -> None:
    """Copy saved adapters in; a layer or shape the base lacks is an error naming it."""
    expected = dict((n, p) for n, p in model.named_parameters() if ".lora_" in n)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        layer = unexpected[0].split(".lora_")[0]
        raise CheckpointError(f"{source}: adapter for layer {layer} ({unexpected[0]}) has no counterpart in this "
                              f"base model; was the adapter trained on a base of another shape?")
    if missing:
        raise CheckpointError(f"{source}: no adapter tensor {missing[0]} in the file; it does not belong to "
                              "this adapter_config.json")
    for name, param in expected.items():
        if tensors[name].shape != param.shape:
            layer = name.split(".lora_")[0]
            raise CheckpointError(f"{source}: layer {layer}: adapter {name} has shape {tuple(tensors[name].shape)} "
                                  f"but this base needs {tuple(param.shape)}; the adapter was trained on a base "
                                  "of another shape")
    with torch.no_grad():
        for name, param in expected.items():
            param.copy_(tensors[name])


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its base weight, leaving plain nn.Linear layers; returns how many merged."""
    merged = lora_modules(model)
    for module_name, module in merged.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, module.merged())
    return len(merged)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; an int8 base's frozen weights count toward the total."""
    seen: set[int] = set()
    trainable = total = 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        trainable += p.numel() if p.requires_grad else 0
    return trainable, total
