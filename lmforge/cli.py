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
from typing import Any

from lmforge.errors import LMForgeError


def verbs() -> dict[str, Any]:
    from lmforge.compress.distill import distill
    from lmforge.compress.prune import prune
    from lmforge.compress.quantize import quantize
    from lmforge.compress.report import compress_report
    from lmforge.convert import from_hf, to_hf
    from lmforge.data.annotate import annotate, merge_labels, validate
    from lmforge.data.pack import pack
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
    from lmforge.methods.sft import finetune_full, finetune_lora, merge_lora
    from lmforge.model.presets import models
    from lmforge.tokenizer import train_tokenizer

    return {
        "tokenizer": {"train": train_tokenizer},
        "data": {"pack": pack, "clean": clean, "dedup": dedup, "stats": stats, "validate": validate,
                 "annotate": annotate, "merge-labels": merge_labels},
        "pretrain": pretrain,
        "finetune": {"full": finetune_full, "lora": finetune_lora, "classify": finetune_classify,
                     "regress": finetune_regress},
        "merge-lora": merge_lora,
        "predict": predict,
        "eval": {"run": evaluate, "compare": compare, "perplexity": perplexity},
        "convert": {"from-hf": from_hf, "to-hf": to_hf},
        "compress": {"quantize": quantize, "prune": prune, "distill": distill, "report": compress_report},
        "export": {"gguf": export_gguf, "onnx": export_onnx, "hf": to_hf},
        "generate": generate,
        "chat": chat,
        "serve": serve,
        "demo": demo,
        "models": models,
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
    ("export", "gguf"): ("model",),
    ("export", "onnx"): ("model",),
    ("export", "hf"): ("model",),
    ("data", "stats"): ("input",),
    ("compress", "report"): ("models*",),
    ("data", "validate"): ("path",),
    ("data", "merge-labels"): ("prelabeled", "reviewed"),
    ("merge-lora",): ("adapter",),
    ("eval", "compare"): ("reports*",),
}


def positional_shorthand(argv: list[str]) -> list[str]:
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


def show(result: Any) -> None:
    if result is None:
        return
    if isinstance(result, dict):
        print(json.dumps(result, indent=2, default=str))
    else:
        print(result)


def main(argv: list[str] | None = None) -> int:
    from jsonargparse import CLI

    args = positional_shorthand(eval_shorthand(normalize_options(sys.argv[1:] if argv is None else argv)))
    try:
        show(CLI(verbs(), args=args, as_positional=False, prog="lmforge", formatter_class=_dashed_help_formatter(),
                 description="lmforge: raw text to a served language model."))
    except LMForgeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

