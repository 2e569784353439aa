"""`lmforge code`: programming assistance from a code model, ours or imported (StarCoder, Qwen-Coder, ...).

- `complete`: fill in the middle at a cursor (the model sees the code before *and* after it, through the
  tokenizer's FIM sentinels, `lmforge.data.fim`), stopping at the end of the block the cursor is in;
- `check`: what `compile` rejects (line and column), then every line ranked by how surprised the model is by
  its most surprising token: a single wrong token (a swapped operator, an off-by-one) tends to stand out;
- `tests`: test functions written by the model for each public function, each run against the module in
  the evaluation sandbox (`lmforge.eval.sandbox`); failing or erroring ones are dropped and the kept file is
  run once more as a whole, so it runs green.
"""

from __future__ import annotations

import ast
import json
import math
import sys
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from lmforge.data.fim import prompt_ids
from lmforge.errors import ConfigError
from lmforge.io import check_output
from lmforge.lm import LM

LN2 = math.log(2)


def _lm(model: str | Path | LM, device: str | None = None) -> LM:
    if isinstance(model, LM):
        return model
    from lmforge.lm import load

    lm = load(model, device=device)
    lm.require_decoder("complete code")
    if lm.is_seq2seq:
        raise ConfigError(f"{model}: an encoder-decoder (translation / summarization) model cannot read or write "
                          "code at a cursor; use a decoder trained on code (pretrain on a code corpus, or an "
                          "imported StarCoder / Qwen-coder)")
    return lm


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" \t"))


def cursor_offset(source: str, line: int, column: int | None = None) -> int:
    """Character offset of a 1-based (line, column) cursor; no column: the end of that line's text."""
    lines = source.splitlines(keepends=True)
    if not 1 <= line <= len(lines) + 1:
        raise ConfigError(f"line {line} is outside the file (1..{len(lines) + 1})")
    start = sum(len(x) for x in lines[:line - 1])
    text = lines[line - 1].rstrip("\r\n") if line <= len(lines) else ""
    if column is None:
        return start + len(text)
    if not 1 <= column <= len(text) + 1:
        raise ConfigError(f"column {column} is outside line {line} (1..{len(text) + 1})")
    return start + column - 1


def block_end(middle: str, prefix: str, suffix: str, max_lines: int | None = None) -> tuple[str, bool]:
    """`middle` cut where the block at the cursor ends, and whether it was cut.

    Mid-line (code after the cursor on its line) the middle ends at its line's end. Otherwise the block's
    indentation is the last non-blank line's before the cursor (deeper after a line ending in ":"), and the
    middle ends before the first complete generated line indented less (or, at module level, before the next
    top-level statement after a blank line).
    """
    after = suffix.split("\n", 1)[0]
    current = prefix.rsplit("\n", 1)[-1]  # the cursor line's text before the cursor
    if after.strip() and current.strip():
        head, sep, _ = middle.partition("\n")
        return head, bool(sep)
    last = next((x for x in reversed(prefix.split("\n")) if x.strip()), "")
    base = _indent(last) + (1 if last.rstrip().endswith(":") else 0)
    kept, seen_blank, count = [], False, 0
    pieces = middle.split("\n")
    for i, piece in enumerate(pieces):
        complete = i < len(pieces) - 1
        text = (current + piece) if i == 0 else piece
        if i == 0 and current.strip():  # the rest of the line the user began (`def f(x):|`): never a dedent
            kept.append(piece)
            continue
        if complete and text.strip():
            if (base > 0 and _indent(text) < base) or (base == 0 and seen_blank and count and _indent(text) == 0):
                return "\n".join(kept) + ("\n" if kept else ""), True
            count += 1
            if max_lines is not None and count >= max_lines:
                kept.append(piece)
                return "\n".join(kept) + "\n", True
        elif complete:
            seen_blank = True
        kept.append(piece)
    return middle, False


