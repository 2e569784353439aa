"""`lmforge data pairs`: (source, target) pairs for an encoder-decoder, split so held-out pairs stay held out.

Four inputs, one output:
    --source en.txt --target es.txt     two line-aligned text files (line k of one translates line k of the other)
    --source pairs.tsv | .csv | .jsonl  one file of rows with `source` and `target` fields (THE reader,
                                        `lmforge.data.readers`, reads it: .gz/.zst and Parquet too)
    --sword kjv,sparv                   two SWORD Bible modules aligned verse by verse (`lmforge.data.sword`)
    --python-docstrings stdlib,DIR,...  Python functions -> the first line of their docstring (summaries)
written as out/{train,valid,test}.jsonl ({"source", "target", plus the row's keys}) and out/meta.json.

The split is by a key: a field such as `book` (every verse of a test book is a test verse, so the model
never saw the book) or `module`; by default the source text itself, so a sentence that occurs twice cannot
land in train and test both. Keys go to a split by a seeded hash (stable whatever the input order), or
by name with --test-keys / --valid-keys.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import sysconfig
import textwrap
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

from lmforge.data.readers import ShardWriter, file_format, open_binary, read_rows
from lmforge.errors import ConfigError, DataError
from lmforge.io import atomic_write_json

FORMAT = "lmforge-pairs/1"
SPLITS = ("train", "valid", "test")
Pair = dict[str, Any]  # {"source", "target", and keys such as "book", "module"}


def pairs(
    out: Path = Path("pairs"),
    *,
    source: Path | None = None,
    target: Path | None = None,
    sword: str | None = None,
    python_docstrings: str | None = None,
    docstring_task: Literal["code", "prose"] = "code",
    source_field: str = "source",
    target_field: str = "target",
    split_by: str | None = None,
    valid: float = 0.05,
    test: float = 0.05,
    valid_keys: str | list[str] | None = None,
    test_keys: str | list[str] | None = None,
    max_length_ratio: float | None = None,
    seed: int = 0,
    overwrite: bool = False,
) -> Path:
    """Build (source, target) pairs for translation or summarization, split into train / valid / test.

    Args:
        out: Directory for train.jsonl, valid.jsonl, test.jsonl and meta.json; refused if it holds files.
        source: A text file line-aligned with --target, or a TSV/CSV/JSONL/Parquet file of rows holding both
            sides (fields --source-field / --target-field).
        target: The line-aligned translation of a text --source.
        sword: Two SWORD Bible modules, "SOURCE,TARGET" (ids, abbreviations or Debian names such as kjv,sparv),
            aligned verse by verse; rows carry book, chapter and verse.
        python_docstrings: Folders of Python files, comma-separated; "stdlib" is this Python's standard
            library and "site-packages" its installed packages. Each documented function becomes a pair (see
            --docstring-task); rows carry module, name and root (the folder it came from). A module keeps
            its split whatever other folders are added, so "stdlib,site-packages" has stdlib's test split.
        docstring_task: "code": the function without its docstring -> the docstring's first line; "prose":
            the docstring's body -> its first line (only functions whose docstring has a body).
        source_field: Field or column of the source side in a rows file.
        target_field: Field or column of the target side in a rows file.
        split_by: The key that decides the split: a row field ("book" for --sword, "module" for
            --python-docstrings, which are their defaults); default: the source text.
        valid: Fraction of keys for the validation split (by seeded hash).
        test: Fraction of keys for the test split (by seeded hash).
        valid_keys: Keys that form the validation split instead of a hashed fraction (e.g. Joel,Titus).
        test_keys: Keys that form the test split instead of a hashed fraction (e.g. Ruth,Jonah).
        max_length_ratio: Drop pairs whose longer side has more than this many times the characters of the
            shorter (misaligned verses and lines); default keeps all.
        seed: Seed of the hash that assigns keys to splits.
        overwrite: Replace the files of an existing pairs directory.

    Returns:
        The pairs directory.
    """
    inputs = [name for name, value in (("--source", source), ("--sword", sword),
                                       ("--python-docstrings", python_docstrings)) if value is not None]
    if len(inputs) != 1:
        raise ConfigError("give exactly one input: --source (with --target for line-aligned text files), --sword "
                          f"SOURCE,TARGET or --python-docstrings DIR (got {', '.join(inputs) or 'none'})")
    if target is not None and source is None:
        raise ConfigError("--target goes with --source (the line-aligned source text file)")
    for name, value in (("valid", valid), ("test", test)):
        if not 0 <= value < 1:
            raise ConfigError(f"--{name} {value}: a fraction in [0, 1)")
    if valid + test >= 1 and not (valid_keys and test_keys):
        raise ConfigError(f"--valid {valid} + --test {test} leave nothing to train on")
    out = Path(out)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"{out}: already holds files; choose another --out or pass --overwrite true")
    dropped: Counter[str] = Counter()
    if sword is not None:
        rows, described = sword_pairs(sword, dropped), {"sword": sword}
        split_by = split_by or "book"
    elif python_docstrings is not None:
        rows = docstring_pairs(python_docstrings, docstring_task, dropped)
        described = {"python_docstrings": str(python_docstrings), "docstring_task": docstring_task}
        split_by = split_by or "module"
    else:
        assert source is not None
        rows = read_pairs(Path(source), None if target is None else Path(target), source_field=source_field,
                          target_field=target_field)
        described = {"source": str(source), **({"target": str(target)} if target is not None else {})}
    if max_length_ratio is not None:
        if max_length_ratio < 1:
            raise ConfigError(f"--max-length-ratio {max_length_ratio}: at least 1")
        rows = _within_ratio(rows, max_length_ratio, dropped)
    counts = write_splits(list(rows), out, split_by=split_by, valid=valid, test=test, valid_keys=valid_keys,
                          test_keys=test_keys, seed=seed, meta={**described, "dropped": dict(dropped)})
    print(f"wrote {out}: " + ", ".join(f"{counts[s]:,} {s}" for s in SPLITS) +
          (f"; dropped {dict(dropped)}" if dropped else ""), file=sys.stderr)
    return out


# ---- reading pairs ---------------------------------------------------------------------------------------


def _text_lines(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line without its newline) of a UTF-8 text file (.gz / .zst too), strictly."""
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open_binary(path) as f:
        for line_no, raw in enumerate(f, start=1):
            try:
                yield line_no, raw.decode("utf-8").rstrip("\r\n")
            except UnicodeDecodeError as e:
                raise DataError(f"{path}:{line_no}: invalid UTF-8 at byte {e.start} of the line") from None


