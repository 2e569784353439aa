"""`lmforge compress prune`: exact unstructured sparsity, Wanda's score, N:M, structured removal that equals
masking, Hugging Face export of the smaller model, and recovery fine-tuning that keeps the zeros."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import lmforge
from lmforge.cli import main
from lmforge.compress.prune import Calibration, calibration_windows, prune, prune_structured
from lmforge.convert import to_hf
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import lm_loss

LAYERS = dict(num_hidden_layers=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def llama(make_checkpoint, tmp_path_factory) -> Path:
    """llama-tiny: 8 query heads sharing 4 K/V heads (2 per group), SwiGLU, untied head."""
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("llama"), std=0.05, tie_word_embeddings=False,
                           **LAYERS)


@pytest.fixture(scope="module")
def gpt2(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("gpt2-tiny", out=tmp_path_factory.mktemp("gpt2"), std=0.05, **LAYERS)


def block_linears(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: m.weight.detach() for n, m in model.blocks.named_modules() if isinstance(m, nn.Linear)}


def test_magnitude_pruning_zeroes_exactly_the_smallest_weights_of_each_layer(llama, tmp_path):
    out = prune(llama, tmp_path / "p", method="magnitude", sparsity=0.3)
    before, after = lmforge.load(llama).model, lmforge.load(out).model
    for name, w in block_linears(after).items():
        original = block_linears(before)[name]
        zeros = w == 0
        assert int(zeros.sum()) == round(0.3 * w.numel())
        assert original[zeros].abs().max() <= original[~zeros].abs().min()  # the smallest went
        assert torch.equal(w[~zeros], original[~zeros])  # the rest untouched
    assert torch.equal(after.embed.weight, before.embed.weight) and torch.equal(after.lm_head.weight,
                                                                                before.lm_head.weight)


def test_wanda_removes_the_lowest_weight_times_input_norm_of_each_row(llama, tiny_packed, tmp_path):
    """Each output row loses exactly round(s·in) weights, those with the lowest |W_ij|·‖X_j‖₂, where ‖X_j‖₂ is
    measured here by a hook of our own over the same calibration windows."""
    before = lmforge.load(llama).model
    windows = calibration_windows(tiny_packed, before, 2048, 64)
    seen = torch.zeros(before.blocks[1].mlp.down.in_features)

    def record(module: nn.Module, args: tuple[torch.Tensor, ...], y: torch.Tensor) -> None:
        seen.add_((args[0].flatten(0, 1) ** 2).sum(0))

    hook = before.blocks[1].mlp.down.register_forward_hook(record)
    with torch.no_grad():
        before(windows)
    hook.remove()
    out = prune(llama, tmp_path / "p", method="wanda", sparsity=0.5, calibration=tiny_packed,
                calibration_tokens=2048, block_size=64)
    w = lmforge.load(out).model.blocks[1].mlp.down.weight.detach()
    original = before.blocks[1].mlp.down.weight.detach()
    score = original.abs() * seen.sqrt()
    zeros = w == 0
    assert (zeros.sum(dim=1) == round(0.5 * w.shape[1])).all()
    for row in range(w.shape[0]):
        assert score[row][zeros[row]].max() <= score[row][~zeros[row]].min()


def test_two_to_four_keeps_two_of_every_four_consecutive_inputs(llama, tmp_path):
    out = prune(llama, tmp_path / "p", method="magnitude", nm="2:4")
    for w in block_linears(lmforge.load(out).model).values():
        assert ((w.view(w.shape[0], -1, 4) == 0).sum(-1) == 2).all()


@pytest.mark.parametrize("method", ["heads", "ffn"])
def test_structured_pruning_at_sparsity_zero_is_the_identity(llama, tmp_path, method):
    out = prune(llama, tmp_path / "p", method=method, sparsity=0.0)
    before, after = lmforge.load(llama), lmforge.load(out)
    assert after.config == before.config
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(after.model(x), before.model(x))


@pytest.mark.parametrize("checkpoint, method, calibrated", [("llama", "heads", True), ("llama", "heads", False),
                                                            ("llama", "ffn", True), ("gpt2", "ffn", False)])
def test_removing_units_gives_the_logits_of_masking_them(request, tiny_packed, checkpoint, method, calibrated):
    """The smaller model computes exactly what the full one does with the removed heads' W_o columns (or the
    removed channels' W_down columns) zeroed: removal is masking, with smaller tensors."""
    model = lmforge.load(request.getfixturevalue(checkpoint)).model
    calibration = Calibration(model, calibration_windows(tiny_packed, model, 1024, 64)) if calibrated else None
    smaller, removed = prune_structured(model, method, 0.5, calibration)
    c = model.config
    with torch.no_grad():
        for layer, units in removed.items():
            if method == "heads":
                per_group, d = c.num_attention_heads // c.num_key_value_heads, c.head_dim
                for g in units:
                    model.blocks[layer].attn.proj.weight[:, g * per_group * d:(g + 1) * per_group * d] = 0
            else:
                model.blocks[layer].mlp.down.weight[:, units] = 0
        x = torch.randint(0, 512, (2, 24))
        torch.testing.assert_close(smaller(x), model(x), atol=1e-5, rtol=1e-5)
    assert smaller.num_params() < model.num_params()
    if method == "heads":
        assert (smaller.config.num_attention_heads, smaller.config.num_key_value_heads) == (4, 2)
    else:
        assert smaller.config.intermediate_size == c.intermediate_size // 2


