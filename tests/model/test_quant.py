"""Weight-only int8 / int4 layers: the stored integers and scales, and PyTorch's CPU kernels against the
dense matmul with the dequantized weight."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model.quant import (
    Int4Linear,
    Int8Linear,
    apply_layout,
    dequantize_linears,
    fits,
    layout_of,
    pack_int4,
    quantize_model,
    unpack_int4,
)


@pytest.fixture(params=["lmforge", "pytorch"])
def kernel_source(request, monkeypatch):
    """Run a test on lmforge's own AVX-512 kernels and on PyTorch's (the path without a C compiler)."""
    from lmforge.model import kernels
    if request.param == "pytorch":
        monkeypatch.setattr(kernels, "takes", lambda x: False)
    elif not kernels.available():
        pytest.skip("lmforge's kernels are not built on this machine")
    return request.param


def make(scheme: str, out_features: int = 48, in_features: int = 256, scale_dtype=torch.float32):
    torch.manual_seed(0)
    linear = nn.Linear(in_features, out_features)
    layer = (Int8Linear.from_linear(linear, scale_dtype) if scheme == "int8"
             else Int4Linear.from_linear(linear, 64, scale_dtype))
    return linear, layer


def test_int8_dequantized_weight_is_the_stored_integers_times_scales():
    """q·s exactly, with q the nearest grid point: every weight within half a step of its row's scale."""
    linear, layer = make("int8", scale_dtype=torch.bfloat16)
    q, s = layer.weight_int8, layer.weight_scale
    assert q.dtype == torch.int8 and s.dtype == torch.bfloat16 and q.abs().max() <= 127
    assert torch.equal(layer.dequantized_weight(), q.float() * s.float()[:, None])
    assert ((layer.dequantized_weight() - linear.weight).abs() <= s.float()[:, None] / 2 + 1e-6).all()


def test_int4_dequantized_weight_is_the_stored_integers_times_scales_plus_zeros():
    """(q − 8)·s + z per group of 64 inputs exactly, q in 0..15, each weight within half a step."""
    linear, layer = make("int4")
    q, s, z = layer.int_values(), layer.weight_scale, layer.weight_zero
    assert layer.weight_int4.shape == (48, 128) and layer.weight_int4.dtype == torch.uint8  # two values a byte
    assert q.min() >= 0 and q.max() <= 15 and s.shape == z.shape == (48, 4)
    expected = ((q.float() - 8).view(48, 4, 64) * s[..., None] + z[..., None]).view(48, 256)
    assert torch.equal(layer.dequantized_weight(), expected)
    step = s.repeat_interleave(64, dim=1)
    assert ((layer.dequantized_weight() - linear.weight).abs() <= step / 2 + 1e-6).all()


def test_int4_packing_puts_the_even_column_in_the_low_nibble():
    q = torch.tensor([[1, 2, 15, 0]], dtype=torch.uint8)
    assert pack_int4(q).tolist() == [[0x21, 0x0F]]
    values = torch.randint(0, 16, (16, 64), dtype=torch.uint8)
    assert torch.equal(unpack_int4(pack_int4(values)), values)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 40])  # 1 and 3 rows go through the packed kernels, 40 (a prefill) dequantizes
def test_layer_output_equals_the_dense_matmul_with_the_dequantized_weight(scheme, rows, kernel_source):
    _, layer = make(scheme)
    x = torch.randn(rows, 256)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-4, rtol=1e-5)
        layer.to(torch.bfloat16)
        xb = x.bfloat16()
        ref = F.linear(xb.float(), layer.dequantized_weight(torch.float32), layer.bias.float())
        assert ((layer(xb).float() - ref).abs().max() / ref.abs().max()) < 1e-2  # bf16 rounding of the output


@pytest.mark.parametrize("scheme, in_features, kernel", [
    ("int8", 256, "aten::_weight_int4pack_mm_for_cpu"),  # as two int4 planes
    ("int8", 48, "aten::_weight_int8pack_mm"),  # in_features a multiple of 16, not of 32
    ("int8", 2048, "aten::_weight_int8pack_mm"),  # long rows
    ("int4", 256, "aten::_weight_int4pack_mm_for_cpu")])
def test_batch_one_inference_runs_a_packed_integer_kernel(scheme, in_features, kernel, monkeypatch):
    """PyTorch's kernels, the path taken where lmforge's own (tests/model/test_kernels.py) are not built."""
    from lmforge.model import kernels
    monkeypatch.setattr(kernels, "takes", lambda x: False)
    _, layer = make(scheme, in_features=in_features, scale_dtype=torch.bfloat16)
    layer.to(torch.bfloat16)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        layer(torch.randn(1, 1, in_features, dtype=torch.bfloat16))
    assert kernel in {e.name for e in prof.events()}


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_int8_planes_and_int4_rows_padded_to_the_kernels_multiple_of_16_give_the_dense_result(scheme, kernel_source):
    """GPT-2's head has 50257 rows: the kernel's copy is padded to a multiple of 16 and the extra outputs dropped."""
    _, layer = make(scheme, out_features=37, in_features=128)
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(layer(x), F.linear(x, layer.dequantized_weight(), layer.bias), atol=1e-4,
                                   rtol=1e-5)


def test_int8_backward_gives_the_dequantized_input_gradient():
    """LoRA trains over an int8 base: the input gradient flows through the dequantized weight, none to it."""
    _, layer = make("int8")
    x = torch.randn(4, 256, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    layer(x).sum().backward()
    F.linear(x_ref, layer.dequantized_weight(), layer.bias).sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in layer.parameters())


def test_shapes_the_kernels_refuse_fall_back_int4_to_int8_to_full_precision_by_name():
    model = nn.ModuleDict({"fits": nn.Linear(128, 40), "short_in": nn.Linear(48, 64), "odd_in": nn.Linear(40, 64),
                           "lm_head": nn.Linear(64, 48)})
    done = quantize_model(model, "int4", group_size=64)
    assert done["fits"] == "int4"  # 40 rows: the kernel's copy is padded to 48
    assert done["short_in"] == "int8 (in_features=48 is not a multiple of group_size=64 for int4)"
    assert done["odd_in"] == ("kept: in_features=40 is not a multiple of group_size=64; "
                              "in_features=40 is not a multiple of 16")
    assert done["lm_head"] == "int8"  # the head's own setting
    assert isinstance(model["fits"], Int4Linear) and isinstance(model["short_in"], Int8Linear)
    assert type(model["odd_in"]) is nn.Linear
    assert fits("int4", 64, 128, 96) == "group_size=96 is not one of (32, 64, 128, 256)"


def test_layout_rebuilds_a_model_that_loads_the_quantized_tensors():
    torch.manual_seed(0)
    source = nn.ModuleDict({"a": nn.Linear(128, 48), "b": nn.Linear(48, 24, bias=False), "lm_head": nn.Linear(24, 16)})
    target = nn.ModuleDict({"a": nn.Linear(128, 48), "b": nn.Linear(48, 24, bias=False), "lm_head": nn.Linear(24, 16)})
    quantize_model(source, "int4", group_size=64, head=None)
    layout = layout_of(source)
    assert layout["layers"] == {"a": "int4", "b": "int8"} and layout["group_size"] == 64
    apply_layout(target, layout)
    target.load_state_dict(source.state_dict())
    x = torch.randn(2, 128)
    with torch.no_grad():
        torch.testing.assert_close(target["b"](target["a"](x)), source["b"](source["a"](x)))
    assert dequantize_linears(target) == 2 and layout_of(target) is None
