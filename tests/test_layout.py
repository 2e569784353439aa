"""The package's shape: no import cycles, and lower layers never import higher ones (DESIGN.md).

Every `import` counts, also those inside functions: a lazy import hides a cycle from Python, not from a reader.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "lmforge"
VERBS = {"eval", "methods", "apps", "compress", "export", "convert", "demo", "runs", "cli", "__init__", "__main__"}
# What each room of the package must never import: machinery never imports the verbs built on it.
FORBIDDEN = {
    "errors": {"*"}, "io": {"*"}, "progress": {"*"}, "precision": {"*"}, "options": {"*"},
    "config": {"*"},
    "tokenizer": {"model", "checkpoint", "train", "infer", "lm", *VERBS},
    "model": {"data", "checkpoint", "train", "infer", "lm", *VERBS},
    "data": {"train", "infer", "lm", *VERBS},
    "checkpoint": {"data", "train", "infer", "lm", *VERBS},
    "train": {"infer", "lm", *VERBS},
    "infer": {"train", *VERBS},
    "lm": {"train", *VERBS},
}
LOWEST = {"errors", "io", "progress", "precision", "options"}


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """lmforge modules that `path` imports (a name imported from a package counts as its submodule if one)."""
    here = module_name(path)
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                package = here.split(".")[:len(here.split(".")) - node.level + (path.name == "__init__.py")]
                base = ".".join([*package, *([base] if base else [])])
            names = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
        else:
            continue
        found |= {n for n in names if n in modules and n != here}
    return found


def graph() -> dict[str, set[str]]:
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    return {name: imports_of(path, set(files)) for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in edges[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def room(module: str) -> str:
    return module.split(".")[1] if "." in module else "__init__"


def forbidden(a: str, b: str) -> bool:
    rule = FORBIDDEN.get(room(a), set())
    return room(b) in rule or ("*" in rule and room(b) not in LOWEST | {room(a)})


def test_no_import_cycles():
    """No module reaches itself through imports (a cycle means two modules are one idea split badly)."""
    assert cycles(graph()) == []


def test_cycle_finder_finds_a_cycle():
    assert cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_lower_layers_never_import_higher_ones():
    """data and model never import train, eval, infer or the verbs; the checkpoint module imports no verb."""
    upward = sorted(f"{a} -> {b}" for a, deps in graph().items() for b in deps if forbidden(a, b))
    assert upward == []


def test_every_room_is_known():
    """A new top-level module or folder must be placed in the rules above (or be a verb)."""
    known = set(FORBIDDEN) | VERBS | LOWEST
    assert sorted({room(m) for m in graph()} - known) == []