def read_pairs(source: Path, target: Path | None = None, *, source_field: str = "source",
               target_field: str = "target") -> Iterator[Pair]:
    """Pairs of two line-aligned text files, or of one rows file; misaligned or empty input is a DataError
    naming the file and line."""
    if target is None:
        if file_format(source) == "text":
            raise ConfigError(f"{source}: a text file needs --target (its line-aligned translation); a single file "
                              f"must be TSV/CSV/JSONL/Parquet with {source_field!r} and {target_field!r} fields")
        yield from _row_pairs(source, source_field, target_field)
        return
    for path in (source, target):
        if file_format(path) != "text":
            raise ConfigError(f"{path}: --source/--target pairs are line-aligned text files; for one "
                              f"{file_format(path)} file of rows give it alone as --source")
    left, right = _text_lines(source), _text_lines(target)
    n = 0
    while True:
        a_line, b_line = next(left, None), next(right, None)
        if a_line is None or b_line is None:
            break
        n, a, b = a_line[0], a_line[1], b_line[1]
        if not a.strip() and not b.strip():
            continue  # a blank line on both sides separates nothing: skipped
        for path, text, other in ((source, a, target), (target, b, source)):
            if not text.strip():
                raise DataError(f"{path}:{n}: empty line, but line {n} of {other} is not; the files are "
                                "misaligned (or delete the line on both sides)")
        yield {"source": a.strip(), "target": b.strip(), "line": n}
    if a_line is not None or b_line is not None:
        longer, rest = (source, left) if a_line is not None else (target, right)
        shorter = target if longer == source else source
        total = n + 1 + sum(1 for _ in rest)
        raise DataError(f"{longer}: {total} lines, but {shorter} has {n}; line-aligned files need the same number "
                        f"of lines (first unmatched: {longer}:{n + 1})")
    if n == 0:
        raise DataError(f"{source}: empty file; nothing to pair")


def _row_pairs(path: Path, source_field: str, target_field: str) -> Iterator[Pair]:
    n = 0
    for line, row in read_rows(path):
        for name in (source_field, target_field):
            value = row.get(name)
            if name not in row:
                raise DataError(f"{path}:{line}: field {name!r} missing (found keys: {sorted(row)}); name the "
                                "fields with --source-field / --target-field")
            if not isinstance(value, str) or not value.strip():
                raise DataError(f"{path}:{line}: field {name!r} must be a non-empty string, got {value!r}")
        extra = {k: v for k, v in row.items() if k not in (source_field, target_field)}
        yield {**extra, "source": row[source_field].strip(), "target": row[target_field].strip(), "line": line}
        n += 1
    if n == 0:
        raise DataError(f"{path}: no rows; nothing to pair")


def _within_ratio(rows: Iterator[Pair], ratio: float, dropped: Counter[str]) -> Iterator[Pair]:
    for row in rows:
        a, b = len(row["source"]), len(row["target"])
        if max(a, b) > ratio * min(a, b):
            dropped["length_ratio"] += 1
        else:
            yield row


