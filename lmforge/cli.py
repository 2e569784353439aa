"""`lmforge VERB [SUBVERB] --option value`: each verb is the Python function of the same name.

jsonargparse builds every parser from the function's signature and its docstring (the help text),
validates types and Literal choices, and gives each verb `--config file.yaml` whose values the
command line overrides — so this file only names the verbs. Options may be spelled with dashes or
underscores (`--max-steps` = `--max_steps`).
"""

from __future__ import annotations

import json
import re
import sys
import warnings
from typing import Any

from lmforge.errors import LMForgeError


def verbs() -> dict[str, Any]:
    from lmforge.apps.answer import answer
    from lmforge.apps.code import check as code_check
    from lmforge.apps.code import complete as code_complete
    from lmforge.apps.code import tests as code_tests
    from lmforge.apps.retrieve import index, retrieve
    from lmforge.apps.summarize import summarize
    from lmforge.apps.translate import translate
    from lmforge.compress.distill import distill
    from lmforge.compress.prune import prune
    from lmforge.compress.quantize import quantize
    from lmforge.compress.report import compress_report
    from lmforge.convert import convert_sharded, from_hf, to_hf
    from lmforge.data.annotate import annotate, merge_labels, validate
    from lmforge.data.pack import pack
    from lmforge.data.pairs import pairs
    from lmforge.data.pipeline import clean, dedup
    from lmforge.data.stats import stats
    from lmforge.demo import demo
    from lmforge.eval.evaluate import compare, evaluate
    from lmforge.eval.perplexity import perplexity
    from lmforge.export.gguf import export_gguf
    from lmforge.export.onnx import export_onnx
    from lmforge.infer.chat import chat
    from lmforge.infer.generate import generate
    from lmforge.infer.server import serve
    from lmforge.methods.classify import finetune_classify, finetune_regress, predict
    from lmforge.methods.pretrain import pretrain
    from lmforge.methods.qa import finetune_qa
    from lmforge.methods.sft import finetune_full, finetune_lora, merge_lora
    from lmforge.model.presets import models
    from lmforge.runs import plot, runs
    from lmforge.tokenizer import train_tokenizer
    from lmforge.train.plan import plan

    return {
        "tokenizer": {"train": train_tokenizer},
        "data": {"pack": pack, "pairs": pairs, "clean": clean, "dedup": dedup, "stats": stats, "validate": validate,
                 "annotate": annotate, "merge-labels": merge_labels},
        "pretrain": pretrain,
        "finetune": {"full": finetune_full, "lora": finetune_lora, "classify": finetune_classify,
                     "regress": finetune_regress, "qa": finetune_qa},
        "merge-lora": merge_lora,
        "predict": predict,
        "eval": {"run": evaluate, "compare": compare, "perplexity": perplexity},
        "convert": {"from-hf": from_hf, "to-hf": to_hf, "sharded": convert_sharded},
        "compress": {"quantize": quantize, "prune": prune, "distill": distill, "report": compress_report},
        "export": {"gguf": export_gguf, "onnx": export_onnx, "hf": to_hf},
        "generate": generate,
        "chat": chat,
        "serve": serve,
        "demo": demo,
        "models": models,
        "runs": runs,
        "plot": plot,
        "plan": plan,
        "translate": translate,
        "summarize": summarize,
        "index": index,
        "retrieve": retrieve,
        "answer": answer,
        "code": {"complete": code_complete, "check": code_check, "tests": code_tests},
    }


_OPTION = re.compile(r"^--[A-Za-z][A-Za-z0-9_.-]*(?==|$)")  # a whole word or before "=": never a value


def normalize_options(argv: list[str]) -> list[str]:
    """`--max-steps 5` → `--max_steps 5`, `--normalize.fix-mojibake` → `--normalize.fix_mojibake`;
    values after `=` are left alone."""
    return [_OPTION.sub(lambda m: m.group(0)[:2] + m.group(0)[2:].replace("-", "_"), a) for a in argv]


def _dashed_help_formatter():
    from jsonargparse import DefaultHelpFormatter

    class DashedHelpFormatter(DefaultHelpFormatter):
        """Help shows `--max-steps`, the spelling the README uses; both spellings parse."""

        def format_help(self) -> str:
            return re.sub(r"--([a-z0-9]+(?:_[a-z0-9]+)+)", lambda m: "--" + m.group(1).replace("_", "-"),
                          super().format_help())

    return DashedHelpFormatter


def eval_shorthand(argv: list[str]) -> list[str]:
    """`eval --model ...` → `eval run --model ...`: jsonargparse subcommands need a name."""
    if argv[:1] == ["eval"] and len(argv) > 1 and argv[1].startswith("--") and argv[1] not in (
            "--help", "--print_config"):
        return ["eval", "run", *argv[1:]]
    return argv


