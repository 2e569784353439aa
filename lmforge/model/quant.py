"""Weight-only quantization: int8 per output channel and int4 group-wise, decoded from the integers directly.

int8 (per-channel symmetric, as LLM.int8(), Dettmers et al. 2022, without its outlier split): each output row
gets one scale s = max|w_row| / 127 and is stored as round(w / s). int4 (group-wise asymmetric round-to-nearest,
the layout of GPTQ/AWQ checkpoints and of torchao's int4 weight-only): each run of `group_size` inputs of a row
gets a scale s = (max − min) / 15 and a zero z = min + 8·s, and is stored as q = round((w − z)/s + 8) in 0..15,
so w ≈ (q − 8)·s + z. Two int4 values share a byte in the file (even input column in the low nibble).

Decoding one token streams every weight from memory once, so fewer bytes per weight is more tokens per
second. At batch 1 (and up to 16 rows) the layers multiply the integers directly; for a long prompt (many rows)
they dequantize to the activations' dtype and run one dense matmul, which AMX does faster.
  - By default through lmforge's own AVX-512 loops (`kernels.py`, `qmatvec.c`): they read the stored tensors as
    they are (int8 rows; int4 two values a byte) with float32 copies of the scales, and stream at close to the
    read bandwidth, where PyTorch's kernels below reach about half of it (benchmarks/quant_decode.py).
  - Without a C compiler or AVX-512 (or with LMFORGE_KERNELS=0), PyTorch's CPU kernels:
    int4: `aten._weight_int4pack_mm_for_cpu` on its own packing of the weight (`aten._convert_weight_to_int4pack_
    for_cpu`), made once on first use. It needs out_features % 16 == 0, so the kernel's copy gets zero rows up to
    a multiple of 16 (GPT-2's 50257-token head) and the extra outputs are dropped.
    int8: `aten._weight_int8pack_mm`, or for short rows (in_features ≤ 1024, a multiple of 32) as two int4
    planes through the int4 kernel, q = 16·h + l with h in −8..7 and l in 0..15, each plane with the row's
    scale (16·s and s): the same bytes per weight (GPT-2 decoding 1.35x bf16 instead of 1.21x).
  - Under torch.compile (the compiled decode step) int8 is inductor's own autotuned AMX int8 template.
Measured shape rules (torch 2.13): `_weight_int8pack_mm` crashes or returns garbage for bf16/fp16 inputs unless
in_features % 16 == 0; the int4 kernel needs group_size in 32/64/128/256 dividing in_features. `fits` says which
scheme a layer can take, by name, and `quantize_model` falls back int4 → int8 → full precision.

Quantized layers hold their integers and scales as frozen parameters, so a checkpoint saves, loads and moves
them like any weight (`model.to(torch.bfloat16)` casts the scales, never the integers). The same `Int8Linear`
is the frozen int8 base of LoRA (QLoRA's memory saving on CPU): it then dequantizes in both passes through
its own autograd function, so training never keeps a float copy of the matrix.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lmforge.errors import CheckpointError, ConfigError
from lmforge.model import kernels

Scheme = Literal["int8", "int4"]
INT4_GROUP_SIZES = (32, 64, 128, 256)
KERNEL_MAX_ROWS = 16  # above this many input rows (a prefill) dequantize + one dense matmul is faster
PLANES_MAX_IN = 1024  # int8 rows this short run faster as two int4 planes than through _weight_int8pack_mm
_KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _frozen(t: Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


def quantize_per_channel(weight: Tensor, scale_dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """(int8 matrix, scale per output row in `scale_dtype`); a zero row gets scale 1 so nothing divides by zero.

    The integers are rounded against the scale as stored, so q·s is the nearest grid point to w."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1) / 127.0
    scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(scale_dtype)
    q = torch.round(w / scale.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def quantize_groupwise(weight: Tensor, group_size: int, scale_dtype: torch.dtype = torch.float32
                       ) -> tuple[Tensor, Tensor, Tensor]:
    """(q in 0..15 as uint8 [out, in], scale [out, in/group], zero [out, in/group]) with w ≈ (q − 8)·scale + zero.

    Min-max asymmetric per group uses all 16 levels, where a symmetric grid would waste one side of a skewed
    group. Scale and zero are rounded to `scale_dtype` first, and q against them."""
    w = weight.detach().float()
    out_features, in_features = w.shape
    groups = w.reshape(out_features, in_features // group_size, group_size)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=1e-8).to(scale_dtype)
    zero = (low + 8 * scale.float()).to(scale_dtype)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None] + 8).clamp_(0, 15)
    return q.to(torch.uint8).reshape(out_features, in_features), scale, zero


