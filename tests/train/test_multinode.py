"""Two "nodes" of two processes each, joined by torchrun's c10d rendezvous on loopback, take the steps of one
process with the same global batch (the launch a cluster uses, `recipes/slurm-fsdp.sbatch`)."""

from __future__ import annotations

import socket

import pytest
from torchrun_helpers import RUN, assert_same_steps, torchrun, train_call

import lmforge

STEPS = 3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_of_two_processes_take_the_single_process_steps(tiny_packed, tmp_path):
    """FSDP over 2 × 2 processes with batch 1 each: the steps of one process with batch 4."""
    single = lmforge.pretrain(tiny_packed, out=tmp_path / "single", max_steps=STEPS, batch_size=4, **RUN)
    out = tmp_path / "nodes"
    script = train_call("pretrain", tiny_packed, out=out, max_steps=STEPS, batch_size=1, strategy="fsdp", **RUN)
    launcher = ("--nnodes", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", f"127.0.0.1:{free_port()}",
                "--rdzv-id", "lmforge-test", "--max-restarts", "0")
    nodes = [torchrun(script, tmp_path, 2, *launcher, wait=False, name=f"node{i}") for i in range(2)]
    results = [node.communicate(timeout=600) for node in nodes]
    for node, (_, stderr) in zip(nodes, results, strict=True):
        assert node.returncode == 0, stderr[-4000:]
    assert "4 process(es)" in "".join(stderr for _, stderr in results)
    assert_same_steps(out, single)
