"""Int8 weight-only quantization for a frozen base: the memory-saving idea of QLoRA (Dettmers et al. 2023) on CPU.

Each output row of a weight matrix gets one scale, s = max|w_row| / 127, and the row is stored as
round(w / s) in int8 (per-channel symmetric quantization, as in LLM.int8(), Dettmers et al. 2022, without
its outlier split). The layer dequantizes on the fly in both passes, through its own autograd function, so
neither pass keeps a full-precision copy of the matrix alive: that is the point — the base stores a quarter
of its fp32 bytes while LoRA adapters (kept in full precision) learn on top.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def quantize_per_channel(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(int8 matrix, fp32 scale per output row); a zero row gets scale 1 so nothing divides by zero."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


class _Int8Matmul(torch.autograd.Function):
    """y = x·(q·s)ᵀ + b whose backward re-dequantizes instead of saving the float matrix."""

    @staticmethod
    def forward(ctx, x: Tensor, q: Tensor, scale: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(q, scale)
        ctx.x_dtype = x.dtype
        w = q.to(x.dtype) * scale.to(x.dtype)[:, None]
        return F.linear(x, w, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, None, None, None]:  # type: ignore[override]
        q, scale = ctx.saved_tensors
        w = q.to(grad.dtype) * scale.to(grad.dtype)[:, None]
        return (grad @ w).to(ctx.x_dtype), None, None, None  # the base is frozen: no weight gradient


class Int8Linear(nn.Module):
    """A frozen nn.Linear stored as int8 rows plus one fp32 scale per row (buffers, never parameters)."""

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.register_buffer("weight_int8", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @classmethod
    def from_linear(cls, linear: nn.Linear) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight)
        return cls(q, scale, linear.bias)

    def dequantized_weight(self) -> Tensor:
        return self.weight_int8.float() * self.weight_scale[:, None]

    def forward(self, x: Tensor) -> Tensor:
        return _Int8Matmul.apply(x, self.weight_int8, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear (but those named in `skip`, and weights shared with an embedding) by an
    Int8Linear in place; returns the names replaced. Embeddings and norms stay in full precision."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    replaced = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if (isinstance(child, nn.Linear) and child_name not in skip and full not in skip
                    and id(child.weight) not in shared):
                setattr(module, child_name, Int8Linear.from_linear(child))
                replaced.append(full)
    return replaced


def dequantize_linears(model: nn.Module) -> int:
    """Turn every Int8Linear back into an nn.Linear holding its dequantized weight (for saving); returns how many."""
    count = 0
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, Int8Linear):
                linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                   device=child.weight_int8.device)
                with torch.no_grad():
                    linear.weight.copy_(child.dequantized_weight())
                    if child.bias is not None:
                        linear.bias.copy_(child.bias)
                setattr(module, child_name, linear)
                count += 1
    return count
