"""The baselines through `pretrain`: an n-gram model counted, an LSTM trained and resumed in the one loop,
both loading, scoring and generating like any checkpoint."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import kind_of, load_model
from lmforge.cli import main
from lmforge.errors import CheckpointError, ConfigError
from lmforge.infer.score import token_stream
from lmforge.model.lstm import LSTMLM
from lmforge.model.ngram import NgramLM


@pytest.fixture(autouse=True)
def one_thread():
    """The LSTM's many small per-timestep kernels run faster on one thread than through OpenMP's fork/join,
    and far faster when other processes keep the cores busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


LSTM = dict(model="lstm-tiny", block_size=32, batch_size=4, warmup_steps=2, precision="32", log_every=1,
            eval_every=5, eval_batches=2, progress=False, lr=3e-3)


@pytest.fixture(scope="module")
def ngram_run(tiny_packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("ngram") / "run"
    assert main(["pretrain", "--model", "ngram-3", "--data", str(tiny_packed), "--out", str(out)]) == 0
    return out


def test_ngram_pretrain_writes_a_checkpoint_of_counts(ngram_run: Path, tiny_packed: Path) -> None:
    """`lmforge pretrain --model ngram-3`: config.json says what it is, the counts are in model.safetensors,
    metrics.jsonl has the val loss, and load_model opens it as kind "ngram"."""
    config = json.loads((ngram_run / "config.json").read_text())
    assert (config["model_type"], config["order"], config["smoothing"]) == ("lmforge-ngram", 3, "modified-kneser-ney")
    assert not (ngram_run / "train_state.pt").exists()
    assert kind_of(ngram_run) == "ngram"
    loaded = load_model(ngram_run)
    assert isinstance(loaded.model, NgramLM) and loaded.model.config.sizes == config["sizes"]
    meta = json.loads((tiny_packed / "meta.json").read_text())
    line = json.loads((ngram_run / "metrics.jsonl").read_text().splitlines()[0])
    assert line["tokens"] == meta["tokens"]["train"]
    assert line["val_loss"] == pytest.approx(_stream_nll(loaded.model, _val_ids(tiny_packed)), rel=1e-5)


def _val_ids(packed: Path) -> list[int]:
    from lmforge.data.pack import PackedDataset

    val = PackedDataset(packed, "val")
    return val.window(0, val.num_tokens).tolist()


def _stream_nll(model: NgramLM, ids: list[int], score: list[bool] | None = None) -> float:
    """Mean −log p(token | the n−1 before it) over a stream, by one forward (an n-gram needs no windows)."""
    logp = model(torch.tensor([ids[:-1]]))[0].double()
    nll = -logp.gather(-1, torch.tensor(ids[1:])[:, None])[:, 0]
    keep = torch.tensor(score[1:]) if score is not None else torch.ones(len(nll), dtype=torch.bool)
    return float(nll[keep].mean())


def test_ngram_perplexity_is_the_streams_probability(ngram_run: Path, tiny_docs: list[str], tmp_path: Path) -> None:
    """`eval perplexity` of the n-gram (sliding windows, as for any model) equals exp of the mean NLL of the
    held-out tokens under the model's own probabilities, and bits/byte is the same total over the bytes."""
    held = tmp_path / "held.txt"
    held.write_text("\n\n".join(tiny_docs[:5]))
    lm = lmforge.load(ngram_run)
    result = lm.perplexity(held, progress=False)
    ids, score, n_bytes = token_stream(lm.tokenizer, held)
    nll = _stream_nll(lm.model, ids, score)
    assert result["perplexity"] == pytest.approx(math.exp(nll), rel=1e-5)
    assert result["bits_per_byte"] == pytest.approx(nll * result["tokens"] / (math.log(2) * n_bytes), rel=1e-5)


def test_ngram_generates_from_the_cli_and_saves_again(ngram_run: Path, tmp_path: Path,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    """`lmforge generate` on the n-gram run prints a completion; LM.save writes a directory that loads to the
    same probabilities."""
    assert main(["generate", "--model", str(ngram_run), "--prompt", "The model", "--max-new-tokens", "12",
                 "--seed", "1"]) == 0
    assert capsys.readouterr().out.strip()
    lm = lmforge.load(ngram_run)
    copy = lmforge.load(lm.save(tmp_path / "copy"))
    x = torch.tensor([lm.tokenizer.encode("the cat sat on the mat")])
    assert torch.equal(lm.model(x), copy.model(x))


def test_ngram_refuses_training_options(tiny_packed: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--max-steps does not apply to an n-gram model"):
        lmforge.pretrain(tiny_packed, model="ngram-3", out=tmp_path / "a", max_steps=5)
    with pytest.raises(ConfigError, match="--discount applies to n-gram models"):
        lmforge.pretrain(tiny_packed, model="gpt2-tiny", out=tmp_path / "b", max_steps=5, discount=0.1)
    with pytest.raises(ConfigError, match="an LSTM model has no init"):
        lmforge.pretrain(tiny_packed, model="lstm-tiny", out=tmp_path / "c", max_steps=5, init="xavier")


def test_single_discount_is_recorded(tiny_packed: Path, tmp_path: Path) -> None:
    out = lmforge.pretrain(tiny_packed, model="ngram-2", out=tmp_path / "kn", discount=0.1, progress=False)
    config = json.loads((out / "config.json").read_text())
    assert config["smoothing"] == "kneser-ney" and config["discounts"] == [[0.1] * 3] * 2


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_lstm_resume_continues_exactly(tiny_packed: Path, tmp_path: Path) -> None:
    """An LSTM stopped at step 5 and resumed to 10 gives the losses and weights of an uninterrupted 10-step run
    (fp32 on CPU: same kernels, same shapes, same order; data position, optimizer and RNG from train_state.pt)."""
    full = lmforge.pretrain(tiny_packed, out=tmp_path / "full", max_steps=10, **LSTM)
    part = lmforge.pretrain(tiny_packed, out=tmp_path / "part", max_steps=5, lr_decay_steps=10, **LSTM)
    lmforge.pretrain(resume=part, max_steps=10, progress=False)
    assert losses(part) == losses(full) and len(losses(full)) == 10
    a, b = lmforge.load(full).model.state_dict(), lmforge.load(part).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_lstm_learns_and_is_a_checkpoint_like_any_other(tiny_packed: Path, tmp_path: Path) -> None:
    """A short LSTM run lowers the loss well below uniform (ln V), its checkpoint loads as a decoder with
    tied embeddings, and it generates and scores through the usual LM methods."""
    run = lmforge.pretrain(tiny_packed, out=tmp_path / "lstm", max_steps=40, **LSTM)
    config = json.loads((run / "config.json").read_text())
    assert config["model_type"] == "lmforge-lstm" and kind_of(run) == "decoder"
    lm = lmforge.load(run)
    assert isinstance(lm.model, LSTMLM) and lm.model.lm_head.weight is lm.model.embed.weight
    vocab = lm.tokenizer.vocab_size
    assert losses(run)[40] < math.log(vocab) - 1.5
    assert lm.generate("The model", max_new_tokens=6, temperature=0) == lm.generate("The model", max_new_tokens=6,
                                                                                   temperature=0)
    values = [v for _, v in lm.logprobs("the cat sat on the mat")]
    assert all(-math.log(vocab) * 3 < v < 0 for v in values)


def test_an_ngram_run_cannot_be_resumed(ngram_run: Path) -> None:
    with pytest.raises(CheckpointError, match="cannot be resumed"):
        lmforge.pretrain(resume=ngram_run, max_steps=2, progress=False)


def test_a_baseline_is_not_exported_to_hugging_face(ngram_run: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="an ngram baseline has no Hugging Face architecture"):
        lmforge.convert.to_hf(ngram_run, tmp_path / "hf")
