"""lmforge's own int8 / int4 decode kernels (qmatvec.c) against the dense matmul with the dequantized weight."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmforge.model import kernels
from lmforge.model.quant import Int4Linear, Int8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler or no AVX-512 on this machine")


def layer(scheme: str, out_features: int, in_features: int, group: int = 64, bias: bool = True) -> nn.Module:
    torch.manual_seed(out_features * 7 + in_features)
    linear = nn.Linear(in_features, out_features, bias=bias)
    return (Int8Linear.from_linear(linear) if scheme == "int8" else Int4Linear.from_linear(linear, group)).eval()


def runs_lmforge_kernel(module: nn.Module, x: torch.Tensor) -> bool:
    """Whether the forward went through qmatvec.c: no aten integer kernel and no dense matmul ran."""
    with torch.profiler.profile() as prof:
        module(x)
    names = {e.name for e in prof.events()}
    return not names & {"aten::_weight_int8pack_mm", "aten::_weight_int4pack_mm_for_cpu", "aten::mm", "aten::addmm",
                        "aten::linear"}


@pytest.mark.parametrize("out_features, in_features", [(768, 768), (37, 48), (5, 2048), (50, 4096)])
@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_kernel_equals_the_dense_matmul_in_float32(out_features, in_features, rows):
    """Every row count a decode batch takes, rows not a multiple of the kernel's 4, inputs a multiple of 16."""
    q8 = layer("int8", out_features, in_features)
    x = torch.randn(rows, in_features)
    with torch.inference_mode():
        assert runs_lmforge_kernel(q8, x)
        torch.testing.assert_close(q8(x), F.linear(x, q8.dequantized_weight(), q8.bias), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("group", [32, 64, 128, 256])
@pytest.mark.parametrize("rows", [1, 5])
def test_int4_kernel_equals_the_dense_matmul_for_every_group_size(group, rows):
    q4 = layer("int4", 43, 512, group)
    x = torch.randn(rows, 512)
    with torch.inference_mode():
        assert runs_lmforge_kernel(q4, x)
        torch.testing.assert_close(q4(x), F.linear(x, q4.dequantized_weight(), q4.bias), atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_bfloat16_in_and_out_rounds_once(scheme):
    """bf16 activations are read exactly and the float32 sum is rounded to bf16 once, as torch rounds."""
    module = layer(scheme, 64, 256, bias=False).to(torch.bfloat16)
    x = torch.randn(2, 256).bfloat16()
    with torch.inference_mode():
        y = module(x)
        assert y.dtype == torch.bfloat16 and runs_lmforge_kernel(module, x)
        exact = F.linear(x.float(), module.dequantized_weight(torch.float32))
    assert torch.equal(y, exact.bfloat16()) or (y.float() - exact).abs().max() <= exact.abs().max() * 2 ** -8


def test_leading_dimensions_and_a_batch_of_one_token_keep_their_shape():
    q8 = layer("int8", 32, 64)
    x = torch.randn(2, 1, 64)
    with torch.inference_mode():
        assert q8(x).shape == (2, 1, 32)
        torch.testing.assert_close(q8(x), F.linear(x, q8.dequantized_weight(), q8.bias), atol=2e-5, rtol=1e-5)


def test_the_float32_scales_follow_a_change_of_the_stored_ones():
    """The kernel reads cached float32 copies of the scales; loading new ones in place must refresh them."""
    q8 = layer("int8", 16, 64)
    x = torch.randn(1, 64)
    with torch.inference_mode():
        before = q8(x)
    with torch.no_grad():
        q8.weight_scale.mul_(2)
        q8.bias.zero_()
    with torch.inference_mode():
        torch.testing.assert_close(q8(x), 2 * (before - layer("int8", 16, 64).bias), atol=2e-5, rtol=1e-5)


def test_prefill_and_training_keep_their_own_paths():
    """Above 16 rows the layer dequantizes into one dense matmul; with gradients it uses the autograd function."""
    q8 = layer("int8", 16, 64)
    with torch.inference_mode():
        assert not runs_lmforge_kernel(q8, torch.randn(40, 64))
    x = torch.randn(2, 64, requires_grad=True)
    q8(x).sum().backward()
    assert x.grad is not None


def test_turned_off_the_layers_take_pytorchs_kernels(monkeypatch):
    monkeypatch.setattr(kernels, "takes", lambda x: False)
    q4 = copy.deepcopy(layer("int4", 16, 128))
    with torch.inference_mode():
        assert not runs_lmforge_kernel(q4, torch.randn(1, 128))


def test_a_failed_build_warns_and_leaves_pytorchs_kernels(tmp_path, monkeypatch):
    """No usable compiler: one warning naming the cause, `available()` False, nothing half-written in the cache."""
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", "false")
    kernels._library.cache_clear()
    try:
        with pytest.warns(UserWarning, match="decode kernels not built"):
            assert not kernels.available()
        assert not list((tmp_path / "kernels").iterdir())
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()
    assert kernels.available()


def test_the_build_is_cached_per_source_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("LMFORGE_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert kernels.available()
        built = list((tmp_path / "kernels").glob("qmatvec-*.so"))
        assert len(built) == 1
        kernels._library.cache_clear()
        assert kernels.available() and list((tmp_path / "kernels").glob("qmatvec-*.so")) == built
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()


def test_an_int8_lora_base_of_any_width_still_decodes():
    """`quantize_linears` (the LoRA base) takes any in_features; widths the kernel cannot take use the dense path."""
    q8 = layer("int8", 8, 40)
    x = torch.randn(1, 40)
    with torch.inference_mode():
        torch.testing.assert_close(q8(x), F.linear(x, q8.dequantized_weight(), q8.bias), atol=2e-5, rtol=1e-5)