@pytest.mark.parametrize("checkpoint, method", [("llama", "heads"), ("gpt2", "ffn")])
def test_structurally_pruned_model_is_smaller_and_exports_to_hugging_face(request, tmp_path, checkpoint, method):
    transformers = pytest.importorskip("transformers")
    source = request.getfixturevalue(checkpoint)
    out = prune(source, tmp_path / "p", method=method, sparsity=0.5)
    assert (out / "model.safetensors").stat().st_size < 0.9 * (source / "model.safetensors").stat().st_size
    hf_dir = to_hf(out, tmp_path / "hf")
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir).eval()
    x = torch.randint(0, 512, (1, 20))
    with torch.no_grad():
        torch.testing.assert_close(hf(x).logits, lmforge.load(out).model(x), atol=1e-4, rtol=1e-4)


def test_head_pruning_of_a_gpt2_shaped_model_is_refused_by_name(gpt2, tmp_path):
    with pytest.raises(ConfigError, match="--method heads on a GPT-2-shaped model"):
        prune(gpt2, tmp_path / "p", method="heads", sparsity=0.5)
    with pytest.raises(ConfigError, match=r"--method wanda .* needs --calibration"):
        prune(gpt2, tmp_path / "p", method="wanda", sparsity=0.5)


def test_recovery_fine_tuning_keeps_the_pruned_weights_at_zero(llama, tiny_packed, tmp_path):
    """Through the one shell and loop: AdamW updates the survivors, and the masked gradients keep every pruned
    weight exactly zero; the loss goes down."""
    plain = prune(llama, tmp_path / "plain", method="magnitude", sparsity=0.5)
    out = prune(llama, tmp_path / "rec", method="magnitude", sparsity=0.5, calibration=tiny_packed,
                recover_steps=6, lr=3e-3, batch_size=4, block_size=64, progress=False)
    pruned, recovered = block_linears(lmforge.load(plain).model), block_linears(lmforge.load(out).model)
    for name, w in recovered.items():
        assert torch.equal(w == 0, pruned[name] == 0)
    assert any(not torch.equal(w, pruned[n]) for n, w in recovered.items())
    x, y = WindowLoader(PackedDataset(tiny_packed, "val"), 64, 8, shuffle=False).next_batch()
    with torch.no_grad():
        assert lm_loss(lmforge.load(out).model, x, y)[0] < lm_loss(lmforge.load(plain).model, x, y)[0]


def test_prune_cli(llama, tmp_path):
    assert main(["compress", "prune", "--model", str(llama), "--method", "ffn", "--sparsity", "0.25",
                 "--out", str(tmp_path / "p")]) == 0
    config = json.loads((tmp_path / "p" / "config.json").read_text())
    assert config["intermediate_size"] == 768 - 192
