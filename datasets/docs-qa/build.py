"""Build docs-qa: short Markdown documents made of Python standard-library docstrings, and a reader training set.

docs/        one Markdown file per module: its docstring, then the signature and docstring of its public
             functions and classes (doctest examples fenced as ```python blocks). Real text written by the
             CPython developers; the questions in questions.jsonl were written by hand from these files.
train.json   SQuAD v1.1-format training data for the extractive reader, made from *other* modules (none of
             the documents above): for each function whose docstring says "Return ...", the question
             "What does NAME return?" answered by the rest of that sentence. Templated, so it teaches the
             span head the shape of the task, not the test questions.

Rebuild (the shipped files came from CPython 3.11.7; other versions word some docstrings differently):

    python datasets/docs-qa/build.py

Python's documentation is under the PSF License Version 2 (https://docs.python.org/3/license.html).
"""

from __future__ import annotations

import importlib
import inspect
import json
import random
import re
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC_MODULES = ["heapq", "bisect", "textwrap", "json", "csv", "shutil", "tempfile", "functools", "itertools",
               "collections", "argparse", "random", "statistics", "hashlib", "base64", "uuid", "fractions",
               "zipfile", "gzip", "string", "copy", "fnmatch", "difflib", "secrets", "shlex", "urllib.parse",
               "timeit", "pprint", "glob", "calendar"]
TRAIN_MODULES = ["os", "os.path", "math", "operator", "re", "struct", "io", "pathlib", "datetime", "time", "sys",
                 "socket", "sqlite3", "pickle", "logging", "subprocess", "threading", "queue", "inspect", "ast",
                 "tokenize", "html", "email.utils", "http.client", "urllib.request", "locale", "codecs",
                 "unicodedata", "binascii", "zlib", "bz2", "lzma", "tarfile", "configparser", "plistlib",
                 "mimetypes", "ipaddress", "decimal", "numbers", "cmath", "array", "weakref", "types", "typing",
                 "enum", "dataclasses", "contextlib", "abc", "traceback", "warnings", "gettext", "platform",
                 "sysconfig", "filecmp", "stat", "selectors", "signal", "xml.dom.minidom", "wave", "colorsys"]
MAX_DOC_CHARS = 6000
RETURN = re.compile(r"^Return(?:s)? (.+?)\.(?:\s|$)", re.S)


def fenced(doc: str) -> str:
    """Docstring text with each run of doctest lines (>>> / ...) and their output fenced as Python."""
    out, block = [], []
    for line in inspect.cleandoc(doc).splitlines():
        if line.lstrip().startswith((">>>", "...")) or (block and line.strip()):
            block.append(line)
            continue
        if block:
            out += ["```python", *block, "```"]
            block = []
        out.append(line)
    if block:
        out += ["```python", *block, "```"]
    return "\n".join(out).strip()


def members(module: object) -> list[tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    found = []
    for name in sorted(names):
        obj = getattr(module, name, None)
        public = inspect.isfunction(obj) or inspect.isbuiltin(obj) or inspect.isclass(obj)
        if public and isinstance(obj.__doc__, str) and obj.__doc__.strip():
            found.append((name, obj))
    return found


def signature(name: str, obj: object) -> str:
    try:
        return re.sub(r" at 0x[0-9a-f]+", "", f"{name}{inspect.signature(obj)}")  # no memory addresses
    except (TypeError, ValueError):
        return name


def document(module_name: str) -> str:
    module = importlib.import_module(module_name)
    parts = [f"# {module_name}", fenced(module.__doc__ or "")]
    for name, obj in members(module):
        if inspect.isclass(obj) and obj.__module__ != module.__name__:
            continue  # re-exported classes (e.g. collections' abc aliases) belong to their own module
        section = f"## {module_name}.{signature(name, obj)}\n\n{fenced(obj.__doc__ or '')}"
        if sum(map(len, parts)) + len(section) > MAX_DOC_CHARS:
            break
        parts.append(section)
    return "\n\n".join(p for p in parts if p.strip()) + "\n"


def training_examples(seed: int = 0) -> list[dict]:
    """SQuAD paragraphs: "NAME(signature)" then its docstring; one "What does NAME return?" per paragraph."""
    paragraphs, seen = [], set()
    for module_name in TRAIN_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            continue
        for name, obj in members(module):
            doc = inspect.cleandoc(obj.__doc__ or "")
            match = RETURN.match(doc)
            if not match or inspect.isclass(obj) or (module_name, name) in seen or len(match.group(1)) > 150:
                continue
            seen.add((module_name, name))
            head = f"{module_name}.{signature(name, obj)}\n\n"
            context = head + doc
            answer = match.group(1)
            start = len(head) + match.start(1)
            assert context[start:start + len(answer)] == answer
            paragraphs.append({"context": context, "qas": [{
                "id": f"{module_name}.{name}", "question": f"What does {module_name}.{name} return?",
                "answers": [{"text": answer, "answer_start": start}]}]})
    random.Random(seed).shuffle(paragraphs)
    return [{"title": "python-stdlib-returns", "paragraphs": paragraphs}]


def main() -> None:
    docs = HERE / "docs"
    docs.mkdir(exist_ok=True)
    for name in DOC_MODULES:
        (docs / f"{name}.md").write_text(document(name), encoding="utf-8")
    data = training_examples()
    (HERE / "train.json").write_text(json.dumps({"version": "1.1", "data": data}, indent=1) + "\n",
                                     encoding="utf-8")
    print(f"{len(DOC_MODULES)} documents in {docs}, {len(data[0]['paragraphs'])} training questions")


if __name__ == "__main__":
    main()
