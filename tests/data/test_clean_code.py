"""`data clean --preset code` keeps code byte-identical (real standard-library files), except for what the user
turns back on; the prose defaults, and `--filters.enabled false` alone, do rewrite it."""

from __future__ import annotations

import json
import shutil
import textwrap
from pathlib import Path

import pytest

from lmforge.cli import main
from lmforge.data.clean import Normalize
from lmforge.data.filters import Filters
from lmforge.data.pii import scrub_pii
from lmforge.data.pipeline import clean

# Modules with PEP 8 blank-line pairs, aligned comments, docstrings, tabs-in-strings and non-ASCII text.
STDLIB = [Path(shutil.__file__), Path(textwrap.__file__), Path(json.__file__).parent / "decoder.py",
          Path(json.__file__).parent / "encoder.py"]


def outputs(folder: Path) -> dict[str, str]:
    """Kept texts by source file name."""
    texts = {}
    for shard in sorted(folder.glob("part-*.jsonl")):
        for line in shard.read_text(encoding="utf-8").splitlines():
            row = json.loads(line)
            texts[row["id"].split(":")[0]] = row["text"]
    return texts


@pytest.fixture()
def source(tmp_path: Path) -> Path:
    src = tmp_path / "src"
    src.mkdir()
    for path in STDLIB:
        shutil.copy(path, src / path.name)
    return src


def originals(src: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().decode("utf-8") for p in sorted(src.glob("*.py"))}


def test_preset_code_keeps_stdlib_files_byte_identical(source: Path, tmp_path: Path) -> None:
    clean(source, tmp_path / "out", preset="code", glob="*.py", progress=False)
    got = outputs(tmp_path / "out")
    assert got.keys() == originals(source).keys()
    for name, text in originals(source).items():
        assert got[name].encode("utf-8") == text.encode("utf-8"), name


def test_prose_defaults_and_filters_off_alone_rewrite_code(source: Path, tmp_path: Path) -> None:
    """Why the preset exists: the README used to offer `--filters.enabled false` for code, which still drops
    PEP 8's second blank line and collapses aligned spacing."""
    clean(source, tmp_path / "off", filters=Filters(enabled=False), glob="*.py", progress=False)
    got = outputs(tmp_path / "off")
    assert got.keys() == originals(source).keys()  # every file kept ...
    assert any(got[n] != t for n, t in originals(source).items())  # ... but rewritten
    assert all("\n\n\n" not in got[n] for n in got) and any("\n\n\n" in t for t in originals(source).values())


def test_options_given_with_the_preset_change_only_what_they_name(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    code = 'AUTHOR = "ada@example.com"   # who to ask\n\n\nclass A:\n    x  =  1\n'
    (src / "a.py").write_text(code, encoding="utf-8")
    clean(src, tmp_path / "pii", preset="code", pii=True, progress=False)
    assert outputs(tmp_path / "pii")["a.py"] == scrub_pii(code) != code  # spacing and blank lines untouched
    spaced = 'AUTHOR = "ada@example.com" # who to ask\n\nclass A:\n    x = 1'
    assert main(["data", "clean", "--data", str(src), "--out", str(tmp_path / "ws"), "--preset", "code",
                 "--normalize.whitespace", "true", "--progress", "false"]) == 0
    assert outputs(tmp_path / "ws")["a.py"] == spaced  # only whitespace: no NFC, no PII, no filters
    code_only = Normalize(unicode=None, fix_mojibake=False, control_chars=False, whitespace=True)
    clean(src, tmp_path / "py", preset="code", normalize=code_only, progress=False)  # Python: replaces it whole
    assert outputs(tmp_path / "py")["a.py"] == spaced


def test_cli_preset_code(source: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli"
    assert main(["data", "clean", "--data", str(source), "--out", str(out), "--preset", "code",
                 "--glob", "*.py", "--progress", "false"]) == 0
    assert outputs(out) == originals(source)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["settings"]["pii"] is False and manifest["settings"]["filters"]["enabled"] is False
