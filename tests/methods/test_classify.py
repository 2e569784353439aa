"""Sequence heads: pooling on decoders and encoders, classify / regress / predict verbs, their errors and resume."""

from __future__ import annotations

import csv
import json
import random
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import random_gpt

import lmforge
from lmforge.checkpoint import load_model
from lmforge.errors import DataError
from lmforge.model.bert import Encoder, EncoderConfig
from lmforge.model.heads import HeadConfig, SequenceHead, head_loss

SMALL = dict(batch_size=8, warmup_steps=2, precision="32", log_every=1, progress=False, max_length=32)
ANIMALS = ["cat", "dog", "horse", "bird", "fish"]
THINGS = ["table", "window", "token", "layer", "batch"]
FILLER = ["the", "a", "on", "mat", "sat", "while", "for", "in", "and", "to", "from", "next", "context", "data"]


def write_csv(path: Path, rows: list[dict]) -> Path:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return path


def labelled_rows(per_word: int, seed: int) -> list[dict]:
    """Each word of ANIMALS + THINGS in `per_word` random sentences of filler words; the label says which list it
    is from and the score is its length, so only that one word decides both."""
    rng = random.Random(seed)
    rows = []
    for w in ANIMALS + THINGS:
        for _ in range(per_word):
            words = rng.choices(FILLER, k=5)
            words.insert(rng.randrange(6), w)
            rows.append({"text": " ".join(words), "label": "animal" if w in ANIMALS else "thing", "score": len(w)})
    return rows


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    """Texts that mention an animal or a thing; the label says which."""
    return write_csv(tmp_path_factory.mktemp("labelled") / "train.csv", labelled_rows(4, seed=0))


@pytest.fixture(scope="module")
def held_out(tmp_path_factory, labelled) -> Path:
    """The same words in other sentences: none of these texts is in the training file."""
    rows = labelled_rows(4, seed=1)
    with open(labelled, newline="") as f:
        assert not {r["text"] for r in rows} & {r["text"] for r in csv.DictReader(f)}
    return write_csv(tmp_path_factory.mktemp("held_out") / "test.csv", rows)


@pytest.fixture(scope="module")
def decoder(make_checkpoint, tmp_path_factory) -> Path:
    return make_checkpoint("gpt2-tiny", out=tmp_path_factory.mktemp("dec"), std=None, max_position_embeddings=64)


