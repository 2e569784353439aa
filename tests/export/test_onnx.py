"""`lmforge export onnx`: onnxruntime runs the exported graph with its KV cache and computes our logits and tokens."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.errors import CheckpointError
from lmforge.export.onnx import export_onnx, io_names
from lmforge.infer.decode import generate_tokens
from lmforge.infer.sampling import SamplingParams

ort = pytest.importorskip("onnxruntime")

# One of each shape family: GPT-2 (learned positions, LayerNorm, GELU, biases), Llama (RoPE, RMSNorm, SwiGLU,
# GQA), Qwen2 (q/k/v bias) and Qwen3 (QK-norm). std 0.05: logits of a few units, distinct greedy choices.
SHAPES = {"gpt2": ("gpt2-tiny", {}), "llama": ("llama-tiny", {"num_hidden_layers": 2}),
          "qwen2": ("llama-tiny", {"num_hidden_layers": 2, "qkv_bias": True, "family": "qwen2"}),
          "qwen3": ("qwen3-tiny", {})}


@pytest.fixture(scope="module", params=list(SHAPES))
def exported(request: pytest.FixtureRequest, make_checkpoint, tmp_path_factory: pytest.TempPathFactory):
    """(checkpoint dir, onnx dir, onnxruntime session) for one shape, exported once per module."""
    preset, overrides = SHAPES[request.param]
    ckpt = make_checkpoint(preset, out=tmp_path_factory.mktemp(f"onnx_ckpt_{request.param}"), std=0.05,
                           generation_config={"max_new_tokens": 8, "temperature": 0.0}, **overrides)
    out = export_onnx(ckpt, tmp_path_factory.mktemp(f"onnx_{request.param}") / "x-onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    return ckpt, out, session


def empty_past(session, batch: int) -> dict[str, np.ndarray]:
    """Zero-length past tensors, shaped from the graph's own input metadata (heads and head_dim are static)."""
    return {i.name: np.zeros((batch, i.shape[1], 0, i.shape[3]), np.float32)
            for i in session.get_inputs() if i.name.startswith("past_key_values.")}


def run(session, ids: torch.Tensor, mask: torch.Tensor, past: dict[str, np.ndarray]) -> tuple[np.ndarray, dict]:
    """(logits, next past) for one call: present.{i}.* are fed back as past_key_values.{i}.*."""
    outputs = session.run(None, {"input_ids": ids.numpy(), "attention_mask": mask.numpy(), **past})
    names = [o.name for o in session.get_outputs()]
    present = {n.replace("present.", "past_key_values."): v for n, v in zip(names[1:], outputs[1:])}
    return outputs[0], present


def test_folder_holds_model_config_and_tokenizer(exported) -> None:
    """The export writes model.onnx with the flat cache names, plus config, generation defaults and tokenizer."""
    ckpt, out, session = exported
    assert {"model.onnx", "config.json", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json"} <= {p.name for p in out.iterdir()}
    layers = lmforge.load(ckpt).config.num_hidden_layers
    inputs, outputs = io_names(layers)
    assert [i.name for i in session.get_inputs()] == inputs
    assert [o.name for o in session.get_outputs()] == outputs
    assert inputs[2:4] == ["past_key_values.0.key", "past_key_values.0.value"] and outputs[1] == "present.0.key"


def test_logits_equal_ours_without_past(exported) -> None:
    """A left-padded batch of 3 from a zero-length past: onnxruntime's logits equal ours within 1e-4 (fp32)."""
    ckpt, _, session = exported
    model = lmforge.load(ckpt).model
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (3, 11))
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).numpy()
    theirs, present = run(session, ids, mask, empty_past(session, 3))
    real = mask.bool().numpy()
    assert np.abs(theirs - ours)[real].max() <= 1e-4
    assert present["past_key_values.0.key"].shape[2] == 11