# Verbs whose leading bare arguments name options: `lmforge convert from-hf DIR` = `... --path DIR`; a name
# ending in * takes every remaining bare argument as one list (`eval compare a.json b.json c.json`).
POSITIONAL: dict[tuple[str, ...], tuple[str, ...]] = {
    ("convert", "from-hf"): ("path",),
    ("convert", "to-hf"): ("model",),
    ("convert", "sharded"): ("run",),
    ("export", "gguf"): ("model",),
    ("export", "onnx"): ("model",),
    ("export", "hf"): ("model",),
    ("data", "stats"): ("data",),
    ("data", "clean"): ("data", "out"),
    ("data", "dedup"): ("data", "out"),
    ("compress", "report"): ("models*",),
    ("data", "validate"): ("data",),
    ("data", "merge-labels"): ("prelabeled", "reviewed"),
    ("merge-lora",): ("adapter",),
    ("eval", "compare"): ("reports*",),
    ("runs",): ("root",),
    ("plot",): ("runs*",),
    ("index",): ("docs",),
}
# Verbs whose one bare argument may stand anywhere among the options: `lmforge retrieve --index idx/ "query"`.
ANYWHERE: dict[tuple[str, ...], str] = {("retrieve",): "query", ("answer",): "question"}
ANYWHERE.update({("code", "check"): "file", ("code", "tests"): "file"})


def positional_shorthand(argv: list[str]) -> list[str]:
    for verb, name in ANYWHERE.items():
        if tuple(argv[:len(verb)]) == verb:
            rest, i = argv[len(verb):], 0
            while i < len(rest):  # an option without "=" takes the next word as its value (these verbs have no flags)
                if rest[i].startswith("-"):
                    i += 1 if "=" in rest[i] else 2
                    continue
                return [*verb, f"--{name}", rest[i], *rest[:i], *rest[i + 1:]]
            return argv
    for verb, names in POSITIONAL.items():
        if tuple(argv[:len(verb)]) == verb:
            rest = argv[len(verb):]
            bare = 0
            many = names[-1].endswith("*")
            while bare < (len(rest) if many else min(len(names), len(rest))) and not rest[bare].startswith("-"):
                bare += 1
            values = rest[:bare]
            if many:
                values = [*values[:len(names) - 1], json.dumps(values[len(names) - 1:])]
            options = [x for name, value in zip(names, values) for x in (f"--{name.rstrip('*')}", value)]
            return [*verb, *options, *rest[bare:]]
    return argv


# Old spellings kept working (README, "Options, configs and errors"): each maps to the one name every verb
# uses, for a verb that has the new name and not the old one. Values an old option took that its new one
# spells differently come along ({"32": "float32"}: `eval perplexity --precision 32` = `--dtype float32`).
ALIASES: dict[str, tuple[str, dict[str, str]]] = {
    "input": ("data", {}),
    "path": ("data", {}),
    "output": ("out", {}),
    "field": ("text_field", {}),
    "precision": ("dtype", {"32": "float32", "bf16-mixed": "bfloat16"}),
    # translate/summarize call theirs --input (a file or the text itself); --data names it as everywhere else
    "data": ("input", {}),
}


def verb_function(argv: list[str], table: dict[str, Any] | None = None) -> tuple[list[str], Any]:
    """The verb words at the start of `argv` and the function they name (None when they name none)."""
    node: Any = verbs() if table is None else table
    words: list[str] = []
    for word in argv:
        if not isinstance(node, dict) or word not in node:
            break
        node, words = node[word], [*words, word]
    return words, (node if callable(node) else None)


def _parameters(fn: Any) -> dict[str, Any]:
    import inspect
    import typing

    try:
        hints = typing.get_type_hints(fn)
    except Exception:  # a name imported only for type checking: each annotation on its own, else by name
        hints = {}
        for name, p in inspect.signature(fn).parameters.items():
            try:
                hints[name] = eval(p.annotation, vars(sys.modules[fn.__module__])) if isinstance(
                    p.annotation, str) else p.annotation
            except Exception:
                hints[name] = None
    return {name: hints.get(name) for name in inspect.signature(fn).parameters}


def apply_aliases(argv: list[str], fn: Any) -> list[str]:
    """`data clean --input x --output y` → `--data x --out y`; and a bare `--overwrite` (a bool option with
    no value after it) → `--overwrite true`, as people write flags."""
    if fn is None:
        return argv
    params = _parameters(fn)
    argv = list(argv)  # an old value after an old name is rewritten in place (`--precision 32` → `float32`)
    out: list[str] = []
    for i in range(len(argv)):
        a = argv[i]
        if a.startswith("--") and not a.startswith("--print"):
            name, eq, value = a[2:].partition("=")
            head, dot, rest = name.partition(".")
            if head in ALIASES and head not in params and ALIASES[head][0] in params:
                new, values = ALIASES[head]
                name = new + dot + rest
                if eq:
                    value = values.get(value, value)
                elif i + 1 < len(argv) and argv[i + 1] in values and not dot:
                    argv[i + 1] = values[argv[i + 1]]
                a = f"--{name}{eq}{value}"
            if not eq and params.get(name) is bool and (i + 1 == len(argv) or argv[i + 1].startswith("--")):
                out += [a, "true"]
                continue
        out.append(a)
    return out


