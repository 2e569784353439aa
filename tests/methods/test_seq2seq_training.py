"""Encoder-decoder training through the one loop: batches, masks, the loss on real target tokens, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import lmforge
from lmforge.checkpoint import load_train_state
from lmforge.data.pairs import pairs
from lmforge.errors import ConfigError, DataError
from lmforge.methods.seq2seq import Seq2SeqLoader
from lmforge.model.seq2seq import Seq2Seq, seq2seq_preset
from lmforge.tokenizer import train_tokenizer
from lmforge.train.losses import IGNORE_INDEX, seq2seq_loss

PAD, START, EOS = 1, 2, 0


def examples(n: int = 40, seed: int = 0) -> list[tuple[list[int], list[int]]]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):  # target lengths follow source lengths, as translations' do
        s = int(torch.randint(1, 20, (1,), generator=g))
        t = max(1, s + int(torch.randint(-2, 3, (1,), generator=g)))
        out.append((torch.randint(5, 50, (s,), generator=g).tolist(), torch.randint(5, 50, (t,), generator=g).tolist()))
    return out


def loader(data, batch_size=4, **kw) -> Seq2SeqLoader:
    return Seq2SeqLoader(data, batch_size, pad_id=PAD, start_id=START, eos_id=EOS, **kw)


def test_batch_is_teacher_forced_and_masked():
    data = [([7, 8, 9], [10, 11]), ([12], [13, 14, 15, 16])]
    x, y = loader(data, batch_size=2).collate(data)
    assert x["src"].tolist() == [[7, 8, 9], [12, PAD, PAD]]
    assert x["src_mask"].tolist() == [[True, True, True], [True, False, False]]
    assert x["tgt_in"].tolist() == [[START, 10, 11, PAD, PAD], [START, 13, 14, 15, 16]]
    assert y.tolist() == [[10, 11, EOS, IGNORE_INDEX, IGNORE_INDEX], [13, 14, 15, 16, EOS]]


def test_every_pair_once_an_epoch_and_bucketing_cuts_padding():
    data = examples(200)
    bucketed, plain = loader(data, 8), loader(data, 8, bucket=False)
    seen = []
    for _ in range(bucketed.batches_per_epoch):
        x, _ = bucketed.next_batch()
        seen += [tuple(row[mask].tolist()) for row, mask in zip(x["src"], x["src_mask"])]
    assert sorted(seen) == sorted(tuple(s) for s, _ in data)
    assert bucketed.epoch == 1
    assert bucketed.padding_fraction() < 0.5 * plain.padding_fraction()


def test_ranks_split_each_global_batch():
    data = examples(64)
    one = loader(data, 8)
    ranks = [loader(data, 4, rank=r, world_size=2) for r in (0, 1)]
    for _ in range(3):
        _, y = one.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert sorted(map(tuple, y.tolist())) == sorted(tuple(row) for _, py in parts for row in
                                                        F.pad(py, (0, y.shape[1] - py.shape[1]),
                                                              value=IGNORE_INDEX).tolist())


def test_loader_resumes_at_the_exact_batch():
    data = examples(60)
    a = loader(data, 4, seed=3)
    for _ in range(20):  # into the second epoch
        a.next_batch()
    b = loader(data, 4, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(5):
        (xa, ya), (xb, yb) = a.next_batch(), b.next_batch()
        assert torch.equal(xa["src"], xb["src"]) and torch.equal(ya, yb)
    with pytest.raises(DataError, match="the run had batch_size=4, this one has batch_size=5"):
        loader(data, 5, seed=3).load_state_dict(a.state_dict())


def tiny_model(**kw) -> Seq2Seq:
    torch.manual_seed(0)
    return Seq2Seq(seq2seq_preset("seq2seq-tiny", vocab_size=64, pad_id=PAD, decoder_start_id=START, eos_id=EOS,
                                  **kw))


def test_padding_changes_no_loss():
    """A batch of a short and a long pair costs the sum of each pair alone: padding is masked in the encoder,
    and padded labels cost nothing."""
    model = tiny_model().eval()
    data = [([7, 8, 9, 10, 11, 12], [20, 21]), ([13], [22, 23, 24, 25, 26])]
    lo = loader(data, batch_size=2)
    together, count = seq2seq_loss(model, *lo.collate(data))
    alone = [seq2seq_loss(model, *lo.collate([d])) for d in data]
    assert int(count) == 3 + 6
    assert torch.allclose(together, sum(a for a, _ in alone), atol=1e-4)


def test_label_smoothing_in_training_only():
    model = tiny_model(label_smoothing=0.1, dropout=0.0)
    data = examples(4)
    x, y = loader(data, 4).collate(data)
    logits = model(x["src"], x["src_mask"], x["tgt_in"])
    keep = y != IGNORE_INDEX
    smoothed = F.cross_entropy(logits[keep], y[keep], label_smoothing=0.1, reduction="sum")
    plain = F.cross_entropy(logits[keep], y[keep], reduction="sum")
    assert torch.allclose(seq2seq_loss(model.train(), x, y)[0], smoothed, atol=1e-4)
    assert torch.allclose(seq2seq_loss(model.eval(), x, y)[0], plain, atol=1e-4)
    assert not torch.allclose(smoothed, plain)


# ---- through the shell ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pairs_and_tok(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("s2s")
    words = ["the", "cat", "dog", "sees", "a", "big", "small", "red", "house", "tree", "runs"]
    spanish = dict(zip(words, ["el", "gato", "perro", "ve", "un", "grande", "pequeño", "rojo", "casa", "árbol",
                               "corre"]))
    g = torch.Generator().manual_seed(1)
    rows = []
    for _ in range(240):
        sentence = [words[int(i)] for i in torch.randint(0, len(words), (int(torch.randint(2, 7, (1,), generator=g)),),
                                                             generator=g)]
        rows.append({"source": " ".join(sentence), "target": " ".join(spanish[w] for w in sentence)})
    (root / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    data = pairs(root / "pairs", source=root / "d.jsonl", valid=0.1, test=0.1)
    tok = train_tokenizer(data, root / "tok", fields="source,target", vocab_size=300)
    return data, tok


def train(data: Path, tok: Path, out: Path, **kw) -> Path:
    options = dict(task="seq2seq", tokenizer=tok, model="seq2seq-tiny", batch_size=8, lr=3e-3, warmup_steps=2,
                   eval_every=5, eval_batches=2, progress=False, seed=0, precision="32")
    return lmforge.pretrain(data, out=out, **{**options, **kw})


@pytest.mark.slow
def test_pretrain_task_seq2seq_learns_and_saves(pairs_and_tok, tmp_path):
    data, tok = pairs_and_tok
    out = train(data, tok, tmp_path / "run", max_steps=30)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if "loss" in r]
    val = [r["val_loss"] for r in records if "val_loss" in r]
    assert losses[-1] < losses[0] and val[-1] < val[0] and val[-1] < 0.6 * math.log(300)  # uniform: log 300
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "lmforge-seq2seq" and config["vocab_size"] == 300
    assert json.loads((out / "generation_config.json").read_text())["decoder_start_token_id"] == config[
        "decoder_start_id"]


@pytest.mark.slow
def test_resume_equals_uninterrupted(pairs_and_tok, tmp_path):
    """Stopping at step 4 and resuming to 8 gives the weights and losses of an uninterrupted 8-step run."""
    data, tok = pairs_and_tok
    straight = train(data, tok, tmp_path / "a", max_steps=8, log_every=1, lr_decay_steps=8)
    train(data, tok, tmp_path / "b", max_steps=4, log_every=1, lr_decay_steps=8)  # the same schedule
    resumed = lmforge.pretrain(resume=tmp_path / "b", max_steps=8, progress=False)
    from safetensors.torch import load_file

    a, b = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    loss = {p: [json.loads(x)["loss"] for x in (p / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
            for p in (straight, resumed)}
    assert loss[straight][-4:] == loss[resumed][-4:]
    assert load_train_state(resumed)["run"]["options"]["task"] == "seq2seq"


def test_wrong_data_or_missing_tokenizer_is_refused(pairs_and_tok, tmp_path):
    data, _ = pairs_and_tok
    with pytest.raises(ConfigError, match=r"holds \(source, target\) pairs: train an encoder-decoder"):
        lmforge.pretrain(data, out=tmp_path / "x", max_steps=1, progress=False)
    with pytest.raises(ConfigError, match="--tokenizer is required"):
        lmforge.pretrain(data, out=tmp_path / "y", task="seq2seq", model="seq2seq-tiny", max_steps=1, progress=False)
