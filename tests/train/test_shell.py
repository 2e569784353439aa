"""The training shell: shared options on every verb, per-token gradient accumulation, real-token throughput,
epochs, refusals on resume, and TensorBoard."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import load_train_state
from lmforge.cli import main
from lmforge.data.labelled import read_labelled
from lmforge.data.pack import PackedDataset
from lmforge.data.sft import load_sft
from lmforge.errors import ConfigError
from lmforge.model.heads import encode_texts, pad_id
from lmforge.tokenizer import Tokenizer
from lmforge.train.loaders import LabelledLoader, SFTLoader, WindowLoader
from lmforge.train.losses import IGNORE_INDEX

# One plain SGD step (update = 1.9·lr·gradient with Nesterov momentum 0.9) shows the gradient itself.
ONE_STEP = dict(max_steps=1, optimizer="sgd", lr=1.0, warmup_steps=0, weight_decay=0.0, grad_clip=None,
                precision="32", log_every=1, progress=False)
WORDS = ["the", "cat", "sat", "on", "the", "mat", "while", "the", "dog", "slept", "by", "the", "warm", "fire", "all",
         "day", "long"]


@pytest.fixture(scope="module")
def base(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("llama-tiny", out=tmp_path_factory.mktemp("base"), std=None, num_hidden_layers=1,
                           max_position_embeddings=256)


@pytest.fixture(scope="module")
def uneven(tmp_path_factory) -> Path:
    """SFT rows whose replies have 1 to 16 words: micro-batches hold very different numbers of targets."""
    path = tmp_path_factory.mktemp("sft") / "uneven.jsonl"
    rows = [{"instruction": f"Say {k} words.", "output": " ".join(WORDS[:k])} for k in range(1, 17)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("labelled") / "train.csv"
    rows = [f"the {w} sat {'on the mat ' * (i % 4)}today,{'animal' if i % 2 else 'thing'}"
            for i, w in enumerate(WORDS * 3)]
    path.write_text("text,label\n" + "\n".join(rows) + "\n")
    return path


def weights(run: Path) -> dict[str, torch.Tensor]:
    return lmforge.load(run).model.state_dict()


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("method", ["pretrain", "sft"])
def test_grad_accum_gives_the_gradient_of_the_whole_batch(method, tiny_packed, base, uneven, tmp_path):
    """2 micro-batches of 4 take the step of one batch of 8, to 1e-6 in fp32, even when the micro-batches
    hold different numbers of target tokens (SFT, one example per window): the loss is a mean per target."""
    def run(name: str, batch_size: int, grad_accum: int) -> Path:
        settings = dict(out=tmp_path / name, batch_size=batch_size, grad_accum=grad_accum, **ONE_STEP)
        if method == "pretrain":
            return lmforge.pretrain(tiny_packed, model="gpt2-tiny", block_size=32, **settings)
        return lmforge.finetune_full(base, uneven, pack=False, block_size=64, **settings)

    whole, accumulated = run("whole", 8, 1), run("accumulated", 4, 2)
    assert metrics(accumulated)[0]["loss"] == pytest.approx(metrics(whole)[0]["loss"], abs=1e-6)
    a, b = weights(whole), weights(accumulated)
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=1e-6, rtol=0, msg=name)


def test_sft_tokens_count_targets_not_padding(base, uneven, tmp_path):
    """metrics.jsonl's tokens (hence tokens/s, MFU, --max-tokens) are the batches' targets, not their padding."""
    run = lmforge.finetune_full(base, uneven, tmp_path / "run", pack=False, block_size=64, batch_size=2,
                                max_steps=2, precision="32", log_every=1, progress=False)
    tokenizer = Tokenizer.load(base)
    loader = SFTLoader(load_sft(uneven, tokenizer, max_length=65), 64, 2, 0, pack=False)
    expected = [int((loader.next_batch()[1] != IGNORE_INDEX).sum()) for _ in range(2)]
    assert [r["tokens"] for r in metrics(run) if "loss" in r] == [expected[0], sum(expected)]
    assert sum(expected) < 2 * 2 * 64 / 2  # most of each window is padding: the old count was 256


def test_head_tokens_count_unpadded_text(make_checkpoint, labelled, tmp_path):
    decoder = make_checkpoint("gpt2-tiny", out=tmp_path / "decoder", std=None, max_position_embeddings=64)
    run = lmforge.finetune_classify(decoder, labelled, tmp_path / "run", max_steps=1, batch_size=8,
                                    max_length=32, precision="32", log_every=1, progress=False)
    tokenizer = Tokenizer.load(decoder)
    rows = read_labelled(labelled, "text", "label", "classify")
    ids = encode_texts(tokenizer, [t for _, t, _ in rows], 32, encoder=False)
    x, _ = LabelledLoader(ids, torch.zeros(len(ids)), 8, pad_id(tokenizer)).next_batch()
    assert metrics(run)[0]["tokens"] == int(x["attention_mask"].sum()) < x["attention_mask"].numel()


def test_finetune_without_a_limit_trains_three_epochs(make_checkpoint, labelled, tmp_path, capsys):
    """As Hugging Face's Trainer: `finetune classify --model M --data D --out O` needs no step count."""
    decoder = make_checkpoint("gpt2-tiny", out=tmp_path / "decoder", std=None, max_position_embeddings=64)
    out = tmp_path / "run"
    assert main(["finetune", "classify", "--model", str(decoder), "--data", str(labelled), "--out", str(out),
                 "--max-length", "32", "--precision", "32", "--progress", "false"]) == 0
    batches_per_epoch = len(read_labelled(labelled, "text", "label", "classify")) // 16  # default batch_size 16
    assert load_train_state(out)["step"] == 3 * batches_per_epoch
    assert "stopped by epochs" in capsys.readouterr().err


