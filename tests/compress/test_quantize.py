"""`lmforge compress quantize`: int8 / int4 checkpoints that load, generate and decode from their integers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_model
from lmforge.cli import main
from lmforge.compress.quantize import quantize
from lmforge.convert import to_hf
from lmforge.errors import CheckpointError, ConfigError
from lmforge.infer.decode import SamplingParams, generate_tokens
from lmforge.model.quant import Int4Linear, Int8Linear, dequantize_linears

LAYERS = dict(num_hidden_layers=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama(make_checkpoint, tmp_path_factory) -> Path:
    """GPT-2's default init (std 0.02): a random model whose logits do not amplify every rounding error."""
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("llama"), std=None, **LAYERS)


@pytest.fixture(scope="module")
def gpt2(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("gpt2-tiny", out=tmp_path_factory.mktemp("gpt2"), std=0.1, **LAYERS)


@pytest.mark.parametrize("scheme, tolerance", [("int8", 0.03), ("int4", 0.25)])
def test_quantized_logits_are_close_to_full_precision(llama, tmp_path, scheme, tolerance):
    """Relative RMS error of the logits: int8 per channel ~1.5%, int4 g64 ~17% on this random model (a
    Gaussian weight's int4 rounding error alone is ~9% RMS per layer); the argmax mostly survives."""
    out = quantize(llama, tmp_path / scheme, scheme=scheme, group_size=64, dtype="float32")
    x = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref, got = lmforge.load(llama).model(x), lmforge.load(out).model(x)
    assert (got - ref).norm() / ref.norm() < tolerance
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() >= 0.9


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_engine_decodes_from_the_stored_integers(gpt2, tmp_path, scheme):
    """Greedy tokens through the engine's KV-cache decode (the packed kernels at batch 1) equal those of a plain
    model holding the dequantized weights, and so do the logits of a whole sequence."""
    out = quantize(gpt2, tmp_path / scheme, scheme=scheme, group_size=32, dtype="float32")
    quantized = load_model(out).model
    plain = load_model(out).model
    assert dequantize_linears(plain) == 9  # 2 layers × 4 Linear + the head
    params = SamplingParams(max_new_tokens=16, temperature=0, stop_at_eos=False)
    assert list(generate_tokens(quantized, [1, 2, 3], params)) == list(generate_tokens(plain, [1, 2, 3], params))
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(quantized(x), plain(x), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme, layer_type, ratio", [("int8", Int8Linear, 0.40), ("int4", Int4Linear, 0.30)])
def test_quantized_checkpoint_reloads_generates_and_is_smaller(gpt2, tmp_path, scheme, layer_type, ratio):
    out = quantize(gpt2, tmp_path / scheme, scheme=scheme, group_size=32)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["layers"]["blocks.0.attn.qkv"] == scheme
    assert config["quantization"]["layers"]["lm_head"] == "int8"  # the default head; the embedding stays bf16
    assert (out / "model.safetensors").stat().st_size < ratio * (gpt2 / "model.safetensors").stat().st_size
    lm = lmforge.load(out)
    assert isinstance(lm.model.blocks[1].mlp.down, layer_type) and isinstance(lm.model.lm_head, Int8Linear)
    assert next(lm.model.parameters()).dtype == torch.bfloat16  # the dtype it was quantized for
    assert isinstance(lm.generate("the model", max_new_tokens=8, temperature=0.0), str)
    again = lm.save(tmp_path / "saved")  # LM.save keeps the layout: it reloads the same tensors
    a, b = lm.model.state_dict(), lmforge.load(again).model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_quantized_checkpoint_is_refused_where_full_precision_is_needed(gpt2, tmp_path):
    out = quantize(gpt2, tmp_path / "q")
    with pytest.raises(CheckpointError, match="is a quantized checkpoint"):
        to_hf(out, tmp_path / "hf")
    with pytest.raises(ConfigError, match="already quantized"):
        quantize(out, tmp_path / "twice")


def test_quantize_cli(gpt2, tmp_path):
    assert main(["compress", "quantize", "--model", str(gpt2), "--scheme", "int4", "--group-size", "32",
                 "--head", "none", "--out", str(tmp_path / "q")]) == 0
    layers = json.loads((tmp_path / "q" / "config.json").read_text())["quantization"]["layers"]
    assert "lm_head" not in layers and set(layers.values()) == {"int4"}
