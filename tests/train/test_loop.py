"""The training loop end to end: resume, interrupted saves, DDP equivalence, and refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import greedy_text

import lmforge
from lmforge.checkpoint import load_train_state, weights_step
from lmforge.errors import CheckpointError, ConfigError, DataError

SMALL = dict(model="gpt2-tiny", block_size=32, batch_size=4, warmup_steps=2, precision="32", log_every=1,
             eval_every=5, eval_batches=2, progress=False, lr=1e-3)


@pytest.fixture(scope="module")
def packed(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus"
    corpus.mkdir()
    for i in range(40):
        lines = [f"def function_{i}_{j}(x):\n    return x * {j} + {i}\n" for j in range(12)]
        (corpus / f"doc{i}.py").write_text("".join(lines))
    tok = lmforge.train_tokenizer(corpus, root / "tok", vocab_size=300)
    return lmforge.pack(corpus, tok, root / "packed", val_fraction=0.1, workers=1)


def losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_resume_continues_exactly(packed, tmp_path):
    """Stopping at step 6 and resuming to 12 gives the losses and weights of an uninterrupted 12-step run.

    Tolerance is zero: fp32 on CPU runs the same kernels on the same shapes in the same order, and the
    data position, optimizer moments, RNG and schedule all come back from train_state.pt.
    """
    full = lmforge.pretrain(packed, out=tmp_path / "full", max_steps=12, **SMALL)
    part = lmforge.pretrain(packed, out=tmp_path / "part", max_steps=6, lr_decay_steps=12, **SMALL)
    lmforge.pretrain(resume=part, max_steps=12, progress=False)
    assert losses(part) == losses(full)
    a, b = lmforge.load(full).model.state_dict(), lmforge.load(part).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_kill_during_save_keeps_previous_checkpoint(packed, tmp_path):
    """SIGKILL while the second checkpoint's weights are being written leaves the first one loadable."""
    out = tmp_path / "run"
    script = textwrap.dedent(f"""
        import os, signal, safetensors.torch as st
        import lmforge.checkpoint as ck
        calls = []
        def dying_save(tensors, path, metadata=None):
            calls.append(path)
            if len(calls) == 2:
                with open(path, "wb") as f:
                    f.write(b"half a file")
                os.kill(os.getpid(), signal.SIGKILL)
            st.save_file(tensors, path, metadata=metadata)
        ck.save_file = dying_save
        import lmforge
        lmforge.pretrain({str(packed)!r}, out={str(out)!r}, max_steps=10, save_every=4, model="gpt2-tiny",
                         block_size=32, batch_size=4, precision="32", progress=False)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -9, proc.stderr
    assert weights_step(out) == 4 and load_train_state(out)["step"] == 4
    lm = lmforge.load(out)  # and it decodes: greedy generate is the argmax continuation of its weights
    prompt = lm.tokenizer.encode("def ")
    assert lm.generate("def ", max_new_tokens=3, temperature=0) == greedy_text(lm.model, lm.tokenizer, prompt, 3,
                                                                               {lm.tokenizer.eos_id})
    lmforge.pretrain(resume=out, progress=False)  # and the run continues from it
    assert load_train_state(out)["step"] == 10
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]


@pytest.mark.slow
def test_ddp_two_processes_match_single_process(packed, tmp_path):
    """2 gloo processes with batch 2 each take the same steps as 1 process with batch 4."""
    single = lmforge.pretrain(packed, out=tmp_path / "single", max_steps=4, **SMALL)
    settings = {**SMALL, "batch_size": 2}
    script = tmp_path / "ddp.py"
    script.write_text(f"import lmforge\nlmforge.pretrain({str(packed)!r}, out={str(tmp_path / 'ddp')!r}, "
                      f"max_steps=4, **{settings!r})\n")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                           "--standalone", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single_losses, ddp_losses = losses(single), losses(tmp_path / "ddp")
    assert single_losses.keys() == ddp_losses.keys()
    for step in single_losses:
        assert ddp_losses[step] == pytest.approx(single_losses[step], abs=1e-5)


def test_resume_with_changed_model_is_refused(packed, tmp_path):
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=2, **SMALL)
    before = (run / "model.safetensors").read_bytes()
    with pytest.raises(ConfigError, match=r"--model qwen3-tiny: .* was started with 'gpt2-tiny'"):
        lmforge.pretrain(resume=run, model="qwen3-tiny", max_steps=4, progress=False)
    assert (run / "model.safetensors").read_bytes() == before


def test_out_dir_with_a_run_is_refused(packed, tmp_path):
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=1, **SMALL)
    with pytest.raises(CheckpointError, match="--resume"):
        lmforge.pretrain(packed, out=run, max_steps=1, **SMALL)


def test_corpus_smaller_than_one_batch_is_refused(packed, tmp_path):
    with pytest.raises(DataError, match="block"):
        lmforge.pretrain(packed, out=tmp_path / "run", max_steps=1, **{**SMALL, "block_size": 256,
                                                                        "batch_size": 512})


def test_no_stopping_rule_is_refused(packed, tmp_path):
    with pytest.raises(ConfigError, match="max_steps"):
        lmforge.pretrain(packed, out=tmp_path / "run", **SMALL)


def test_max_minutes_counts_the_time_before_a_resume(packed, tmp_path):
    """A time budget is the run's, like a step budget: a resumed run that has already used it takes no step
    (and a time-based learning-rate schedule goes on from where it was instead of restarting at its peak)."""
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=2, **SMALL)
    assert load_train_state(run)["elapsed"] > 0.01
    lmforge.pretrain(resume=run, max_steps=100, max_minutes=0.01 / 60, progress=False)
    assert load_train_state(run)["step"] == 2


def test_a_resumed_run_shows_the_time_and_steps_left(packed, tmp_path, monkeypatch):
    """The progress line of a resumed run counts down the budget that is left and rates only the new steps
    (it showed the whole budget again)."""
    from lmforge.train import loop

    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=2, **SMALL)
    used = load_train_state(run)["elapsed"]
    bars = []

    class Recorded(loop.Progress):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            bars.append(kwargs)

    monkeypatch.setattr(loop, "Progress", Recorded)
    lmforge.pretrain(resume=run, max_steps=3, max_minutes=10, progress=False)
    assert bars[0]["initial"] == 2
    assert bars[0]["time_limit"] == pytest.approx(600 - used)


def test_max_tokens_stops_at_the_token_budget(packed, tmp_path):
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_tokens=3 * 4 * 32, **SMALL)
    assert load_train_state(run)["step"] == 3


def test_training_lowers_validation_loss(packed, tmp_path):
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=30, **{**SMALL, "lr": 3e-3})
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r["val_loss"] for r in rows if "val_loss" in r]
    assert val[-1] < val[0] - 0.5


def test_bf16_mixed_precision_trains(packed, tmp_path):
    run = lmforge.pretrain(packed, out=tmp_path / "run", max_steps=3, **{**SMALL, "precision": "bf16-mixed"})
    assert all(v == v for v in losses(run).values())  # finite, not NaN
    assert lmforge.load(run).model.embed.weight.dtype == torch.float32  # master weights stay fp32


def test_gradient_accumulation_matches_the_larger_batch(packed, tmp_path):
    """2 micro-batches of 2 windows take the same steps as 1 batch of 4 (the same windows, mean loss)."""
    big = lmforge.pretrain(packed, out=tmp_path / "big", max_steps=4, **SMALL)
    accum = lmforge.pretrain(packed, out=tmp_path / "accum", max_steps=4, grad_accum=2, **{**SMALL, "batch_size": 2})
    for step, loss in losses(big).items():
        assert losses(accum)[step] == pytest.approx(loss, abs=1e-5)
