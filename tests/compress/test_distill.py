"""`lmforge compress distill`: the loss against a hand computation, the vocabulary check, and a student that
moves toward its teacher."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.compress.distill import distill
from lmforge.data.pack import PackedDataset, pack
from lmforge.errors import ConfigError
from lmforge.tokenizer import train_tokenizer
from lmforge.train.loaders import WindowLoader
from lmforge.train.losses import IGNORE_INDEX, distillation_loss

SMALL = dict(block_size=32, batch_size=4, warmup_steps=0, precision="32", progress=False)


def softmax(row: list[float], t: float) -> list[float]:
    e = [math.exp(v / t) for v in row]
    return [v / sum(e) for v in e]


@pytest.mark.parametrize("reverse", [False, True])
def test_distillation_loss_equals_a_hand_computed_reference(reverse):
    """α·T²·Σ KL + (1 − α)·Σ CE over the two counted positions; the third (IGNORE_INDEX) costs nothing."""
    student = [[1.0, 2.0, 0.5], [0.0, -1.0, 3.0], [9.0, 9.0, 9.0]]
    teacher = [[2.0, 0.0, 1.0], [1.0, 1.0, 1.0], [0.0, 5.0, 0.0]]
    targets = [1, 2, IGNORE_INDEX]
    t, alpha = 2.0, 0.3
    expected = 0.0
    for s_row, t_row, y in zip(student[:2], teacher[:2], targets[:2]):
        p_s, p_t = softmax(s_row, t), softmax(t_row, t)
        p, q = (p_s, p_t) if reverse else (p_t, p_s)
        kl = sum(a * math.log(a / b) for a, b in zip(p, q))
        ce = -math.log(softmax(s_row, 1.0)[y])
        expected += alpha * t * t * kl + (1 - alpha) * ce
    loss, count = distillation_loss(torch.tensor([student]), torch.tensor([teacher]), torch.tensor([targets]),
                                    temperature=t, alpha=alpha, reverse=reverse)
    assert count == 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_student_of_another_vocabulary_is_refused_by_name(make_checkpoint, tiny_corpus, tmp_path):
    teacher = make_checkpoint("gpt2-tiny", out=tmp_path / "teacher", num_hidden_layers=1, max_position_embeddings=64)
    other_tokenizer = train_tokenizer(tiny_corpus, tmp_path / "tok", vocab_size=300)
    data = pack(tiny_corpus, other_tokenizer, tmp_path / "packed", val_fraction=0.2, workers=1)
    with pytest.raises(ConfigError, match=r"--teacher .* have different vocabularies"):
        distill(teacher, "gpt2-tiny", data, tmp_path / "student", max_steps=1, **SMALL)


def kl_to_teacher(student: Path, teacher: Path, data: Path) -> float:
    """Mean KL(teacher ‖ student) per token on the validation windows, at T = 1."""
    x, _ = WindowLoader(PackedDataset(data, "val"), 32, 8, shuffle=False).next_batch()
    with torch.no_grad():
        log_s = lmforge.load(student).model(x).log_softmax(-1)
        log_t = lmforge.load(teacher).model(x).log_softmax(-1)
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean().item()


def test_distilled_student_moves_toward_its_teacher(make_checkpoint, tiny_packed, tmp_path):
    """A briefly trained 2-layer llama teacher and a smaller GPT-2-shaped student: 10 steps of pure distillation
    bring KL(teacher ‖ student) on held-out windows to under half of what 1 step leaves."""
    start = make_checkpoint("llama-tiny", out=tmp_path / "start", std=None, num_hidden_layers=2,
                            max_position_embeddings=64)
    teacher = lmforge.pretrain(tiny_packed, str(start), tmp_path / "teacher", max_steps=12, lr=3e-3, **SMALL)
    common = dict(temperature=1.0, alpha=1.0, lr=3e-3, **SMALL)
    early = distill(teacher, "gpt2-tiny", tiny_packed, tmp_path / "early", max_steps=1, **common)
    late = distill(teacher, "gpt2-tiny", tiny_packed, tmp_path / "late", max_steps=10, **common)
    assert kl_to_teacher(late, teacher, tiny_packed) < 0.5 * kl_to_teacher(early, teacher, tiny_packed)


def test_distill_cli_and_resume(make_checkpoint, tiny_packed, tmp_path):
    teacher = make_checkpoint("gpt2-tiny", out=tmp_path / "teacher", num_hidden_layers=1, max_position_embeddings=64)
    out = tmp_path / "student"
    assert main(["compress", "distill", "--teacher", str(teacher), "--student", "gpt2-tiny", "--data",
                 str(tiny_packed), "--kl", "reverse", "--max-steps", "2", "--block-size", "32", "--batch-size", "2",
                 "--progress", "false", "--out", str(out)]) == 0
    assert main(["compress", "distill", "--resume", str(out), "--max-steps", "3", "--progress", "false"]) == 0
    assert lmforge.load(out).config.vocab_size == lmforge.load(teacher).config.vocab_size