def pack_int4(q: Tensor) -> Tensor:
    """[out, in] values 0..15 → [out, in/2] bytes: even column in the low nibble, odd column in the high one."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: Tensor) -> Tensor:
    """The inverse of `pack_int4`: [out, in/2] bytes → [out, in] uint8 values 0..15."""
    return torch.stack([packed & 0x0F, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def fits(scheme: Scheme, out_features: int, in_features: int, group_size: int = 128) -> str | None:
    """Why a layer of this shape cannot take `scheme` on the CPU kernels, or None if it can."""
    if scheme == "int8":
        return None if in_features % 16 == 0 else f"in_features={in_features} is not a multiple of 16"
    if group_size not in INT4_GROUP_SIZES:
        return f"group_size={group_size} is not one of {INT4_GROUP_SIZES}"
    if in_features % group_size:
        return f"in_features={in_features} is not a multiple of group_size={group_size}"
    return None


def _int4_kernel_weight(q: Tensor) -> Tensor:
    """Values 0..15 [out, in] in the CPU int4 kernel's packing, rows padded with 8 (a zero weight) to a multiple
    of 16, the kernel's rule."""
    pad = -q.shape[0] % 16
    q = torch.cat([q, q.new_full((pad, q.shape[1]), 8)]) if pad else q
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)


def _int4_table(scale: Tensor, zero: Tensor, dtype: torch.dtype) -> Tensor:
    """Scales and zeros [out, groups] as the kernel's [groups, out (padded to 16), 2] table in `dtype`."""
    table = torch.stack([scale.to(dtype), zero.to(dtype)], dim=-1).transpose(0, 1)
    pad = -table.shape[1] % 16
    if pad:
        table = torch.cat([table, table.new_zeros(table.shape[0], pad, 2)], dim=1)
    return table.contiguous()


def _int4_mm(x: Tensor, packed: Tensor, group_size: int, table: Tensor, out_features: int) -> Tensor:
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, x.shape[-1]), packed, group_size, table)
    return y[:, :out_features].reshape(*x.shape[:-1], out_features)


def _cached(layer: nn.Module, name: str, sources: tuple[Tensor | None, ...], build: Any) -> Any:
    """`build()`, kept in the layer until one of `sources` is replaced or changed in place (a load, `.to`)."""
    key = [None if t is None else (t.data_ptr(), 0 if t.is_inference() else t._version, t.dtype) for t in sources]
    entry = layer._kernel.get(name)
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = layer._kernel[name] = (key, build())
    return entry[1]


def _float32(t: Tensor | None) -> Tensor | None:
    return None if t is None else t.detach().float().contiguous()


