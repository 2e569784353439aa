"""`lmforge compress report`: one table and one plot across a model and its compressed variants."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.cli import main
from lmforge.compress.prune import prune
from lmforge.compress.quantize import quantize
from lmforge.compress.report import compress_report, count_weights

LAYERS = dict(num_hidden_layers=2, max_position_embeddings=64)


@pytest.fixture(scope="module")
def held_out(tiny_docs, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("held_out") / "held_out.txt"
    path.write_text("\n".join(tiny_docs[:12]))
    return path


@pytest.fixture(scope="module")
def variants(make_checkpoint, tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("variants")
    source = make_checkpoint("llama-tiny", out=root / "x", std=0.05, **LAYERS)
    return [source, quantize(source, root / "x-int8"), quantize(source, root / "x-int4", scheme="int4", group_size=64),
            prune(source, root / "x-heads", method="heads", sparsity=0.5),
            prune(source, root / "x-sparse", method="magnitude", sparsity=0.5)]


def test_weights_are_counted_logically_and_zeros_apart(variants):
    source, int8, int4, heads, sparse = (lmforge.load(v).model for v in variants)
    n = count_weights(source)[0]
    assert n == sum(p.numel() for p in source.parameters())
    assert count_weights(int8)[0] == count_weights(int4)[0] == n  # a quantized matrix is still out×in weights
    assert count_weights(heads)[0] < n
    blocks = sum(m.weight.numel() for m in source.blocks.modules() if isinstance(m, torch.nn.Linear))
    assert count_weights(sparse) == (n, blocks // 2)


def test_report_table_and_plot(variants, held_out, tmp_path):
    markdown = compress_report(variants, held_out, tmp_path / "report.md", new_tokens=4, rounds=1)
    rows = markdown.splitlines()[2:]
    assert [r.split("|")[1].strip() for r in rows] == ["x", "x-int8", "x-int4", "x-heads", "x-sparse"]
    assert "int8 (bfloat16 activations)" in rows[1] and "int4/int8 g64" in rows[2]
    sizes = [float(r.split("|")[3]) for r in rows]
    assert sizes[1] < 0.4 * sizes[0] and sizes[2] < sizes[1] and sizes[3] < sizes[0]
    zeros = [r.split("|")[5].strip() for r in rows]
    assert zeros[0] == "0.0%" and float(zeros[4].rstrip("%")) > 40  # half the block weights, most of the model
    assert (tmp_path / "report.md").read_text().startswith(markdown)
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_cli_takes_the_models_as_bare_arguments(variants, held_out, tmp_path):
    assert main(["compress", "report", str(variants[0]), str(variants[1]), "--data", str(held_out),
                 "--new-tokens", "2", "--rounds", "1", "--out", str(tmp_path / "r.md")]) == 0
    assert len((tmp_path / "r.md").read_text().split("\n\n")[0].splitlines()) == 4