def test_epochs_round_up_to_whole_optimizer_steps(tiny_packed, tmp_path):
    per_epoch = WindowLoader(PackedDataset(tiny_packed, "train"), 32, 4).batches_per_epoch
    run = lmforge.pretrain(tiny_packed, model="gpt2-tiny", out=tmp_path / "run", block_size=32, batch_size=4,
                           grad_accum=2, epochs=0.5, precision="32", progress=False)
    assert load_train_state(run)["step"] == math.ceil(0.5 * per_epoch / 2)


def test_resume_refuses_another_out_naming_both(tiny_packed, tmp_path):
    run = lmforge.pretrain(tiny_packed, model="gpt2-tiny", out=tmp_path / "a", block_size=32, batch_size=4,
                           max_steps=1, precision="32", progress=False)
    with pytest.raises(ConfigError, match=r"--out .*/b with --resume .*/a"):
        lmforge.pretrain(resume=run, out=tmp_path / "b", max_steps=2, progress=False)
    assert not (tmp_path / "b").exists()


def test_resume_refuses_a_changed_setting_by_name_and_takes_new_limits(base, uneven, tmp_path, capsys):
    run = tmp_path / "run"
    common = ["--precision", "32", "--progress", "false", "--block-size", "64", "--batch-size", "2"]
    assert main(["finetune", "full", "--model", str(base), "--data", str(uneven), "--out", str(run),
                 "--max-steps", "1", *common]) == 0
    for changed, name in ((["--lr", "0.1"], "--lr"), (["--pack", "false"], "--pack"),
                          (["--batch-size", "4"], "--batch-size")):
        assert main(["finetune", "full", "--resume", str(run), "--max-steps", "2", *changed]) == 2
        assert f"{name} " in capsys.readouterr().err
    # the settings as given before are no change; the limits are new
    assert main(["finetune", "full", "--resume", str(run), "--max-steps", "100", "--epochs", "1", *common]) == 0
    per_epoch = SFTLoader(load_sft(uneven, Tokenizer.load(base), max_length=65), 64, 2, 0).batches_per_epoch
    assert load_train_state(run)["step"] == per_epoch
    assert "stopped by epochs" in capsys.readouterr().err


def test_tensorboard_logger_writes_the_loss_scalar(tiny_packed, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = lmforge.pretrain(tiny_packed, model="gpt2-tiny", out=tmp_path / "run", block_size=32, batch_size=4,
                           max_steps=3, log_every=1, logger="tensorboard", precision="32", progress=False)
    assert (run / "metrics.jsonl").exists() and list((run / "tensorboard").glob("events.out.tfevents.*"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    assert {"loss", "lr", "tokens_per_s", "val_loss"} <= set(events.Tags()["scalars"])
    assert [(e.step, round(e.value, 5)) for e in events.Scalars("loss")] == [
        (r["step"], round(r["loss"], 5)) for r in metrics(run) if "loss" in r]


@pytest.mark.parametrize(("verb", "lr"), [(["pretrain"], "0.0003"), (["finetune", "full"], "2e-05"),
                                          (["finetune", "lora"], "0.0002"), (["finetune", "classify"], "5e-05")])
def test_every_training_verb_has_the_short_flags_with_its_defaults(verb, lr, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "500")
    with pytest.raises(SystemExit):
        main([*verb, "--help"])
    out = capsys.readouterr().out
    assert f"--lr LR Peak learning rate after warmup. (type: float, default: {lr})" in " ".join(out.split())
    for flag in ("--max-steps", "--epochs", "--batch-size", "--grad-accum", "--logger", "--resume"):
        assert flag in out