def _use_kernel(x: Tensor) -> bool:
    """The packed-weight kernels serve inference on the CPU at a few rows; training and prefill dequantize."""
    rows = x.numel() // x.shape[-1]
    return (x.device.type == "cpu" and x.dtype in _KERNEL_DTYPES and rows <= KERNEL_MAX_ROWS
            and not (torch.is_grad_enabled() and x.requires_grad))


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
    """A frozen nn.Linear stored as int8 rows plus one scale per row."""

    scheme = "int8"

    def __init__(self, q: Tensor, scale: Tensor, bias: Tensor | None) -> None:
        super().__init__()
        self.out_features, self.in_features = q.shape
        self.weight_int8 = _frozen(q)
        self.weight_scale = _frozen(scale)
        self.bias = None if bias is None else _frozen(bias.detach().clone())
        self._kernel: dict[str, Any] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, scale_dtype: torch.dtype = torch.float32) -> Int8Linear:
        q, scale = quantize_per_channel(linear.weight, scale_dtype)
        return cls(q, scale, None if linear.bias is None else linear.bias.to(scale_dtype))

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool) -> Int8Linear:
        """Shaped for loading a checkpoint's tensors into."""
        return cls(torch.zeros(out_features, in_features, dtype=torch.int8), torch.ones(out_features),
                   torch.zeros(out_features) if bias else None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """q·s, exactly: both factors are exact in float32 and their product rounds once."""
        return self.weight_int8.to(dtype) * self.weight_scale.to(dtype)[:, None]

    def _planes(self, dtype: torch.dtype) -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
        """(group, high plane, low plane, their tables) for the int4 kernel, rebuilt when a stored tensor changes.

        q = 16·h + l (h = ⌊q/16⌋ in −8..7, l in 0..15): h is stored as h + 8 with scale 16·s and zero 0, l with
        scale s and zero 8·s, so the kernel's (v − 8)·scale + zero gives 16·s·h and s·l, which sum to s·q."""
        def build() -> tuple[int, Tensor, Tensor, Tensor, Tensor]:
            q = self.weight_int8.to(torch.int32)
            high = torch.div(q, 16, rounding_mode="floor")
            group = next(g for g in reversed(INT4_GROUP_SIZES) if self.in_features % g == 0)
            s = self.weight_scale.to(dtype)[:, None].expand(-1, self.in_features // group)
            return (group, _int4_kernel_weight(high + 8), _int4_kernel_weight(q - 16 * high),
                    _int4_table(16 * s, torch.zeros_like(s), dtype), _int4_table(s, 8 * s, dtype))

        return _cached(self, f"planes-{dtype}", (self.weight_int8, self.weight_scale), build)

    def forward(self, x: Tensor) -> Tensor:
        eager = not torch.compiler.is_compiling()  # compiled, the int8 product is inductor's own AMX template
        if eager and _use_kernel(x) and self.in_features % 16 == 0 and kernels.takes(x):
            scale, bias = _cached(self, "float32", (self.weight_scale, self.bias),
                                  lambda: (_float32(self.weight_scale), _float32(self.bias)))
            return kernels.int8_matmul(x, self.weight_int8, scale, bias)
        if eager and _use_kernel(x) and self.in_features % 32 == 0 and self.in_features <= PLANES_MAX_IN:
            group, high, low, high_table, low_table = self._planes(x.dtype)
            y = (_int4_mm(x, high, group, high_table, self.out_features)
                 + _int4_mm(x, low, group, low_table, self.out_features))
        elif _use_kernel(x) and (x.dtype == torch.float32 or self.in_features % 16 == 0):
            y = torch.ops.aten._weight_int8pack_mm(x.reshape(-1, self.in_features), self.weight_int8,
                                                   self.weight_scale.to(x.dtype))
            y = y.reshape(*x.shape[:-1], self.out_features)
        else:
            return _Int8Matmul.apply(x, self.weight_int8, self.weight_scale, self.bias)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per-channel"


class Int4Linear(nn.Module):
    """A frozen nn.Linear stored as int4 groups (two per byte) with a scale and a zero per group.

    The CPU kernel wants its own packing of the integers and a [in/group, out, 2] table of scales and zeros;
    both are made from the stored tensors on first use and kept (a second, kernel-shaped copy of the int4
    weight in memory) until the stored tensors change. (Int8Linear likewise keeps its two int4 planes: inference
    holds twice the stored integer bytes.)
    """

    scheme = "int4"

    def __init__(self, packed: Tensor, scale: Tensor, zero: Tensor, bias: Tensor | None, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        if reason := fits("int4", self.out_features, self.in_features, group_size):
            raise ValueError(f"int4 layer of shape {self.out_features}×{self.in_features}: {reason}")
        self.group_size = group_size
        self.weight_int4 = _frozen(packed)
        self.weight_scale = _frozen(scale)
        self.weight_zero = _frozen(zero)
        self.bias = None if bias is None else _frozen(bias.detach().clone())
        self._kernel: dict[str, Any] = {}

    @classmethod
    def from_linear(cls, linear: nn.Linear, group_size: int = 128, scale_dtype: torch.dtype = torch.float32
                    ) -> Int4Linear:
        q, scale, zero = quantize_groupwise(linear.weight, group_size, scale_dtype)
        return cls(pack_int4(q), scale, zero, None if linear.bias is None else linear.bias.to(scale_dtype),
                   group_size)

    @classmethod
    def empty(cls, out_features: int, in_features: int, bias: bool, group_size: int) -> Int4Linear:
        groups = (out_features, in_features // group_size)
        return cls(torch.zeros(out_features, in_features // 2, dtype=torch.uint8), torch.ones(groups),
                   torch.zeros(groups), torch.zeros(out_features) if bias else None, group_size)

    def int_values(self) -> Tensor:
        """The stored integers q in 0..15, [out, in]."""
        return unpack_int4(self.weight_int4)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> Tensor:
        """(q − 8)·scale + zero, group by group."""
        q = self.int_values().to(dtype).reshape(self.out_features, -1, self.group_size)
        w = (q - 8) * self.weight_scale.to(dtype)[..., None] + self.weight_zero.to(dtype)[..., None]
        return w.reshape(self.out_features, self.in_features)

    def _kernel_tensors(self, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """(kernel-packed weight, scales-and-zeros in `dtype`), rebuilt when a stored tensor changes."""
        return _cached(self, f"packed-{dtype}", (self.weight_int4, self.weight_scale, self.weight_zero), lambda: (
            _int4_kernel_weight(self.int_values()), _int4_table(self.weight_scale, self.weight_zero, dtype)))

    def forward(self, x: Tensor) -> Tensor:
        if not _use_kernel(x):
            return F.linear(x, self.dequantized_weight(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        if not torch.compiler.is_compiling() and kernels.takes(x):
            scale, zs, bias = _cached(self, "float32", (self.weight_scale, self.weight_zero, self.bias), lambda: (
                _float32(self.weight_scale), _float32(self.weight_zero.float() - 8 * self.weight_scale.float()),
                _float32(self.bias)))
            return kernels.int4_matmul(x, self.weight_int4, scale, zs, bias, self.group_size)
        packed, table = self._kernel_tensors(x.dtype)
        y = _int4_mm(x, packed, self.group_size, table, self.out_features)
        return y if self.bias is None else y + self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int4 group_size={self.group_size}"


QUANTIZED = (Int8Linear, Int4Linear)


def _linears(model: nn.Module, types: tuple[type, ...]) -> list[tuple[str, nn.Module, str, nn.Module]]:
    """(full name, parent, attribute, layer) of every layer of `types`, in module order."""
    found = []
    for name, module in model.named_modules():
        for child_name, child in module.named_children():
            if isinstance(child, types):
                found.append((f"{name}.{child_name}" if name else child_name, module, child_name, child))
    return found


def quantize_linears(model: nn.Module, skip: tuple[str, ...] = ("lm_head",)) -> list[str]:
    """Replace every nn.Linear (but those named in `skip`, and weights shared with an embedding) by an
    Int8Linear in place; returns the names replaced. Embeddings and norms stay in full precision."""
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    replaced = []
    for full, parent, child_name, child in _linears(model, (nn.Linear,)):
        if child_name not in skip and full not in skip and id(child.weight) not in shared:
            setattr(parent, child_name, Int8Linear.from_linear(child))
            replaced.append(full)
    return replaced


def quantize_model(model: nn.Module, scheme: Scheme, *, group_size: int = 128, head: Scheme | None = "int8",
                   scale_dtype: torch.dtype = torch.bfloat16) -> dict[str, str]:
    """Quantize every nn.Linear of a decoder in place: `scheme` for the blocks, `head` (None: keep) for lm_head.

    A layer whose shape the kernels refuse falls back int4 → int8 → full precision. A head tied to the
    embedding gets its own quantized copy: the embedding (a row lookup per token, no matmul) stays as it is.
    Returns {layer name: "int8" | "int4" | "kept: <why>"}.
    """
    if group_size not in INT4_GROUP_SIZES:
        raise ConfigError(f"group_size={group_size} is not one of {INT4_GROUP_SIZES} (the int4 kernel's)")
    done: dict[str, str] = {}
    for full, parent, child_name, child in _linears(model, (nn.Linear,)):
        wanted = head if full == "lm_head" else scheme
        if wanted is None:
            done[full] = "kept: --head none"
            continue
        reasons = []
        for option in ("int4", "int8") if wanted == "int4" else ("int8",):
            reason = fits(option, child.out_features, child.in_features, group_size)
            if reason is None:
                layer = (Int4Linear.from_linear(child, group_size, scale_dtype) if option == "int4"
                         else Int8Linear.from_linear(child, scale_dtype))
                setattr(parent, child_name, layer.to(child.weight.device))
                done[full] = option + (f" ({reasons[0]} for int4)" if reasons else "")
                break
            reasons.append(reason)
        else:
            done[full] = "kept: " + "; ".join(reasons)
    return done


def layout_of(model: nn.Module) -> dict[str, Any] | None:
    """What a checkpoint's config.json records of a quantized model: each quantized layer's scheme and the
    int4 group size (one per model), and the float dtype it runs in; None when no layer is quantized."""
    layers = _linears(model, QUANTIZED)
    if not layers:
        return None
    groups = sorted({layer.group_size for *_, layer in layers if isinstance(layer, Int4Linear)})
    if len(groups) > 1:
        raise ValueError(f"int4 layers with group sizes {groups}: a checkpoint records one group size")
    scale_dtype = layers[0][3].weight_scale.dtype
    return {"method": "weight-only round-to-nearest", "group_size": groups[0] if groups else None,
            "dtype": str(scale_dtype).removeprefix("torch."),
            "layers": {full: layer.scheme for full, _, _, layer in layers}}


def apply_layout(model: nn.Module, layout: dict[str, Any] | None, source: str = "config.json") -> None:
    """Swap the nn.Linear layers a recorded layout names for empty quantized layers of the same shape, so the
    checkpoint's integers and scales load into them."""
    if not layout:
        return
    linears = {full: (parent, child_name, child) for full, parent, child_name, child in _linears(model, (nn.Linear,))}
    for full, scheme in layout["layers"].items():
        if full not in linears:
            raise CheckpointError(f"{source}: quantization names layer {full!r}, which this model does not have")
        parent, child_name, child = linears[full]
        bias = child.bias is not None
        if scheme == "int8":
            layer = Int8Linear.empty(child.out_features, child.in_features, bias)
        elif scheme == "int4":
            layer = Int4Linear.empty(child.out_features, child.in_features, bias, layout["group_size"])
        else:
            raise CheckpointError(f"{source}: layer {full!r} has quantization scheme {scheme!r}; known: int8, int4")
        setattr(parent, child_name, layer)


def dequantize_linears(model: nn.Module) -> int:
    """Turn every quantized layer back into an nn.Linear holding its dequantized weight; returns how many."""
    count = 0
    for _, parent, child_name, child in _linears(model, QUANTIZED):
        device = child.weight_scale.device
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None, device=device)
        with torch.no_grad():
            linear.weight.copy_(child.dequantized_weight())
            if child.bias is not None:
                linear.bias.copy_(child.bias)
        setattr(parent, child_name, linear)
        count += 1
    return count