def test_logits_equal_ours_with_past(exported) -> None:
    """Five tokens first, then six more on the returned past: the second call's logits equal ours within 1e-4."""
    ckpt, _, session = exported
    model = lmforge.load(ckpt).model
    torch.manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :2] = 0
    with torch.no_grad():
        ours = model(ids, attention_mask=mask).numpy()
    _, past = run(session, ids[:, :5], mask[:, :5], empty_past(session, 2))
    theirs, _ = run(session, ids[:, 5:], mask, past)
    assert np.abs(theirs - ours[:, 5:]).max() <= 1e-4


def test_greedy_loop_over_onnxruntime_gives_our_tokens(exported) -> None:
    """Prefill, then one token per step through onnxruntime's cache: the tokens lmforge's greedy decoding picks."""
    ckpt, _, session = exported
    lm = lmforge.load(ckpt)
    prompt = lm.tokenizer.encode("the model learns to predict")
    ours = list(generate_tokens(lm.model, prompt, SamplingParams(max_new_tokens=12, temperature=0.0)))
    ids, past, theirs = torch.tensor([prompt]), empty_past(session, 1), []
    mask = torch.ones_like(ids)
    for _ in range(12):
        logits, past = run(session, ids, mask, past)
        ids = torch.tensor([[int(logits[0, -1].argmax())]])
        mask = torch.cat([mask, torch.ones(1, 1, dtype=torch.long)], dim=1)
        theirs.append(int(ids))
    assert theirs == ours
    stop = next((i for i, t in enumerate(theirs) if t in lm.tokenizer.stop_ids), len(theirs))
    assert lm.generate("the model learns to predict", temperature=0, max_new_tokens=12) == lm.tokenizer.decode(
        theirs[:stop], skip_special_tokens=True)


def test_cli_exports_and_refuses_a_nonempty_folder(make_checkpoint, tmp_path: Path, capsys) -> None:
    """`lmforge export onnx CKPT --out DIR` writes the folder; a second run without --overwrite is refused.
    `lmforge export hf` is `convert to-hf`."""
    ckpt = make_checkpoint("gpt2-tiny", out=tmp_path / "ckpt")
    assert main(["export", "hf", str(ckpt), "--out", str(tmp_path / "hf")]) == 0
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["model_type"] == "gpt2"
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "x-onnx")]) == 0
    assert (tmp_path / "x-onnx" / "model.onnx").stat().st_size > 0
    assert main(["export", "onnx", str(ckpt), "--out", str(tmp_path / "x-onnx")]) == 2
    assert "not empty" in capsys.readouterr().err
    with pytest.raises(CheckpointError, match="--overwrite"):
        export_onnx(ckpt, tmp_path / "x-onnx")


def test_lora_run_exports_merged(make_checkpoint, tmp_path: Path) -> None:
    """A LoRA run exports with its adapters folded in: onnxruntime's logits equal the LoRA model's within 1e-4."""
    from lmforge.checkpoint import attach_lora, load_model, save_adapter
    from lmforge.model.lora import LoRAConfig

    base = make_checkpoint("llama-tiny", out=tmp_path / "base", std=0.05, num_hidden_layers=2)
    loaded = load_model(base)
    adapter = attach_lora(loaded.model, LoRAConfig(r=4, targets=["q", "v", "up"]), base_int8=False, base=base)
    with torch.no_grad():
        for name, p in loaded.model.named_parameters():
            if ".lora_B" in name:
                p.normal_(0.0, 0.05)  # trained adapters are not zero
    save_adapter(tmp_path / "lora", loaded.model, adapter, tokenizer_dir=base,
                 generation_config=loaded.generation_config)
    out = export_onnx(tmp_path / "lora", tmp_path / "x-onnx")
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, loaded.config.vocab_size, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = lmforge.load(tmp_path / "lora").model(ids).numpy()
        plain = lmforge.load(base).model(ids).numpy()
    theirs, _ = run(session, ids, torch.ones_like(ids), empty_past(session, 1))
    assert np.abs(theirs - ours).max() <= 1e-4 < np.abs(theirs - plain).max()
