"""Refusals instead of silent wrong results: data packed with another tokenizer than the model's, options
given with --resume, and a classifier evaluated on a task whose labels it does not have."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import ClassVar

import pytest
from conftest import TINY_VOCAB, tiny_documents, write_jsonl

import lmforge
from lmforge.checkpoint import load_train_state
from lmforge.cli import main
from lmforge.data.pack import pack
from lmforge.errors import DataError
from lmforge.tokenizer import Tokenizer, train_tokenizer

TASKS = Path(__file__).resolve().parents[2] / "tasks"
SHORT = ["--block-size", "32", "--batch-size", "4", "--precision", "32", "--progress", "false"]


@pytest.fixture(scope="module")
def other_packed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A corpus packed with tokenizer B: same vocabulary size as the tiny tokenizer A, other merges."""
    root = tmp_path_factory.mktemp("other")
    docs = tiny_documents(seed=7)
    corpus = write_jsonl(root / "corpus" / "b.jsonl", docs + [d.upper() for d in docs])
    tok = train_tokenizer(corpus, root / "tok_b", vocab_size=TINY_VOCAB)
    return pack(corpus, tok, root / "packed_b", val_fraction=0.2, workers=1)


def test_pack_records_the_tokenizer_hash(tiny_packed: Path, tiny_tokenizer: Tokenizer) -> None:
    meta = json.loads((tiny_packed / "meta.json").read_text())
    assert meta["tokenizer_hash"] == tiny_tokenizer.fingerprint == Tokenizer.load(tiny_packed / "tokenizer").fingerprint


def test_pretrain_refuses_data_packed_with_another_tokenizer(make_checkpoint, other_packed: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    """Same vocabulary size, other token ids: refused by the tokenizer hash, naming both, nothing written."""
    model_a = make_checkpoint("gpt2-tiny", out=tmp_path / "a", max_position_embeddings=64)
    assert Tokenizer.load(model_a).vocab_size == Tokenizer.load(other_packed / "tokenizer").vocab_size
    out = tmp_path / "run"
    assert main(["pretrain", "--data", str(other_packed), "--model", str(model_a), "--out", str(out),
                 "--max-steps", "1", *SHORT]) == 2
    err = capsys.readouterr().err
    assert str(other_packed) in err and str(model_a) in err and "another tokenizer" in err
    assert Tokenizer.load(other_packed / "tokenizer").fingerprint in err and Tokenizer.load(model_a).fingerprint in err
    assert not out.exists()


def test_pretrain_continues_a_checkpoint_on_data_packed_with_its_tokenizer(make_checkpoint, tiny_packed: Path,
                                                                          tmp_path: Path) -> None:
    model_a = make_checkpoint("gpt2-tiny", out=tmp_path / "a", max_position_embeddings=64)
    run = lmforge.pretrain(tiny_packed, model=str(model_a), out=tmp_path / "run", max_steps=1, block_size=32,
                           batch_size=4, precision="32", progress=False)
    assert load_train_state(run)["step"] == 1


@pytest.fixture(scope="module")
def stopped_run(tiny_packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    run = tmp_path_factory.mktemp("resume") / "a"
    assert main(["pretrain", "--data", str(tiny_packed), "--model", "gpt2-tiny", "--out", str(run),
                 "--max-steps", "1", "--lr", "0.01", *SHORT]) == 0
    return run


@pytest.mark.parametrize("changed", [
    ["--lr", "0.02"],
    ["--batch-size", "2"],
    ["--lr", "0.0003"],  # the default value, given explicitly: still a change from this run's 0.01
    ["--block-size", "16"],  # the method's own options too
    ["--model", "llama-tiny"],
    ["--init", "xavier"],
])
def test_resume_refuses_every_changed_option_by_name(stopped_run: Path, changed: list[str],
                                                      capsys: pytest.CaptureFixture) -> None:
    """`pretrain --resume runs/a --lr 0.01 --batch-size 2`: never silently ignored."""
    step = load_train_state(stopped_run)["step"]
    assert main(["pretrain", "--resume", str(stopped_run), "--max-steps", "2", *changed]) == 2
    err = capsys.readouterr().err
    assert f"{changed[0]} {changed[1]}" in err.replace("_", "-") and "was started with" in err
    assert load_train_state(stopped_run)["step"] == step


def test_resume_accepts_the_run_own_values_and_new_limits(stopped_run: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture) -> None:
    """A new limit is applied and logged as changed; the run's own values given again are accepted."""
    run = tmp_path / "copy"
    shutil.copytree(stopped_run, run)
    assert main(["pretrain", "--resume", str(run), "--max-steps", "2", "--lr", "0.01", "--batch-size", "4"]) == 0
    assert load_train_state(run)["step"] == 2
    assert f"resuming {run} with --max-steps 2 (was 1)" in capsys.readouterr().err


class FixedLabels:
    """A classifier (the harness's `predict` protocol) whose labels are its own, declared up front."""

    labels: ClassVar[list[str] | None] = ["animal", "thing"]

    def predict(self, texts: list[str]) -> list[tuple[str, dict[str, float]]]:
        return [("animal", {"animal": 0.6, "thing": 0.4}) for _ in texts]


class Undeclared(FixedLabels):
    """The same classifier without a `labels` attribute: the labels are read off its predictions."""

    labels: ClassVar[list[str] | None] = None


@pytest.mark.parametrize("classifier", [FixedLabels(), Undeclared()], ids=["declared", "from-predictions"])
def test_eval_refuses_a_classifier_whose_labels_miss_the_task(classifier, tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"sentiment.yaml: the task's labels \['negative', 'positive'\] "
                                                       r"and the labels of .* \['animal', 'thing'\] have nothing"):
        lmforge.evaluate(model=classifier, tasks=TASKS / "sentiment.yaml", progress=False)


def test_eval_cli_names_both_label_sets_for_a_head_run(make_checkpoint, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture) -> None:
    """The real path: a `finetune classify` run trained on animal/thing labels, evaluated on sentiment."""
    data = tmp_path / "animals.csv"
    data.write_text("text,label\n" + "".join(f"the {w} sat,{'animal' if i % 2 else 'thing'}\n"
                                            for i, w in enumerate(["cat", "mat", "dog", "box"] * 4)))
    base = make_checkpoint("gpt2-tiny", out=tmp_path / "base", max_position_embeddings=64)
    run = lmforge.finetune_classify(base, data, tmp_path / "cls", max_steps=1, batch_size=4, max_length=16,
                                    precision="32", progress=False)
    assert main(["eval", "--model", str(run), "--tasks", str(TASKS / "sentiment.yaml"), "--progress", "false"]) == 2
    err = capsys.readouterr().err
    assert "['negative', 'positive']" in err and "['animal', 'thing']" in err and str(run) in err


def test_eval_warns_when_some_task_labels_are_unknown(tmp_path: Path) -> None:
    class Partial(FixedLabels):
        labels: ClassVar[list[str] | None] = ["positive", "neutral"]

    with pytest.warns(UserWarning, match=r"labels \['negative'\] never come out of"):
        summary = lmforge.evaluate(model=Partial(), tasks=TASKS / "sentiment.yaml", progress=False)
    assert "sentiment" in summary
