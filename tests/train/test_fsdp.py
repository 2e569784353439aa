"""FSDP2 in one process (a group of one) and with activation checkpointing takes the steps of plain training,
fine-tuning methods train sharded, and a sharded run converts into the plain checkpoint every other verb reads.

Several processes (gloo, CPU) share torchrun launches, which cost seconds each, with the resume tests in
tests/train/test_sharded.py: FSDP over 2 processes (its `stopped` run, steps 1-4) and over 4 (the resume on 4,
steps 5-8, then converted), DDP over 4 (the DDP resume); DDP over 2 is in tests/train/test_loop.py. Each
compares losses and gradient norms with one process with the same global batch."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torchrun_helpers import RUN, assert_same_steps

import lmforge
from lmforge.checkpoint import load_train_state
from lmforge.cli import main
from lmforge.errors import CheckpointError

STEPS = 4


@pytest.fixture(scope="module")
def packed(tiny_packed: Path) -> Path:
    return tiny_packed


@pytest.fixture(scope="module")
def single(packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The reference: one process, batch 4."""
    return lmforge.pretrain(packed, out=tmp_path_factory.mktemp("single") / "run", max_steps=STEPS, batch_size=4,
                            **RUN)


def weights(run: Path) -> dict[str, torch.Tensor]:
    return lmforge.load(run).model.state_dict()


def test_fsdp_one_process_converts_to_the_plain_run(packed, single, tmp_path):
    """`--strategy fsdp` on one process (a group of one) writes a sharded run; `convert sharded` turns it into
    a plain checkpoint with the weights of plain training, which every verb loads."""
    run = lmforge.pretrain(packed, out=tmp_path / "fsdp", max_steps=STEPS, batch_size=4, strategy="fsdp", **RUN)
    assert not (run / "model.safetensors").exists()
    assert load_train_state(run)["sharded"] == f"sharded-{STEPS:08d}"
    with pytest.raises(CheckpointError, match="convert sharded"):
        lmforge.load(run)
    assert_same_steps(run, single, tol=1e-6)
    plain = tmp_path / "plain"
    assert main(["convert", "sharded", str(run), "--out", str(plain)]) == 0  # the README's command line
    ours, theirs = weights(plain), weights(single)
    for name, tensor in theirs.items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-6, rtol=0, msg=name)
    assert lmforge.load(plain).generate("the", max_new_tokens=3, temperature=0)


def test_activation_checkpointing_takes_the_same_steps(packed, single, tmp_path):
    """Recomputing each block in the backward pass, inside FSDP's gather / free of the block's parameters."""
    run = lmforge.pretrain(packed, out=tmp_path / "ac", max_steps=STEPS, batch_size=4, activation_checkpointing=True,
                           strategy="fsdp", **RUN)
    assert_same_steps(run, single, tol=1e-6)


@pytest.fixture(scope="module")
def base(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("base"), std=None, num_hidden_layers=2)


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory) -> Path:
    words = ["the", "cat", "sat", "on", "the", "mat", "while", "the", "dog", "slept", "by", "the", "warm", "fire"]
    path = tmp_path_factory.mktemp("sft") / "train.jsonl"
    path.write_text("".join(json.dumps({"instruction": f"Say {k} words.", "output": " ".join(words[:k])}) + "\n"
                            for k in range(1, 13)))
    return path


@pytest.mark.parametrize("method", ["lora", "classify"])
def test_fine_tuning_methods_train_sharded(method, base, sft_data, tmp_path):
    """LoRA (a frozen base beside trained adapters in one FSDP unit) and a classification head train under
    `--strategy fsdp` as they do plainly; the converted run holds the same trained weights."""
    settings = dict(max_steps=3, batch_size=4, precision="32", log_every=1, progress=False, seed=1, lr=1e-2)

    def run(name: str, **strategy) -> Path:
        if method == "lora":
            return lmforge.finetune_lora(base, sft_data, out=tmp_path / name, **settings, **strategy)
        return lmforge.finetune_classify(base, labelled, out=tmp_path / name, **settings, **strategy)

    labelled = tmp_path / "labels.csv"
    words = ["cat", "dog", "mat", "fire", "sun", "sea", "sky"] * 2
    labelled.write_text("text,label\n" + "".join(f"a {w} sat,{'a' if i % 2 else 'b'}\n" for i, w in enumerate(words)))
    plain, sharded = run("plain"), run("sharded", strategy="fsdp")
    assert [r["loss"] for r in map(json.loads, (sharded / "metrics.jsonl").read_text().splitlines())] == \
        pytest.approx([r["loss"] for r in map(json.loads, (plain / "metrics.jsonl").read_text().splitlines())],
                      abs=1e-5)
    ours = lmforge.load(lmforge.convert_sharded(sharded, tmp_path / "converted")).model.state_dict()
    for name, tensor in lmforge.load(plain).model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, atol=1e-5, rtol=0, msg=name)
