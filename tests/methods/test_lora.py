"""LoRA: target mapping onto fused layers, adapters-only training, save/load/merge equivalence, int8 base, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_gpt

import lmforge
from lmforge.checkpoint import load_model
from lmforge.data.sft import load_sft
from lmforge.errors import CheckpointError, ConfigError
from lmforge.model.lora import LoRAConfig, LoRALinear, apply_lora, count_parameters, merge_lora
from lmforge.model.quant import Int8Linear, quantize_linears, quantize_per_channel
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import SFTLoader
from lmforge.train.losses import sft_loss

SMALL = dict(block_size=64, batch_size=4, warmup_steps=2, precision="32", log_every=1, progress=False, lr=5e-3)
LAYERS = dict(num_hidden_layers=2, max_position_embeddings=64)


WORDS = ["cat", "dog", "mat", "model", "token", "layer", "window", "batch"]


def repeat_rows(path: Path, pairs: list[tuple[str, str]]) -> Path:
    rows = [{"messages": [{"role": "user", "content": f"Repeat {w} {v}."},
                          {"role": "assistant", "content": f"{w} {v}"}]} for w, v in pairs]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    """40 "Repeat w v." → "w v" conversations, v among the first five words."""
    return repeat_rows(tmp_path_factory.mktemp("sft") / "sft.jsonl", [(w, v) for w in WORDS for v in WORDS[:5]])


@pytest.fixture(scope="module")
def base(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("base"), std=None, **LAYERS)


def mean_loss(model, x, y) -> float:
    loss_sum, targets = sft_loss(model, x, y)
    return (loss_sum / targets).item()


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_q_k_v_targets_are_slices_of_the_fused_qkv(tiny_tokenizer):
    """q and v adapters add (α/r)·B·A·x to their own rows of attn.qkv's output and leave k's rows alone."""
    model = random_gpt("llama-tiny", tiny_tokenizer.vocab_size, **LAYERS)  # 8 query heads, 4 K/V heads of 32
    plan = apply_lora(model, LoRAConfig(r=4, alpha=8, dropout=0.0, targets=["q_proj", "v"]))
    assert plan["blocks.0.attn.qkv"] == {"q": (0, 256), "v": (384, 512)}
    layer: LoRALinear = model.blocks[0].attn.qkv
    with torch.no_grad():
        for p in layer.lora_B.values():
            p.normal_()
    x = torch.randn(3, 5, 256)
    base = layer.base(x)
    expected = base.clone()
    for name, (lo, hi) in layer.parts.items():
        expected[..., lo:hi] += 2.0 * x @ layer.lora_A[name].T @ layer.lora_B[name].T
    torch.testing.assert_close(layer(x), expected)
    torch.testing.assert_close(layer(x)[..., 256:384], base[..., 256:384])  # k untouched


def test_gate_and_up_are_the_halves_of_the_swiglu_up_projection(tiny_tokenizer):
    model = random_gpt("llama-tiny", tiny_tokenizer.vocab_size, **LAYERS)
    inter = model.config.intermediate_size
    plan = apply_lora(model, LoRAConfig(targets=["gate", "up", "down", "o"]))
    assert plan["blocks.1.mlp.up"] == {"gate": (0, inter), "up": (inter, 2 * inter)}
    assert plan["blocks.1.mlp.down"] == {"down": (0, 256)} and plan["blocks.1.attn.proj"] == {"o": (0, 256)}


def test_only_adapters_train_and_start_at_the_base(tiny_tokenizer):
    model = random_gpt("llama-tiny", tiny_tokenizer.vocab_size, **LAYERS)
    x = torch.randint(0, tiny_tokenizer.vocab_size, (2, 16))
    before = model(x)
    apply_lora(model, LoRAConfig(r=8, targets=["q", "k", "v", "o"]))
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".lora_" in n for n in trainable)
    n_trainable, total = count_parameters(model)
    assert n_trainable == 2 * (8 * 256 * 4 + 8 * (256 + 128 + 128 + 256))  # A: r×in per target, B: out×r
    assert n_trainable < 0.1 * total
    torch.testing.assert_close(model.eval()(x), before)  # B starts at zero


@pytest.mark.parametrize(("name", "target", "message"), [
    ("gpt2-tiny", "gate", "LoRA target 'gate' matches no layer of this model; this model's MLP has no gate"),
    ("llama-tiny", "attention_out", "LoRA target 'attention_out' matches no layer"),
    ("llama-tiny", "qkv", r"LoRA targets \['q', 'qkv'\] overlap on layer blocks\.0\.attn\.qkv"),
])
def test_target_matching_no_layer_or_overlapping_is_named(tiny_tokenizer, name, target, message):
    model = random_gpt(name, tiny_tokenizer.vocab_size, **LAYERS)
    with pytest.raises(ConfigError, match=message):
        apply_lora(model, LoRAConfig(targets=["q", target]))


def test_int8_per_channel_quantization_and_its_gradient():
    """Each weight is within half a step of its row's scale, and the layer's input gradient is the dequantized one."""
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 32)
    q, scale = quantize_per_channel(linear.weight)
    assert q.dtype == torch.int8
    assert ((q.float() * scale[:, None] - linear.weight).abs() <= scale[:, None] / 2 + 1e-7).all()
    int8 = Int8Linear.from_linear(linear)
    x = torch.randn(4, 64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = int8(x), F.linear(x_ref, int8.dequantized_weight(), linear.bias.detach())
    torch.testing.assert_close(y, y_ref)
    y.sum().backward()
    y_ref.sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad)
    assert not any(p.requires_grad for p in int8.parameters())  # frozen


@pytest.mark.parametrize("int8", [False, True])
def test_merged_logits_equal_base_plus_adapter(base, sft_data, tmp_path, int8):
    """A trained adapter, saved alone and loaded onto its base, gives the logits of its merged checkpoint."""
    run = lmforge.finetune_lora(base, sft_data, tmp_path / "run", max_steps=3, lora_targets="q,k,v,o,gate,up,down",
                                base_int8=int8, **SMALL)
    adapter_bytes = (run / "adapter.safetensors").stat().st_size
    assert adapter_bytes < 0.1 * (base / "model.safetensors").stat().st_size
    assert not (run / "model.safetensors").exists()
    adapted = load_model(run).model
    with torch.no_grad():  # lmforge.load (so every verb's --model) opens a LoRA run the same way
        probe = torch.randint(0, 512, (1, 8))
        torch.testing.assert_close(lmforge.load(run).model(probe), adapted(probe))
    assert any(p.abs().sum() > 0 for n, p in adapted.named_parameters() if "lora_B" in n)  # it trained
    merged = lmforge.load(lmforge.merge_lora(run, tmp_path / "merged")).model
    x = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(merged(x), adapted(x), atol=1e-4, rtol=1e-4)
        differs = (merged(x) - lmforge.load(base).model(x)).abs().max()
    assert differs > 1e-3  # and it is not just the base again


def test_adapter_on_a_base_of_another_shape_names_the_layer(base, sft_data, make_checkpoint, tmp_path):
    run = lmforge.finetune_lora(base, sft_data, tmp_path / "run", max_steps=1, **SMALL)
    other = make_checkpoint("llama-tiny", out=tmp_path / "other", hidden_size=128, num_attention_heads=4,
                            num_key_value_heads=2, **LAYERS)
    with pytest.raises(CheckpointError, match=r"layer blocks\.0\.attn\.qkv: adapter .* has shape"):
        load_model(run, base=other)
    with pytest.raises(CheckpointError, match=r"no counterpart in this base"):
        load_model(run, base=make_checkpoint("llama-tiny", out=tmp_path / "one", num_hidden_layers=1,
                                                    max_position_embeddings=64))


def test_lora_resume_continues_exactly(base, sft_data, tmp_path):
    """4 steps, then --resume to 8, gives the losses and adapters of an uninterrupted 8-step run (dropout on)."""
    common = dict(lora_targets="q,v,down", lora_dropout=0.1, **SMALL)
    full = lmforge.finetune_lora(base, sft_data, tmp_path / "full", max_steps=8, **common)
    part = lmforge.finetune_lora(base, sft_data, tmp_path / "part", max_steps=4, lr_decay_steps=8, **common)
    lmforge.finetune_lora(resume=part, max_steps=8, progress=False)
    assert losses(part) == losses(full)
    from safetensors.torch import load_file

    a, b = load_file(full / "adapter.safetensors"), load_file(part / "adapter.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_lora_over_int8_base_lowers_the_loss(base, sft_data, tmp_path):
    """QLoRA's setting on CPU: int8 frozen base, fp32 adapters; the SFT loss goes down on held-out
    conversations (second words the training data never has)."""
    run = lmforge.finetune_lora(base, sft_data, tmp_path / "run", max_steps=12, base_int8=True,
                                lora_targets="q,k,v,o,gate,up,down", lora_r=8, **SMALL)
    tokenizer = Tokenizer.load(base)
    held_out = repeat_rows(tmp_path / "held_out.jsonl", [(w, v) for w in WORDS for v in WORDS[5:]])
    batch = SFTLoader(load_sft(held_out, tokenizer, max_length=65), 64, 8, tokenizer.pad_id, shuffle=False)
    x, y = batch.next_batch()
    start = lmforge.load(base).model
    quantize_linears(start)
    assert isinstance(start.blocks[0].attn.qkv, Int8Linear)
    trained = load_model(run).model
    assert isinstance(trained.blocks[0].attn.qkv.base, Int8Linear)
    with torch.no_grad():
        before, after = (mean_loss(m, x, y) for m in (start.eval(), trained))
    assert after < before - 1.0, (before, after)  # measured: 6.40 → 4.52 in 12 steps


def test_merge_lora_folds_every_adapter(tiny_tokenizer):
    model = random_gpt("gpt2-tiny", tiny_tokenizer.vocab_size, **LAYERS)
    apply_lora(model, LoRAConfig(targets=["q", "v", "up"], dropout=0.0))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.1)
    x = torch.randint(0, tiny_tokenizer.vocab_size, (1, 10))
    expected = model(x)
    assert merge_lora(model) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x), expected, atol=1e-4, rtol=1e-4)
