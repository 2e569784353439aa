"""`lmforge plan`: its estimates match the measured peak memory of CPU runs within 15%, FSDP divides what it
shards, the largest batch is the largest that fits, and a run that will not fit is refused before it starts."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import lmforge
from lmforge.checkpoint import build_model, resolve_model_config
from lmforge.cli import main
from lmforge.data.pack import PackedDataset
from lmforge.errors import ConfigError
from lmforge.train.plan import estimate, max_batch_size, parse_memory

# Peak resident memory of a training run in a fresh process, above what the process held before it: the
# run's own tensors. A 1-step warm-up run first touches the code of every kernel a step uses (library pages
# count as resident), and glibc's fixed mmap threshold returns every freed tensor to the system at once.
# Two steps: the second runs with the optimizer's state allocated, the peak.
# The peak is VmHWM, this process's own: ru_maxrss would carry over the larger pytest process it was forked from.
MEASURE = """
import json, os, sys
import torch
torch.set_num_threads(1)
import lmforge
from lmforge.precision import measure_peak_flops
measure_peak_flops("32", torch.device("cpu"))  # cached for the process: its matrices are not the run's
packed, out, kwargs = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
lmforge.pretrain(packed, out=out + "-warmup", max_steps=1, progress=False, model="gpt2-tiny", batch_size=1,
                 block_size=16, precision="32")
before = int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
lmforge.pretrain(packed, out=out, max_steps=2, progress=False, eval_every=1000, lr=1e-3, **kwargs)
peak = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:")) * 1024
print(json.dumps(peak - before))
"""


def measured_peak(packed: Path, tmp_path: Path, **kwargs) -> int:
    script = tmp_path / "measure.py"
    script.write_text(MEASURE)
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(script), str(packed), str(tmp_path / "run"), json.dumps(kwargs)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return int(proc.stdout.strip().splitlines()[-1])


def builder(name: str, packed: Path):
    config = resolve_model_config(name, vocab_size=PackedDataset(packed, "train").meta["vocab_size"])
    return lambda: build_model(config)


@pytest.mark.slow
@pytest.mark.parametrize("settings", [
    dict(model="llama-tiny", batch_size=8, block_size=256),
    dict(model="llama-tiny", batch_size=8, block_size=256, activation_checkpointing=True),
    dict(model="gpt2-tiny", batch_size=8, block_size=256),
    dict(model="llama-tiny", batch_size=4, block_size=128),
], ids=["adamw", "activation-checkpointing", "gpt2", "small-batch"])
def test_estimate_is_within_15_percent_of_the_measured_peak(settings, tiny_packed, tmp_path):
    measured = measured_peak(tiny_packed, tmp_path, precision="32", **settings)
    planned = estimate(builder(settings["model"], tiny_packed), "ddp", batch_size=settings["batch_size"],
                       block_size=settings["block_size"], precision="32", world_size=1,
                       optimizer=settings.get("optimizer", "adamw"),
                       checkpointing=settings.get("activation_checkpointing", False)).peak
    print(f"measured {measured / 2**20:.1f} MiB, planned {planned / 2**20:.1f} MiB, "
          f"error {100 * (planned - measured) / measured:+.1f}%")  # the README's table (pytest -s)
    assert abs(planned - measured) / measured < 0.15, (planned / 2**20, measured / 2**20)


def test_fsdp_divides_weights_gradients_and_optimizer_state():
    ddp, fsdp = (lmforge.plan("llama-3.2-1b", batch_size=1, block_size=128, precision="32", world_size=8,
                              strategy=s)["per_rank"][0] for s in ("ddp", "fsdp"))
    params = 1_235_814_400  # Llama 3.2 1B, tied embeddings
    assert ddp["weights"] == 4 * params and ddp["optimizer"] == 8 * params
    assert fsdp["optimizer"] == 8 * params // 8 and fsdp["gradients"] == 4 * params // 8
    assert fsdp["weights"] < ddp["weights"] / 2  # a shard, plus the root and two gathered blocks
    assert fsdp["activations"] == ddp["activations"]


def test_lora_trains_and_stores_only_adapters():
    result = lmforge.plan("llama-tiny", method="lora", batch_size=2, block_size=64, precision="32")
    row = result["per_rank"][0]
    assert 0 < result["trainable"] < result["parameters"] / 50
    assert row["optimizer"] == 8 * result["trainable"] and row["gradients"] == 4 * result["trainable"]


def test_max_batch_size_is_the_largest_that_fits():
    build = lambda: build_model(resolve_model_config("llama-tiny", vocab_size=512))  # noqa: E731
    budget = parse_memory("1GB")
    at = estimate(build, "ddp", batch_size=4, block_size=256, precision="32", world_size=1)
    best = max_batch_size(build, "ddp", 256, "32", 1, "adamw", False, budget, at, 4)
    fits = [estimate(build, "ddp", batch_size=b, block_size=256, precision="32", world_size=1).peak <= 0.9 * budget
            for b in (best, best + 1)]
    assert best > 4 and fits == [True, False]


def test_memory_sizes_parse():
    assert parse_memory("80GB") == 80 * 2**30 == parse_memory("80 GiB") == parse_memory(80)
    assert parse_memory("512MB") == 512 * 2**20
    with pytest.raises(ConfigError, match="80 gigs"):
        parse_memory("80 gigs")


def test_a_run_that_will_not_fit_is_refused_up_front(tiny_packed, tmp_path):
    with pytest.raises(ConfigError, match=r"needs about .* GiB per process .* --memory-limit is 0.20 GiB; try "
                                          r"--batch-size \d+"):
        lmforge.pretrain(tiny_packed, out=tmp_path / "run", model="llama-tiny", block_size=256, batch_size=16,
                         max_steps=1, precision="32", memory_limit="200MB", progress=False)
    assert not (tmp_path / "run").exists()


def test_plan_cli_prints_the_table_and_json(capsys):
    assert main(["plan", "--model", "llama-3.2-1b", "--method", "lora", "--batch-size", "8", "--block-size", "2048",
                 "--precision", "bf16-mixed", "--world-size", "8", "--memory", "80GB", "--tflops", "989"]) == 0
    captured = capsys.readouterr()
    assert "fsdp" in captured.err and "max batch" in captured.err
    result = json.loads(captured.out)
    assert [r["strategy"] for r in result["per_rank"]] == ["ddp", "fsdp"]
    assert all(r["max_batch_size"] >= 1 and r["seconds_per_step"] > 0 for r in result["per_rank"])