def complete_at(lm: LM, source: str, line: int, column: int | None = None, *, fim: bool | None = None,
                max_new_tokens: int = 128, lines: int | None = None, temperature: float = 0.0,
                seed: int | None = None) -> str:
    """The code the model writes at the cursor (line, column; 1-based), up to the end of its block.

    `fim` None: fill in the middle when the tokenizer has FIM tokens, else continue the text before the
    cursor (left to right). `lines`: also stop after this many non-blank lines.
    """
    at = cursor_offset(source, line, column)
    prefix, suffix = source[:at], source[at:]
    tok = lm.tokenizer
    if fim is None:
        fim = tok.fim is not None
    context = lm.config.max_position_embeddings
    budget = max(8, context - max_new_tokens - 4)
    healed = ""
    if fim:
        pre, suf = tok.encode_batch([prefix, suffix], add_bos=False)
        suf = suf[:budget // 3]
        pre = pre[-(budget - len(suf)):]
        ids = prompt_ids(tok, tok.decode(pre), tok.decode(suf))
        stops = [*tok.fim.names, *tok.fim.stop_names]
    else:
        head, healed = heal(prefix)
        ids = tok.encode(head)[-budget:]
        stops = []
    if not ids:
        ids = [tok.eos_id]
    text = ""
    for piece in lm.stream(ids, max_new_tokens=max_new_tokens, temperature=temperature, stop=stops, seed=seed):
        text += piece
        if "\n" in piece and len(text) > len(healed):
            cut, done = block_end(unheal(text, healed), prefix, suffix, lines)
            if done:
                return cut
    return block_end(unheal(text, healed), prefix, suffix, lines)[0]


def heal(prefix: str) -> tuple[str, str]:
    """(prompt, healed): a prefix that ends at the start of a line is cut back to before its last newline.

    Byte-level BPE joins a newline with the indentation after it ("\\n   " is one token), so a prompt that ends in
    a lone "\\n" token is one the model rarely saw in training: it answers with a blank line or a dedent (a
    left-to-right llama-tiny completed 0 of 200 held-out lines that way). Cutting the prompt back lets the model
    write the newline and the indentation together; `unheal` removes what the prefix already had. (Token
    healing, as in Microsoft's guidance library.) FIM prompts need none of this: training cut their prefixes
    at any character.
    """
    cut = prefix.rfind("\n")
    if cut < 0 or prefix[cut:].strip(" \t\n"):
        return prefix, ""
    return prefix[:cut], prefix[cut:]


def unheal(text: str, healed: str) -> str:
    """`text` after the part of it the prefix already had (what the model wrote beyond the cursor)."""
    if text.startswith(healed):
        return text[len(healed):]
    same = next((i for i, (a, b) in enumerate(zip(text, healed)) if a != b), min(len(text), len(healed)))
    return text[same:]


def complete(model: str | Path | LM, file: Path, line: int, column: int | None = None, *, fim: bool | None = None,
             max_new_tokens: int = 128, temperature: float = 0.0, device: str | None = None) -> str:
    """Fill in the middle of `file` at the cursor (1-based line and column; no column: the end of the line).

    Args:
        model: A code model (checkpoint, Hugging Face folder, or a loaded `LM`); one with FIM tokens (trained
            here on a code corpus, or StarCoder / Qwen-Coder / DeepSeek-Coder) sees the code after the cursor.
        file: The source file.
        line: Cursor line, from 1.
        column: Cursor column, from 1; default: the end of the line.
        fim: Force fill-in-the-middle (true) or left-to-right (false); default: FIM when the model can.
        max_new_tokens: Most tokens generated.
        temperature: 0 decodes greedily.
        device: cpu or cuda; default cuda when available.

    Returns:
        The inserted text (printed by the CLI).
    """
    source = Path(file).read_text(encoding="utf-8")
    return complete_at(_lm(model, device), source, line, column, fim=fim, max_new_tokens=max_new_tokens,
                       temperature=temperature)


# ----- check --------------------------------------------------------------------------------------------------


def syntax_errors(source: str, filename: str = "<source>") -> list[dict[str, Any]]:
    """What `compile` reports: a SyntaxError (line, column from 1) and any SyntaxWarning."""
    found: list[dict[str, Any]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            compile(source, filename, "exec", dont_inherit=True)
        except SyntaxError as e:
            found.append({"kind": "error", "line": e.lineno, "column": e.offset, "message": e.msg})
        except ValueError as e:  # null bytes
            found.append({"kind": "error", "line": None, "column": None, "message": str(e)})
    for w in caught:
        if issubclass(w.category, SyntaxWarning):
            found.append({"kind": "warning", "line": w.lineno, "column": None, "message": str(w.message)})
    return found


@torch.no_grad()
def token_surprise(lm: LM, text: str) -> list[tuple[int, int, float]]:
    """(start, end, bits) for each token of `text`: -log2 p(token | what precedes it). Text longer than the
    context is scored in windows, each token seeing at least half a context before it."""
    tok = lm.tokenizer
    enc = tok.hf.encode(text, add_special_tokens=False)
    ids, offsets = enc.ids, enc.offsets
    head = tok.encode("") or [tok.eos_id]
    seq = [*head, *ids]
    context = lm.config.max_position_embeddings
    half = max(1, context // 2)
    bits = [0.0] * len(ids)
    lm.model.eval()
    start = 0
    while start < len(ids):
        end = min(len(ids), start + half)
        lo = max(0, start + len(head) - (context - (end - start)))
        window = seq[lo:end + len(head)]
        logits = lm.model(torch.tensor([window[:-1]], device=lm.device))[0].float()
        logp = F.log_softmax(logits, dim=-1)
        targets = torch.tensor(window[1:], device=lm.device)
        values = -logp.gather(-1, targets[:, None])[:, 0] / LN2
        n = end - start
        bits[start:end] = values[-n:].tolist()
        start = end
    return [(a, b, v) for (a, b), v in zip(offsets, bits)]


def check_source(lm: LM, source: str, filename: str = "<source>") -> dict[str, Any]:
    """Syntax errors, and the non-blank lines ranked by their most surprising token (bits), worst first."""
    starts = [0]
    for i, ch in enumerate(source):
        if ch == "\n":
            starts.append(i + 1)
    texts = source.split("\n")
    per_line: dict[int, list[tuple[float, int, int]]] = {}
    import bisect

    for a, b, v in token_surprise(lm, source):
        # a token belongs to the line of its last non-newline character ("\n    " opens the next line)
        at = max(a, b - 1)
        while at > a and source[at] == "\n":
            at -= 1
        line = bisect.bisect_right(starts, at)
        per_line.setdefault(line, []).append((v, a, b))
    ranked = []
    for line, toks in per_line.items():
        if line > len(texts) or not texts[line - 1].strip():
            continue
        worst = max(toks)
        ranked.append({"line": line, "max_bits": round(worst[0], 3),
                       "mean_bits": round(sum(t[0] for t in toks) / len(toks), 3),
                       "token": source[worst[1]:worst[2]], "text": texts[line - 1]})
    ranked.sort(key=lambda r: -r["max_bits"])
    return {"errors": syntax_errors(source, filename), "lines": ranked}


def check(model: str | Path | LM, file: Path, *, top: int = 10, json_out: bool = False,
          device: str | None = None) -> str:
    """Syntax and compile errors of a Python file, then the lines the model finds least probable, ranked.

    Args:
        model: A code model (checkpoint, Hugging Face folder, or a loaded `LM`).
        file: The Python source file.
        top: How many ranked lines to show.
        json_out: Print the whole report as JSON instead.
        device: cpu or cuda; default cuda when available.

    Returns:
        The report text.
    """
    file = Path(file)
    report = check_source(_lm(model, device), file.read_text(encoding="utf-8"), str(file))
    if json_out:
        return json.dumps(report, indent=2)
    out = [f"{file}:{e['line']}:{e['column'] or 0}: {e['kind']}: {e['message']}" for e in report["errors"]]
    if not report["errors"]:
        out.append(f"{file}: compiles")
    out.append("least probable lines (bits of the most surprising token):")
    for r in report["lines"][:top]:
        out.append(f"{file}:{r['line']}: {r['max_bits']:6.2f} bits at {r['token']!r}   {r['text'].strip()}")
    return "\n".join(out)


# ----- tests --------------------------------------------------------------------------------------------------

HARNESS = """\
import os, sys
sys.path.insert(0, os.getcwd())
with open({module_file!r}, "w", encoding="utf-8") as f:
    f.write({source!r})
namespace = {{"__name__": "generated_tests"}}
exec(compile({tests!r}, "test_generated.py", "exec"), namespace)
for name in {names!r}:
    namespace[name]()
"""


def public_functions(source: str) -> list[str]:
    """Top-level functions not starting with an underscore (what generated tests call)."""
    tree = ast.parse(source)
    return [n.name for n in tree.body if isinstance(n, ast.FunctionDef) and not n.name.startswith("_")]


def _test_block(name: str, opening: str, completion: str) -> str | None:
    """One test function: the prompt's opening plus the completion up to the end of its body; None when it
    does not parse or asserts nothing."""
    body = []
    for line in completion.split("\n"):
        if line.strip() and _indent(line) == 0 and body:
            break
        body.append(line)
    text = (opening + "\n".join(body)).rstrip() + "\n"
    try:
        tree = ast.parse(text)
    except SyntaxError:
        return None
    if len(tree.body) != 1 or not any(isinstance(n, ast.Assert) for n in ast.walk(tree)):
        return None
    return text


def run_tests(source: str, module: str, tests: str, names: list[str], *, isolate: bool = True,
              timeout: float = 10.0) -> bool:
    """Run test functions `names` of `tests` (which import `module`) against `source` in the sandbox."""
    from lmforge.eval.sandbox import Limits, run_python

    code = HARNESS.format(module_file=f"{module}.py", source=source, tests=tests, names=names)
    return run_python(code, Limits(timeout=timeout), isolate=isolate).passed


def generate_tests(lm: Any, source: str, module: str = "app", *, samples: int = 4, max_new_tokens: int = 96,
                   temperature: float = 0.8, seed: int = 0, isolate: bool = True,
                   timeout: float = 10.0) -> dict[str, Any]:
    """Prompt the model for `samples` tests per public function, keep those that pass in the sandbox.

    Returns {"file": the kept test file, "kept": [names], "dropped": {name: reason}}.
    """
    if not module.isidentifier():
        raise ConfigError(f"{module!r} is not an importable module name")
    header = f'"""Tests of {module}.py written by `lmforge code tests`; each passed in the sandbox."""\n' \
             f"from {module} import *  # noqa: F403\n"
    prompts, openings = [], []
    for fn in public_functions(source):
        for k in range(samples):
            opening = f"\n\ndef test_{fn}_{k + 1}():\n    assert {fn}("
            prompts.append(f"{source.rstrip()}\n\n\n# tests of {module}.py\n{header}{opening}")
            openings.append((f"test_{fn}_{k + 1}", opening.lstrip("\n")))
    completions = lm.generate(prompts, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                              stop=["\ndef ", "\nclass ", "\n@", "\nif __name__"]) if prompts else []
    kept: list[tuple[str, str]] = []
    dropped: dict[str, str] = {}
    seen: set[str] = set()
    for (name, opening), completion in zip(openings, completions):
        block = _test_block(name, opening, completion)
        if block is None:
            dropped[name] = "does not parse or asserts nothing"
            continue
        key = block.split("\n", 1)[1]
        if key in seen:
            dropped[name] = "duplicate"
            continue
        seen.add(key)
        if run_tests(source, module, header + "\n\n" + block, [name], isolate=isolate, timeout=timeout):
            kept.append((name, block))
        else:
            dropped[name] = "failed or errored in the sandbox"
    while kept:  # the whole file once more: tests that pass alone but not together are dropped
        text = header + "".join("\n\n" + b for _, b in kept)
        if run_tests(source, module, text, [n for n, _ in kept], isolate=isolate, timeout=timeout):
            break
        name, _ = kept.pop()
        dropped[name] = "failed beside the others"
    text = header + "".join("\n\n" + b for _, b in kept)
    return {"file": text, "kept": [n for n, _ in kept], "dropped": dropped}


def tests(model: str | Path | LM, file: Path, *, out: Path | None = None, samples: int = 4,
          max_new_tokens: int = 96, temperature: float = 0.8, seed: int = 0, unsafe_no_sandbox: bool = False,
          device: str | None = None, overwrite: bool = False) -> str:
    """Write tests for a Python module: generated by the model, each run in the sandbox, only passing ones kept.

    Args:
        model: A code model (checkpoint, Hugging Face folder, or a loaded `LM`).
        file: The module to test (its file name is the module the tests import).
        out: Where to write the test file; default test_<name>.py beside the module.
        samples: Tests sampled per public function.
        max_new_tokens: Most tokens per test.
        temperature: Sampling temperature (several different tests need some).
        seed: Makes sampling reproducible.
        unsafe_no_sandbox: Run generated code without isolation (where bwrap is unavailable).
        device: cpu or cuda; default cuda when available.
        overwrite: Replace a non-empty test file at `out` (refused by default, as in every verb).

    Returns:
        A summary line.
    """
    from lmforge.eval.sandbox import check_isolation

    file = Path(file)
    out = Path(out) if out is not None else file.with_name(f"test_{file.name}")
    check_output(out, overwrite)
    check_isolation(not unsafe_no_sandbox)
    result = generate_tests(_lm(model, device), file.read_text(encoding="utf-8"), file.stem, samples=samples,
                            max_new_tokens=max_new_tokens, temperature=temperature, seed=seed,
                            isolate=not unsafe_no_sandbox)
    for name, why in result["dropped"].items():
        print(f"dropped {name}: {why}", file=sys.stderr)
    if not result["kept"]:  # a file without tests would not "run green": pytest exits 5, collecting nothing
        return f"none of the {len(result['dropped'])} generated tests passed; nothing written to {out}"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(result["file"], encoding="utf-8")
    return f"kept {len(result['kept'])} of {len(result['kept']) + len(result['dropped'])} tests in {out}"