def _in_words(hint: Any) -> str:
    """A type hint as a person says it: Literal['a', 'b'] | None → "one of: a, b"."""
    import os
    import types
    import typing

    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        parts = [_in_words(h) for h in typing.get_args(hint) if h is not type(None)]
        return " or ".join(dict.fromkeys(p for p in parts if p))
    if origin is typing.Literal:
        return "one of: " + ", ".join(str(v) for v in typing.get_args(hint))
    if origin in (list, tuple, typing.Sequence) or hint in (list, tuple):
        inner = [_in_words(h) for h in typing.get_args(hint) if h is not Ellipsis]
        return f"a list of {inner[0]}" if inner else "a list"
    if hint is bool:
        return "true or false"
    if hint is int:
        return "a whole number"
    if hint is float:
        return "a number"
    if hint is str:
        return "text"
    if isinstance(hint, type) and issubclass(hint, os.PathLike):
        return "a path"
    return getattr(hint, "__name__", str(hint))


def plain_error(message: str, fn: Any) -> str:
    """jsonargparse's error as one line a person can act on: the option, what it accepts, what it got."""
    params = _parameters(fn) if fn is not None else {}
    key = re.search(r'(?:Parser key|Key) "([\w.]+)"', message)
    if key:
        option = "--" + key.group(1).replace("_", "-")
        got = re.findall(r"Given value: (.*)", message)
        if "is required" in message:
            return f"{option} is required"
        hint = params.get(key.group(1).split(".")[0]) if "." not in key.group(1) else None
        accepts = _in_words(hint) if hint is not None else ""
        if not accepts:  # a nested option (--filters.min-words): the parser's own list of types
            subtypes = re.search(r"Subtypes: \[(.*)\]", message)
            accepts = subtypes.group(1) if subtypes else ""
            accepts = re.sub(r"<class '(\w+)'>", r"\1", accepts).replace(", NoneType", "")
            accepts = {"int": "a whole number", "float": "a number", "bool": "true or false"}.get(accepts, accepts)
        return f"{option} accepts {accepts}; got {got[-1].strip()!r}" if got else f"{option}: {message.splitlines()[0]}"
    required = re.search(r"the following arguments are required: (.*)", message)
    if required:
        names = [n.split(".")[-1] for n in required.group(1).split(", ")]
        return ", ".join("--" + n.replace("_", "-") for n in names) + (" is" if len(names) == 1 else " are") + \
            " required"
    unknown = re.search(r"[Uu]nrecognized arguments: (.*)", message)
    if unknown:
        return f"unknown option or argument: {unknown.group(1).strip()}"
    choice = re.search(r"invalid choice: '(.*?)' \(choose from (.*)\)", message)
    if choice:
        return f"unknown command {choice.group(1)!r}; choose one of: {choice.group(2).replace(chr(39), '')}"
    return message.strip().splitlines()[0]


def _plain_parser(fn: Any) -> type:
    """An ArgumentParser whose errors are one plain line (see `plain_error`) and exit 2, without the usage."""
    from jsonargparse import ArgumentParser

    class PlainParser(ArgumentParser):
        def error(self, message: str, ex: Exception | None = None) -> Any:
            if self.exit_on_error is False:  # a parser inside jsonargparse's own machinery: keep its contract
                return super().error(message, ex)
            print(f"error: {plain_error(message, fn)}", file=sys.stderr)
            raise SystemExit(2)

    return PlainParser


def _plain_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                   file: Any = None, line: str | None = None) -> None:
    """A library's warning as `warning: ...` on stderr, without its class, file path and source line."""
    print(f"warning: {message}", file=file or sys.stderr)


def version() -> str:
    from lmforge import __version__

    return f"lmforge {__version__}"


def show(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    from lmforge.options import COMMAND_LINE

    raw = sys.argv[1:] if argv is None else argv
    if raw[:1] in (["--version"], ["-V"]):
        print(version())
        return 0
    args = positional_shorthand(eval_shorthand(normalize_options(raw)))
    fn = verb_function(args)[1]
    args = apply_aliases(args, fn)
    shown, warnings.showwarning = warnings.showwarning, _plain_warning
    written = COMMAND_LINE.set(frozenset(a[2:].split("=")[0] for a in args if a.startswith("--")))  # for --resume
    try:
        show(CLI(verbs(), args=args, as_positional=False, prog="lmforge", formatter_class=_dashed_help_formatter(),
                 parser_class=_plain_parser(fn), description="lmforge: raw text to a served language model."))
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    finally:
        COMMAND_LINE.reset(written)
        warnings.showwarning = shown
    return 0


if __name__ == "__main__":
    sys.exit(main())

