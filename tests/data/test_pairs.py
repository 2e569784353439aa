"""`lmforge data pairs`: every input format, the split by key, and errors that name the file and line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lmforge.data.pairs import assign_split, load_pairs, pairs
from lmforge.errors import ConfigError, DataError


def rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def all_rows(out: Path) -> list[dict]:
    return [r for split in ("train", "valid", "test") for r in rows(out / f"{split}.jsonl")]


def test_line_aligned_text_files(tmp_path):
    en = [f"sentence number {i}" for i in range(200)]
    es = [f"frase número {i}" for i in range(200)]
    (tmp_path / "en.txt").write_text("\n".join(en) + "\n", encoding="utf-8")
    (tmp_path / "es.txt").write_text("\n".join(es) + "\n", encoding="utf-8")
    out = pairs(tmp_path / "p", source=tmp_path / "en.txt", target=tmp_path / "es.txt", valid=0.1, test=0.1)
    got = sorted(all_rows(out), key=lambda r: r["line"])
    assert [(r["source"], r["target"]) for r in got] == list(zip(en, es))
    meta = json.loads((out / "meta.json").read_text())
    assert meta["format"] == "lmforge-pairs/1" and sum(meta["counts"].values()) == 200
    assert 5 <= meta["counts"]["test"] <= 40 and 5 <= meta["counts"]["valid"] <= 40  # 10% each, by hash


def test_split_is_by_key_and_stable(tmp_path):
    """Every row of a key lands in one split, and a hashed split does not depend on the input order."""
    data = [{"source": f"s{i}", "target": f"t{i}", "doc": f"d{i % 20}"} for i in range(400)]
    for name, ordered in (("a", data), ("b", data[::-1])):
        (tmp_path / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in ordered))
        pairs(tmp_path / name, source=tmp_path / f"{name}.jsonl", split_by="doc", valid=0.2, test=0.2)
    split_of = {}
    for name in ("a", "b"):
        for split in ("train", "valid", "test"):
            for r in rows(tmp_path / name / f"{split}.jsonl"):
                assert split_of.setdefault(r["doc"], split) == split
    keys = json.loads((tmp_path / "a" / "meta.json").read_text())["keys"]
    assert set(keys["train"]) | set(keys["valid"]) | set(keys["test"]) == {f"d{i}" for i in range(20)}
    assert not set(keys["train"]) & set(keys["test"])


def test_same_source_never_crosses_splits(tmp_path):
    """By default the key is the source text: a sentence that occurs twice is in one split only."""
    lines = [f"line {i % 50}" for i in range(500)]
    (tmp_path / "s.txt").write_text("\n".join(lines))
    (tmp_path / "t.txt").write_text("\n".join(f"x{i}" for i in range(500)))
    out = pairs(tmp_path / "p", source=tmp_path / "s.txt", target=tmp_path / "t.txt", valid=0.2, test=0.2)
    seen = {}
    for split in ("train", "valid", "test"):
        for r in rows(out / f"{split}.jsonl"):
            assert seen.setdefault(r["source"], split) == split


def test_named_keys_form_the_held_out_splits(tmp_path):
    data = [{"source": f"s{i}", "target": f"t{i}", "book": b} for i, b in enumerate("AABBCCDDEE")]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    out = pairs(tmp_path / "p", source=tmp_path / "d.jsonl", split_by="book", test_keys=["B", "E"], valid_keys=["C"])
    assert [r["book"] for r in rows(out / "test.jsonl")] == ["B", "B", "E", "E"]
    assert [r["book"] for r in rows(out / "valid.jsonl")] == ["C", "C"]
    assert {r["book"] for r in rows(out / "train.jsonl")} == {"A", "D"}
    with pytest.raises(ConfigError, match=r"--test-keys: \['Z'\] are not values of book"):
        pairs(tmp_path / "q", source=tmp_path / "d.jsonl", split_by="book", test_keys=["Z"])


def test_tsv_and_csv_rows_with_named_fields(tmp_path):
    (tmp_path / "d.tsv").write_text("en\tes\nhello\thola\ngood morning\tbuenos días\n", encoding="utf-8")
    out = pairs(tmp_path / "p", source=tmp_path / "d.tsv", source_field="en", target_field="es", valid=0, test=0)
    assert [(r["source"], r["target"]) for r in rows(out / "train.jsonl")] == [("hello", "hola"),
                                                                                ("good morning", "buenos días")]
    assert load_pairs(out / "train.jsonl")[1]["target"] == "buenos días"


def test_misaligned_files_name_both_files(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\nc\n")
    (tmp_path / "es.txt").write_text("x\ny\n")
    with pytest.raises(DataError, match=r"en\.txt: 3 lines, but .*es\.txt has 2; .*first unmatched: .*en\.txt:3"):
        pairs(tmp_path / "p", source=tmp_path / "en.txt", target=tmp_path / "es.txt")


def test_empty_line_on_one_side_names_file_and_line(tmp_path):
    (tmp_path / "en.txt").write_text("a\nb\nc\n")
    (tmp_path / "es.txt").write_text("x\n\nz\n")
    with pytest.raises(DataError, match=r"es\.txt:2: empty line, but line 2 of .*en\.txt is not"):
        pairs(tmp_path / "p", source=tmp_path / "en.txt", target=tmp_path / "es.txt")


def test_missing_or_empty_field_names_file_and_line(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"source": "a", "target": "b"}\n{"source": "c"}\n')
    with pytest.raises(DataError, match=r"d\.jsonl:2: field 'target' missing"):
        pairs(tmp_path / "p", source=tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text('{"source": "a", "target": "  "}\n')
    with pytest.raises(DataError, match=r"e\.jsonl:1: field 'target' must be a non-empty string"):
        pairs(tmp_path / "q", source=tmp_path / "e.jsonl")


def test_bad_options_are_refused(tmp_path):
    (tmp_path / "en.txt").write_text("a\n")
    with pytest.raises(ConfigError, match="needs --target"):
        pairs(tmp_path / "p", source=tmp_path / "en.txt")
    with pytest.raises(ConfigError, match="exactly one input"):
        pairs(tmp_path / "p")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    with pytest.raises(ConfigError, match="already holds files"):
        pairs(tmp_path / "full", source=tmp_path / "en.txt", target=tmp_path / "en.txt")


def test_length_ratio_drops_misaligned_pairs(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"source": "short", "target": "tiny"}\n'
                                      '{"source": "ab", "target": "a very much longer text"}\n')
    out = pairs(tmp_path / "p", source=tmp_path / "d.jsonl", max_length_ratio=3, valid=0, test=0)
    assert [r["source"] for r in rows(out / "train.jsonl")] == ["short"]
    assert json.loads((out / "meta.json").read_text())["dropped"] == {"length_ratio": 1}


def test_hash_split_fractions():
    splits = [assign_split(str(i), valid=0.1, test=0.2, valid_keys=None, test_keys=None, seed=3) for i in range(5000)]
    assert abs(splits.count("test") / 5000 - 0.2) < 0.03 and abs(splits.count("valid") / 5000 - 0.1) < 0.03


PACKAGE = {
    "pkg/__init__.py": "",
    "pkg/geometry.py": '''
def area(width, height):
    """Return the area of a rectangle.

    Multiplies the width by the height, both in the same unit, and returns the product.
    """
    return width * height


class Circle:
    @staticmethod
    def circumference(r):
        """Compute the circumference of a circle of radius r."""
        return 2 * 3.14159 * r
''',
    "pkg/tests/test_x.py": 'def test_a():\n    """Check that a test is not a pair."""\n',
    "pkg/broken.py": "def f(:\n",
}


def test_python_docstrings_code_and_prose(tmp_path):
    for name, text in PACKAGE.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text)
    out = pairs(tmp_path / "code", python_docstrings=str(tmp_path / "pkg"), valid=0, test=0)
    got = {r["name"]: r for r in rows(out / "train.jsonl")}
    assert set(got) == {"area", "circumference"}
    assert got["area"]["source"] == "def area(width, height):\n    return width * height"
    assert got["area"]["target"] == "Return the area of a rectangle."
    assert got["circumference"]["source"].startswith("@staticmethod\ndef circumference(r):")
    assert got["area"]["module"] == "geometry"
    assert json.loads((out / "meta.json").read_text())["dropped"] == {"unparsable_file": 1}
    prose = pairs(tmp_path / "prose", python_docstrings=str(tmp_path / "pkg"), docstring_task="prose", valid=0, test=0)
    assert [(r["source"], r["target"]) for r in rows(prose / "train.jsonl")] == [
        ("Multiplies the width by the height, both in the same unit, and returns the product.",
         "Return the area of a rectangle.")]


def test_python_docstrings_from_several_folders_keep_each_modules_split(tmp_path):
    """Adding a folder (as `stdlib,site-packages` does) adds pairs but moves none of the first folder's: a
    module's split comes from its name alone, so the held-out test modules stay held out and the same."""
    for folder in ("a", "b"):
        for i in range(12):
            (tmp_path / folder).mkdir(exist_ok=True)
            body = f"    return x + {i} + len({folder!r})\n"
            (tmp_path / folder / f"{folder}mod{i}.py").write_text(
                f'def f{i}(x):\n    """Return the value {i} of the {folder} thing."""\n' + body)
    alone = pairs(tmp_path / "alone", python_docstrings=str(tmp_path / "a"), valid=0.25, test=0.25)
    both = pairs(tmp_path / "both", python_docstrings=f"{tmp_path / 'a'},{tmp_path / 'b'}", valid=0.25, test=0.25)
    for split in ("train", "valid", "test"):
        first = [r for r in rows(both / f"{split}.jsonl") if r["root"] == str(tmp_path / "a")]
        assert first == rows(alone / f"{split}.jsonl")
    assert {r["root"] for r in rows(both / "train.jsonl")} == {str(tmp_path / "a"), str(tmp_path / "b")}
    assert sum(len(rows(both / f"{s}.jsonl")) for s in ("train", "valid", "test")) == 24