# ---- SWORD Bibles ----------------------------------------------------------------------------------------

_CAPS_WORD = re.compile(r"^(\W*(?:[^\W\d_]\W+)?)([^\W\d_]{2,})")  # the first word of 2+ letters ("Y ACONTECIÓ")


def _uses_drop_caps(first_verses: list[str]) -> bool:
    """Whether a module prints each chapter's first word in capitals (RV1909: "EN el principio"), a
    typesetting habit; the word is then recased, or `EN` and `En` would be two words to learn."""
    caps = sum(1 for text in first_verses if (m := _CAPS_WORD.match(text)) and m.group(2).isupper())
    return caps > 0.5 * max(1, len(first_verses))


def _recase(text: str) -> str:
    m = _CAPS_WORD.match(text)
    if m is None or not m.group(2).isupper():
        return text
    word = m.group(2).lower() if any(c.isalpha() for c in m.group(1)) else m.group(2).capitalize()
    return m.group(1) + word + text[m.end():]


def sword_pairs(names: str, dropped: Counter[str]) -> Iterator[Pair]:
    """Verse-aligned pairs of two KJV-versified modules; a verse empty in either is dropped (and counted)."""
    from lmforge.data.sword import read_module

    parts = [n.strip() for n in str(names).split(",") if n.strip()]
    if len(parts) != 2:
        raise ConfigError(f"--sword {names!r}: two modules, SOURCE,TARGET (e.g. kjv,sparv)")
    sides = [list(read_module(name)) for name in parts]
    for i, verses in enumerate(sides):
        if _uses_drop_caps([v.text for v in verses if v.verse == 1]):
            sides[i] = [v if v.verse != 1 else type(v)(v.book, v.chapter, v.verse, _recase(v.text)) for v in verses]
    # Paired by reference, not by position: a module may lack a testament (New-Testament-only modules)
    targets = {(v.book, v.chapter, v.verse): v.text for v in sides[1]}
    for a in sides[0]:
        b = targets.get((a.book, a.chapter, a.verse))
        if b is None:
            dropped["verse_missing_in_target"] += 1
            continue
        if not a.text or not b:
            dropped["empty_verse"] += 1
            continue
        yield {"source": a.text, "target": b, "book": a.book, "chapter": a.chapter, "verse": a.verse}
    sources = {(v.book, v.chapter, v.verse) for v in sides[0]}
    if missing := sum(1 for key in targets if key not in sources):
        dropped["verse_missing_in_source"] += missing


# ---- Python docstrings ------------------------------------------------------------------------------------

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "__pycache__", "idle_test"}


NAMED_FOLDERS = {"stdlib": "stdlib", "site-packages": "purelib"}  # sysconfig's names for them


