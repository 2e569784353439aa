"""`data clean` over shards: accounting invariant, identical output across executors, resume, CLI, stats."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmforge.cli import main
from lmforge.data import clean, stats
from lmforge.data import pipeline as pl
from lmforge.data.readers import read_shard
from lmforge.errors import DataError

PROSE = ("The history of the city is long and it has been shaped by the river that runs through its centre. "
         "Merchants came to trade wool and grain, and the town grew around the market square where the old "
         "church still stands. Today the streets are quieter, but visitors can walk along the water and see "
         "the houses that were built by those families over many centuries of work and change in the region.")

def _corpus(root: Path, shards: int = 3) -> Path:
    """A few shards of prose, one exact duplicate across shards, one PII row and one malformed line."""
    root.mkdir(parents=True)
    for s in range(shards):
        rows = [{"text": f"{PROSE} Part {s}.{i} of the story, told again."} for i in range(4)]
        rows.append({"text": "short one"})
        if s == 1:
            rows.append({"text": rows[0]["text"].replace("Part 1.0", "Part 0.0")})  # exact copy of shard 0
            rows.append({"text": PROSE + " Mail me at someone@example.org."})
        with open(root / f"s{s}.jsonl", "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in rows)
    with open(root / "s0.jsonl", "a", encoding="utf-8") as f:
        f.write("{not json\n")
    return root


def _output_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.name != "manifest.json"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return _corpus(tmp_path_factory.mktemp("pipeline") / "raw")


@pytest.fixture(scope="module")
def cleaned(corpus, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("cleaned") / "out"
    return out, clean(corpus, out, on_error="skip", progress=False)


def test_clean_accounts_for_every_document(cleaned):
    out, res = cleaned
    assert res["documents"] == 3 * 5 + 2 + 1
    assert res["removed"] == {"exact_duplicate": 1, "min_words": 3}
    assert res["skipped"] == {"invalid-json": 1} and res["pii"] == {"email": 1}
    kept = [r for p in sorted(out.glob("part-*.jsonl")) for r in read_shard(p)]
    assert len(kept) == res["kept"] == 13
    assert any("<EMAIL>" in r["text"] for r in kept)
    log = [json.loads(line) for line in (out / "skipped.jsonl").read_text().splitlines()]
    assert log == [{"id": "s0.jsonl:6", "reason": "invalid-json",
                    "detail": "invalid JSON (Expecting property name enclosed in double quotes at column 2)"}]
    assert not (out / ".work").exists()


def test_two_workers_write_identical_output(corpus, cleaned, tmp_path):
    out, _ = cleaned
    clean(corpus, tmp_path / "w2", on_error="skip", workers=2, progress=False)
    assert _output_bytes(tmp_path / "w2") == _output_bytes(out)


@pytest.mark.slow
def test_ray_executor_writes_identical_output(corpus, cleaned, tmp_path):
    ray = pytest.importorskip("ray")
    try:
        clean(corpus, tmp_path / "ray", on_error="skip", workers=2, executor="ray", progress=False)
    finally:
        ray.shutdown()
    assert _output_bytes(tmp_path / "ray") == _output_bytes(cleaned[0])


def test_resume_after_a_crash_skips_finished_shards(corpus, cleaned, tmp_path, monkeypatch):
    """Shard 1 crashes; rerunning with resume maps only shards 1 and 2 and gives the uninterrupted output."""
    real = pl._map_clean
    calls: list[int] = []

    def crash_on_1(task):
        if task["index"] == 1:
            raise KeyboardInterrupt  # as if the process were killed mid-run
        return real(task)

    monkeypatch.setattr(pl, "_map_clean", crash_on_1)
    with pytest.raises(KeyboardInterrupt):
        clean(corpus, tmp_path / "out", on_error="skip", progress=False)
    assert not (tmp_path / "out" / "manifest.json").exists()
    with pytest.raises(DataError, match="pass --resume true"):
        clean(corpus, tmp_path / "out", on_error="skip", progress=False)
    with pytest.raises(DataError, match="other inputs or settings"):
        clean(corpus, tmp_path / "out", on_error="skip", pii=False, resume=True, progress=False)

    def counting(task):
        if not (Path(task["work"]) / f"part-{task['index']:05d}.tally.json").exists():
            calls.append(task["index"])
        return real(task)

    monkeypatch.setattr(pl, "_map_clean", counting)
    clean(corpus, tmp_path / "out", on_error="skip", resume=True, progress=False)
    assert calls == [1, 2]
    assert _output_bytes(tmp_path / "out") == _output_bytes(cleaned[0])
    assert clean(corpus, tmp_path / "out", on_error="skip", resume=True, progress=False)["kept"] == 13


_ROW = st.one_of(
    st.builds(lambda t: json.dumps({"text": t}), st.text(max_size=80)),
    st.builds(lambda t: json.dumps({"text": PROSE + t}), st.text(max_size=20)),
    st.just(json.dumps({"title": "no text"})),
    st.just(json.dumps({"text": 5})),
    st.just("[1, 2]"),
    st.text(max_size=30),
)
_FILE = st.one_of(
    st.builds(lambda rows: ("jsonl", "\n".join(rows).encode("utf-8", "surrogatepass")), st.lists(_ROW, max_size=8)),
    st.builds(lambda b: ("jsonl", b), st.binary(max_size=200)),
    st.builds(lambda b: ("txt", b), st.binary(max_size=200)),
    st.builds(lambda b: ("csv", b"text,x\n" + b), st.binary(max_size=100)),
)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(files=st.lists(_FILE, min_size=1, max_size=3), bad_bytes=st.sampled_from(["replace", "skip"]))
def test_every_input_document_is_kept_removed_or_skipped(tmp_path_factory, files, bad_bytes):
    """Random files, random bytes included: documents == kept + removed + skipped, and kept rows are on disk."""
    root = tmp_path_factory.mktemp("random")
    for i, (ext, data) in enumerate(files):
        (root / "in").mkdir(exist_ok=True)
        (root / "in" / f"f{i}.{ext}").write_bytes(data)
    res = clean(root / "in", root / "out", on_error="skip", bad_bytes=bad_bytes, progress=False)
    assert res["documents"] == res["kept"] + sum(res["removed"].values()) + sum(res["skipped"].values())
    on_disk = sum(1 for p in (root / "out").glob("part-*") for _ in read_shard(p))
    assert on_disk == res["kept"]
    skipped_log = (root / "out" / "skipped.jsonl").read_text().splitlines()
    replaced = sum('"replaced-bytes"' in line for line in skipped_log)
    assert len(skipped_log) - replaced == sum(res["skipped"].values()) and replaced == res["replaced_bytes"]


@pytest.mark.slow
def test_cli_clean_then_stats_write_shards_and_reports(corpus, tmp_path, capsys):
    cfg = tmp_path / "clean.yaml"
    cfg.write_text("normalize:\n  lowercase: true\nfilters:\n  min_words: 10\n", encoding="utf-8")
    code = main(["data", "clean", "--input", str(corpus), "--output", str(tmp_path / "c"), "--config", str(cfg),
                 "--on-error", "skip", "--compress", "true", "--progress", "false"])
    assert code == 0
    res = json.loads(capsys.readouterr().out)
    assert res["kept"] == 13 and (tmp_path / "c" / "part-00000.jsonl.zst").exists()
    assert all(r["text"] == r["text"].lower() for r in read_shard(tmp_path / "c" / "part-00002.jsonl.zst"))
    assert main(["data", "stats", str(tmp_path / "c"), "--out", str(tmp_path / "st"), "--progress", "false"]) == 0
    report = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert report["documents"] == 13 and report["languages"] == {"en": 13}
    assert report["removals"]["removed"]["min_words"] == 3
    md = (tmp_path / "st" / "stats.md").read_text()
    assert "| min_words | 3 |" in md and "| exact_duplicate | 1 |" in md
    for png in ("length_chars.png", "length_words.png", "languages.png"):
        assert (tmp_path / "st" / png).read_bytes()[:4] == b"\x89PNG"


def test_cli_reports_bad_input_by_file_and_line(corpus, tmp_path, capsys):
    assert main(["data", "clean", "--input", str(corpus), "--output", str(tmp_path / "c"),
                 "--progress", "false"]) == 2
    assert "s0.jsonl:6: invalid JSON" in capsys.readouterr().err


def test_empty_input_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        clean(tmp_path / "empty", tmp_path / "out", progress=False)
    with pytest.raises(DataError, match="no documents"):
        stats(_corpus(tmp_path / "c", 1) / "s0.jsonl", tmp_path / "st", text_field="missing", progress=False)
