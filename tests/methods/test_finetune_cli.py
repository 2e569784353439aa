"""The fine-tuning verbs from the command line: same functions, same files, errors as `error: …` with exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import greedy_text

import lmforge
from lmforge.cli import main
from lmforge.tokenizer import IM_END

TRAIN = ["--max-steps", "2", "--batch-size", "2", "--block-size", "64", "--precision", "32", "--progress", "false"]


@pytest.fixture(scope="module")
def base(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("base"), std=None, num_hidden_layers=1,
                           max_position_embeddings=64)


@pytest.fixture(scope="module")
def alpaca(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "alpaca.jsonl"
    rows = [{"instruction": f"Name animal number {i}.", "input": "", "output": ["cat", "dog", "bird"][i % 3]}
            for i in range(12)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_lora_then_resume_then_merge_from_the_cli(base, alpaca, tmp_path, capsys):
    run = tmp_path / "lora"
    assert main(["finetune", "lora", "--model", str(base), "--data", str(alpaca), "--out", str(run),
                 "--lora-r", "4", "--lora-alpha", "8", "--lora-targets", "q,k,v,o", "--base-int8", "true", *TRAIN]) == 0
    config = json.loads((run / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["targets"] == ["q", "k", "v", "o"] and config["base_int8"] is True
    assert main(["finetune", "lora", "--resume", str(run), "--max-steps", "3", "--progress", "false"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps[-1] == 3
    assert main(["merge-lora", str(run), "--out", str(tmp_path / "merged")]) == 0  # as `lmforge merge-lora runs/lora`
    x = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # the merged checkpoint computes what the int8 base with its adapters computes
        merged, adapted, plain = (lmforge.load(p).model(x) for p in (tmp_path / "merged", run, base))
    torch.testing.assert_close(merged, adapted, atol=1e-4, rtol=1e-4)
    assert (merged - plain).abs().max() > 1e-3  # and it is not just the base again (measured: 0.017)


def test_full_finetune_from_the_cli_writes_a_loadable_checkpoint(base, alpaca, tmp_path):
    """The run holds the trained weights (not the base's), loads, and chats: its greedy reply is the argmax
    continuation of the chat prompt under those weights."""
    out = tmp_path / "full"
    assert main(["finetune", "full", "--model", str(base), "--data", str(alpaca), "--out", str(out),
                 "--train-on", "last", "--pack", "false", "--val-data", str(alpaca), *TRAIN]) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("val_loss" in r for r in records)
    lm, start = lmforge.load(out), lmforge.load(base).model.state_dict()
    assert all(not torch.equal(p, start[n]) for n, p in lm.model.state_dict().items())  # every tensor trained
    messages = [{"role": "user", "content": "Name an animal."}]
    stops = {lm.tokenizer.eos_id, lm.tokenizer.token_to_id(IM_END)}
    expected = greedy_text(lm.model, lm.tokenizer, lm.tokenizer.chat_ids(messages), 4, stops)
    assert lm.chat(messages, max_new_tokens=4, temperature=0) == expected


@pytest.mark.parametrize(("args", "message"), [
    (["--lora-targets", "q,nonexistent"], "LoRA target 'nonexistent' matches no layer"),
    (["--lora-r", "0"], "lora_r=0 must be at least 1"),
])
def test_bad_lora_settings_are_errors_naming_them(base, alpaca, tmp_path, capsys, args, message):
    code = main(["finetune", "lora", "--model", str(base), "--data", str(alpaca), "--out", str(tmp_path / "x"),
                 *args, *TRAIN])
    assert code == 2 and message in capsys.readouterr().err


def test_resume_with_another_verb_is_refused(base, alpaca, tmp_path, capsys):
    run = tmp_path / "full"
    assert main(["finetune", "full", "--model", str(base), "--data", str(alpaca), "--out", str(run), *TRAIN]) == 0
    assert main(["finetune", "lora", "--resume", str(run), "--progress", "false"]) == 2
    assert "not `finetune lora`" in capsys.readouterr().err


def test_full_finetune_resume_continues_exactly(base, alpaca, tmp_path):
    """2 steps, then --resume to 4, gives the weights of an uninterrupted 4-step run."""
    common = dict(batch_size=2, block_size=64, precision="32", progress=False, warmup_steps=1, lr=1e-3)
    full = lmforge.finetune_full(base, alpaca, tmp_path / "full", max_steps=4, **common)
    part = lmforge.finetune_full(base, alpaca, tmp_path / "part", max_steps=2, lr_decay_steps=4, **common)
    lmforge.finetune_full(resume=part, max_steps=4, progress=False)
    a, b = lmforge.load(full).model.state_dict(), lmforge.load(part).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
