"""Sharded (DCP) checkpoints: saved by 2 processes, resumed by 1 or 4 with the global batch kept, the continued
steps are those of an uninterrupted run; the data position survives any change of batch split."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from torchrun_helpers import RUN, assert_same_steps, torchrun, train_call

import lmforge
from lmforge.checkpoint import load_train_state
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError
from lmforge.train.distributed import adapt_batch
from lmforge.train.loaders import LabelledLoader, WindowLoader

STOP, END = 4, 8


def test_adapt_batch_keeps_the_global_batch():
    """The micro-batch stays where it divides the new share (memory per process), else shrinks."""
    assert adapt_batch(2, 1, saved_world=2, world=1) == (2, 2)
    assert adapt_batch(2, 1, saved_world=2, world=4) == (1, 1)
    assert adapt_batch(4, 3, saved_world=2, world=3) == (4, 2)
    with pytest.raises(ConfigError, match="does not split over 3"):
        adapt_batch(2, 1, saved_world=2, world=3)


def _stream(loaders: list, steps: int, accum: int) -> list[list[list[int]]]:
    """Per optimizer step, the windows every rank's micro-batches hold, in sorted order (a step's loss is
    their mean, whichever rank or micro-batch reads each)."""
    return [sorted(row for _ in range(accum) for loader in loaders for row in loader.next_batch()[0].tolist())
            for _ in range(steps)]


@pytest.mark.parametrize(("batch", "world", "accum"), [(3, 1, 2), (1, 6, 1), (1, 2, 3)])
def test_window_position_resumes_on_another_split(tiny_packed, batch, world, accum):
    """2 ranks × batch 3 read 5 steps (past an epoch end), then the state resumes with another split of the
    global batch of 6 across ranks and accumulation: the steps' windows are those of the uninterrupted run."""
    ds = PackedDataset(tiny_packed, "train")
    block = (ds.num_tokens - 1) // 26  # 26 windows: epochs of 24, so step 5 starts the second epoch
    whole = _stream([WindowLoader(ds, block, 3, rank=r, world_size=2, seed=5) for r in range(2)], 9, 1)
    first = [WindowLoader(ds, block, 3, rank=r, world_size=2, seed=5) for r in range(2)]
    _stream(first, 5, 1)
    state = first[0].state_dict()
    resumed = [WindowLoader(ds, block, batch, rank=r, world_size=world, seed=0) for r in range(world)]
    for loader in resumed:
        loader.load_state_dict(state)
    for expected, got in zip(whole[5:], _stream(resumed, 4, accum), strict=True):
        assert got == expected


def test_labelled_position_resumes_on_another_split():
    ids = [[i, i + 1] for i in range(10)]
    targets = torch.arange(10)

    def take(loaders: list, steps: int, accum: int = 1) -> list[list[int]]:
        return [sorted(int(t) for _ in range(accum) for loader in loaders for t in loader.next_batch()[1])
                for _ in range(steps)]

    whole = take([LabelledLoader(ids, targets, 2, 0, rank=r, world_size=2, seed=1) for r in range(2)], 6)
    first = [LabelledLoader(ids, targets, 2, 0, rank=r, world_size=2, seed=1) for r in range(2)]
    take(first, 3)
    resumed = LabelledLoader(ids, targets, 2, 0, seed=1)
    resumed.load_state_dict(first[1].state_dict())
    assert take([resumed], 3, accum=2) == whole[3:]


@pytest.fixture(scope="module")
def reference(tiny_packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One process, batch 4, never stopped."""
    return lmforge.pretrain(tiny_packed, out=tmp_path_factory.mktemp("ref") / "run", max_steps=END, batch_size=4,
                            **RUN)


@pytest.fixture(scope="module")
def stopped(tiny_packed: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 FSDP processes × batch 2, stopped after STOP steps with a sharded checkpoint."""
    tmp = tmp_path_factory.mktemp("stopped")
    torchrun(train_call("pretrain", tiny_packed, out=tmp / "run", max_steps=STOP, batch_size=2, strategy="fsdp",
                        **RUN), tmp, 2)
    return tmp / "run"


@pytest.mark.slow
def test_two_processes_take_the_single_process_steps(stopped, reference):
    """FSDP over 2 gloo processes × batch 2: the losses and gradient norms of one process with batch 4."""
    assert_same_steps(stopped, reference, steps=range(1, STOP + 1))


@pytest.mark.slow
def test_resume_on_one_process(stopped, reference, tmp_path, capsys):
    """Saved by 2 processes, resumed by 1 (batch 2 × accumulation 2): the steps of the uninterrupted run."""
    run = shutil.copytree(stopped, tmp_path / "run")
    lmforge.pretrain(resume=run, max_steps=END, progress=False)
    assert "batch 2 × accumulation 2, keeping the global batch of 4" in capsys.readouterr().err
    assert_same_steps(run, reference, steps=range(1, END + 1))
    state = load_train_state(run)
    assert (state["step"], state["world_size"], state["train_config"]["grad_accum"]) == (END, 1, 2)
    assert [p.name for p in run.glob("*sharded-*")] == [f"sharded-{END:08d}"]  # the older shards are gone


@pytest.mark.slow
def test_resume_on_four_processes(stopped, reference, tmp_path):
    """Saved by 2 processes, resumed by 4 (batch 1 each), then converted: the uninterrupted run's steps and
    weights."""
    run = shutil.copytree(stopped, tmp_path / "run")
    proc = torchrun(train_call("pretrain", resume=run, max_steps=END, progress=False), tmp_path, 4)
    assert "batch 1 × accumulation 1, keeping the global batch of 4" in proc.stderr
    assert_same_steps(run, reference, steps=range(1, END + 1))
    ours = lmforge.load(lmforge.convert_sharded(run, tmp_path / "plain")).model.state_dict()
    for name, tensor in lmforge.load(reference).model.state_dict().items():
        torch.testing.assert_close(ours[name], tensor, atol=2e-5, rtol=0, msg=name)


@pytest.mark.slow
def test_ddp_run_resumes_on_one_process(tiny_packed, reference, tmp_path, capsys):
    """DDP over 4 processes × batch 1 takes the single-process steps; its plain checkpoint resumes on 1
    process as batch 1 × accumulation 4, and the continued steps are the uninterrupted run's."""
    torchrun(train_call("pretrain", tiny_packed, out=tmp_path / "run", max_steps=STOP, batch_size=1, **RUN),
             tmp_path, 4)
    assert_same_steps(tmp_path / "run", reference, steps=range(1, STOP + 1))
    lmforge.pretrain(resume=tmp_path / "run", max_steps=END, progress=False)
    assert "batch 1 × accumulation 4, keeping the global batch of 4" in capsys.readouterr().err
    assert_same_steps(tmp_path / "run", reference, steps=range(1, END + 1))