def python_files(root: str | Path) -> tuple[Path, list[Path]]:
    """(folder, its .py files in sorted order); "stdlib" is this Python's standard library, "site-packages" its
    installed packages. Test suites (and, inside a folder, installed packages) are left out: their functions
    are fixtures, or another folder's code."""
    name = NAMED_FOLDERS.get(str(root))
    folder = Path(sysconfig.get_paths()[name]) if name else Path(root)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder of Python files")
    files = sorted(p for p in folder.rglob("*.py")
                   if not any(part in _SKIP_DIRS or part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: no .py files")
    return folder, files


def _summary_and_body(doc: str) -> tuple[str, str]:
    lines = doc.strip().splitlines()
    summary = lines[0].strip() if lines else ""
    body = "\n".join(lines[1:]).strip()
    return summary, body


def _without_docstring(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    """The function's source with its docstring statement cut out, dedented."""
    doc = node.body[0]
    assert node.end_lineno is not None and doc.end_lineno is not None
    start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
    kept = lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return textwrap.dedent("\n".join(kept)).strip()


def docstring_pairs(root: str | Path, task: Literal["code", "prose"], dropped: Counter[str]) -> Iterator[Pair]:
    """A pair per documented function (methods too): code (or the docstring's body) -> its summary line.

    Functions whose summary is not a sentence of 3-40 words, and exact duplicates, are dropped and counted.
    """
    seen: set[str] = set()
    for part in [p.strip() for p in str(root).split(",") if p.strip()]:
        yield from _docstring_pairs(part, task, dropped, seen)


def _docstring_pairs(root: str, task: Literal["code", "prose"], dropped: Counter[str], seen: set[str]
                     ) -> Iterator[Pair]:
    folder, files = python_files(root)
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
            tree = ast.parse(text, filename=str(path))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            dropped["unparsable_file"] += 1
            continue
        module = ".".join(path.relative_to(folder).with_suffix("").parts).removesuffix(".__init__")
        lines = text.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node)
            if not doc:
                continue
            summary, body = _summary_and_body(doc)
            if not 3 <= len(summary.split()) <= 40:
                dropped["short_or_long_summary"] += 1
                continue
            if task == "code":
                src = _without_docstring(lines, node)
            else:
                src = " ".join(body.split())
                if len(src.split()) < 5:
                    dropped["no_body"] += 1
                    continue
            if src in seen:
                dropped["duplicate"] += 1
                continue
            seen.add(src)
            yield {"source": src, "target": summary, "module": module, "name": node.name, "line": node.lineno,
                   "root": root}


# ---- splitting and writing -------------------------------------------------------------------------------


def _hash_unit(key: str, seed: int) -> float:
    digest = hashlib.blake2b(f"{seed}\0{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def assign_split(key: str, *, valid: float, test: float, valid_keys: set[str] | None, test_keys: set[str] | None,
                 seed: int) -> str:
    """"train", "valid" or "test" for a key: by name where key lists are given, else by seeded hash."""
    if test_keys is not None and key in test_keys:
        return "test"
    if valid_keys is not None and key in valid_keys:
        return "valid"
    u = _hash_unit(key, seed)
    if test_keys is None and u < test:
        return "test"
    if valid_keys is None and test <= u < test + valid:
        return "valid"
    return "train"


def _keys(values: list[str] | str | None) -> set[str] | None:
    if values is None:
        return None
    items = values.split(",") if isinstance(values, str) else values
    return {str(v).strip() for v in items if str(v).strip()}


def write_splits(rows: list[Pair], out: Path, *, split_by: str | None, valid: float, test: float,
                 valid_keys: list[str] | str | None = None, test_keys: list[str] | str | None = None, seed: int = 0,
                 meta: dict[str, Any] | None = None) -> dict[str, int]:
    """Write rows to out/{train,valid,test}.jsonl by the key `split_by` (default: the source text) and
    meta.json; named keys that no row has are an error (a typo would silently empty a split)."""
    if not rows:
        raise DataError("no pairs to write (every input pair was dropped)")
    if split_by is not None and split_by not in rows[0]:
        raise ConfigError(f"--split-by {split_by!r}: the pairs have no such field (fields: {sorted(rows[0])})")
    named_valid, named_test = _keys(valid_keys), _keys(test_keys)
    key_of = (lambda r: str(r[split_by])) if split_by is not None else (lambda r: r["source"])
    all_keys = {key_of(r) for r in rows}
    for flag, named in (("--valid-keys", named_valid), ("--test-keys", named_test)):
        unknown = sorted((named or set()) - all_keys)
        if unknown:
            known = sorted(all_keys)
            raise ConfigError(f"{flag}: {unknown} are not values of {split_by or 'source'} in the pairs "
                              f"(values: {known[:80]}{' ...' if len(known) > 80 else ''})")
    if named_valid and named_test and named_valid & named_test:
        raise ConfigError(f"--valid-keys and --test-keys share {sorted(named_valid & named_test)}")
    out.mkdir(parents=True, exist_ok=True)
    counts = dict.fromkeys(SPLITS, 0)
    keys: dict[str, list[str]] = {s: [] for s in SPLITS}
    writers = {s: ShardWriter(out / f"{s}.jsonl") for s in SPLITS}
    try:
        for i, row in enumerate(rows):
            key = key_of(row)
            split = assign_split(key, valid=valid, test=test, valid_keys=named_valid, test_keys=named_test,
                                 seed=seed)
            writers[split].write({"id": i, **row})
            counts[split] += 1
            if split_by is not None and (not keys[split] or keys[split][-1] != key):
                keys[split].append(key)
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    info = {"format": FORMAT, "counts": counts, "split_by": split_by or "source", "seed": seed,
            "fractions": {"valid": valid, "test": test}, **(meta or {})}
    if split_by is not None:
        info["keys"] = {s: list(dict.fromkeys(keys[s])) for s in SPLITS}
    atomic_write_json(out / "meta.json", info)
    return counts


def is_pairs_dir(path: str | Path) -> bool:
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return json.loads(meta.read_text(encoding="utf-8")).get("format", "").startswith("lmforge-pairs/")
    except (ValueError, AttributeError):
        return False


def split_file(data: str | Path, split: str) -> Path:
    """The JSONL of one split: `data` itself when it is a file, else data/<split>.jsonl of a pairs directory."""
    data = Path(data)
    if data.is_file():
        return data
    path = data / f"{split}.jsonl"
    if not path.is_file():
        raise DataError(f"{data}: no {split}.jsonl; write a pairs directory with `lmforge data pairs`")
    return path


def load_pairs(path: str | Path, *, source_field: str = "source", target_field: str = "target") -> list[Pair]:
    """Every pair of a JSONL/TSV/CSV/Parquet file (or a pairs directory's split file), checked as it is read."""
    return list(_row_pairs(Path(path), source_field, target_field))