def test_decoder_pools_the_last_real_token_whatever_the_padding(tiny_tokenizer):
    """A right-padded row's pooled vector is the hidden state of its last token computed without padding."""
    gpt = random_gpt("llama-tiny", tiny_tokenizer.vocab_size, num_hidden_layers=2)
    head = SequenceHead(gpt, HeadConfig(task="classify", labels=["a", "b"], pooling="last")).eval()
    short, long = [5, 6, 7], [8, 9, 10, 11, 12, 13]
    ids = torch.tensor([short + [0] * 3, long])
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1] * 6])
    with torch.no_grad():
        pooled = head.pooled(ids, mask)
        torch.testing.assert_close(pooled[0], gpt.hidden(torch.tensor([short]))[0, -1], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled[1], gpt.hidden(torch.tensor([long]))[0, -1], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_encoder_pooling_ignores_padding(pooling):
    torch.manual_seed(0)
    encoder = Encoder(EncoderConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=16))
    head = SequenceHead(encoder, HeadConfig(task="classify", labels=["a", "b", "c"], pooling=pooling)).eval()
    ids = torch.tensor([[1, 5, 6, 2, 0, 0], [1, 5, 6, 2, 9, 9]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    with torch.no_grad():
        pooled = head.pooled(ids, mask)
        alone = encoder(ids[:1, :4])
    expected = alone[0, 0] if pooling == "cls" else alone[0].mean(0)
    torch.testing.assert_close(pooled[0], expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pooled[1], expected, atol=1e-5, rtol=1e-5)  # what sits in the padding is unseen


def test_class_weights_weigh_the_cross_entropy(tiny_tokenizer):
    """Σ w_y·nll / Σ w_y, as the weighted cross-entropy of the papers and scikit-learn's sample weights."""
    gpt = random_gpt("gpt2-tiny", tiny_tokenizer.vocab_size)
    head = SequenceHead(gpt, HeadConfig(task="classify", labels=["a", "b"], dropout=0.0)).eval()
    x = {"input_ids": torch.tensor([[5, 6, 7], [8, 9, 10]]), "attention_mask": torch.ones(2, 3, dtype=torch.long)}
    y = torch.tensor([0, 1])
    weights = torch.tensor([1.0, 3.0])
    with torch.no_grad():
        nll = -F.log_softmax(head(x["input_ids"], x["attention_mask"]), -1)[torch.arange(2), y]
        weighted_sum, weight = head_loss(head, x, y, task="classify", class_weights=weights)
        plain_sum, count = head_loss(head, x, y, task="classify")
    weighted, plain = (weighted_sum / weight).item(), (plain_sum / count).item()
    assert weighted == pytest.approx(((weights[y] * nll).sum() / weights[y].sum()).item(), rel=1e-5)
    assert plain == pytest.approx(nll.mean().item(), rel=1e-5)


def test_classify_learns_and_predict_writes_probabilities(decoder, labelled, held_out, tmp_path):
    """Trained on 40 texts, the classifier labels 40 unseen ones well above chance (0.5): it learned the word."""
    run = lmforge.finetune_classify(decoder, labelled, tmp_path / "clf", max_steps=30, lr=3e-3,
                                    class_weights="balanced", **SMALL)
    assert {"model.safetensors", "head.safetensors", "head_config.json", "tokenizer.json"} <= {
        p.name for p in run.iterdir()}
    scores = lmforge.predict(run, held_out, tmp_path / "pred.jsonl")
    # Measured 0.875 here, and 0.78 to 0.88 from other random initialisations of the decoder.
    assert scores["rows"] == 40 and scores["accuracy"] >= 0.75 and scores["macro_f1"] >= 0.75
    lines = [json.loads(line) for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert lines[0]["line"] == 2 and set(lines[0]["probabilities"]) == {"animal", "thing"}
    assert all(abs(sum(r["probabilities"].values()) - 1) < 1e-4 for r in lines)
    assert all(r["label"] == max(r["probabilities"], key=r["probabilities"].get) for r in lines)


def test_regress_fits_with_mse_and_predicts_in_target_units(decoder, labelled, held_out, tmp_path):
    """On unseen texts the predicted word lengths beat the best constant (the mean, 4.5: MAE 0.8) by a margin."""
    run = lmforge.finetune_regress(decoder, labelled, tmp_path / "reg", target_field="score", max_steps=60, lr=3e-3,
                                   **SMALL)
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert sum(losses[-5:]) / 5 < 0.5 * sum(losses[:5]) / 5  # MSE on standardized targets falls
    scores = lmforge.predict(run, held_out, tmp_path / "pred.jsonl")
    preds = [json.loads(line)["prediction"] for line in (tmp_path / "pred.jsonl").read_text().splitlines()]
    assert 2 < sum(preds) / len(preds) < 7  # word lengths are 3..6: de-standardized, not z-scores
    assert scores["mae"] < 0.6  # measured 0.44 here, 0.21 to 0.54 from other initialisations


def test_label_outside_the_declared_set_names_line_and_label(decoder, labelled, tmp_path):
    with pytest.raises(DataError, match=r"train\.csv:\d+: label 'thing' is not one of the declared labels"):
        lmforge.finetune_classify(decoder, labelled, tmp_path / "clf", labels=["animal", "plant"], max_steps=1, **SMALL)
    bad = write_csv(tmp_path / "bad.csv", [{"text": "a cat", "score": "3"}, {"text": "a dog", "score": "many"}])
    with pytest.raises(DataError, match=r"bad\.csv:3: field 'score' is 'many', not a number"):
        lmforge.finetune_regress(decoder, bad, tmp_path / "reg", max_steps=1, **SMALL)


def test_classify_resume_continues_exactly(decoder, labelled, tmp_path):
    full = lmforge.finetune_classify(decoder, labelled, tmp_path / "full", max_steps=8, lr=1e-3, **SMALL)
    part = lmforge.finetune_classify(decoder, labelled, tmp_path / "part", max_steps=4, lr=1e-3, lr_decay_steps=8,
                                     **SMALL)
    lmforge.finetune_classify(resume=part, max_steps=8, progress=False)
    a, b = (load_model(run).model.state_dict() for run in (full, part))
    assert all(torch.equal(a[k], b[k]) for k in a)
