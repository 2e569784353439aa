"""Which options the user wrote on the command line, and the option vocabulary verbs share (`Dtype`).

The CLI passes every option to a verb, so a verb cannot tell `--lr 3e-4` (the default, given) from no
`--lr` at all. Where that matters (a resumed run refuses changed options; `data clean --preset code` lets
only the options named override it), `lmforge.cli.main` records the names here for the call it makes.
From Python, `given` is None and the verb reads its keyword arguments instead.
"""

from __future__ import annotations

import contextvars
from typing import Any, Literal

# Option names as written, underscores for dashes: {"lr", "max_steps", "normalize.whitespace", ...}.
COMMAND_LINE: contextvars.ContextVar[frozenset[str] | None] = contextvars.ContextVar("command_line", default=None)


def given() -> frozenset[str] | None:
    """The option names on the command line of the verb running now; None when called from Python."""
    return COMMAND_LINE.get()


# The numbers inference runs in, one spelling for every inference verb (`--dtype`); training verbs take
# `--precision` (autocast with float32 master weights), a different thing, hence a different name.
Dtype = Literal["float32", "bfloat16"]


def torch_dtype(name: Dtype | None) -> Any:
    """`--dtype bfloat16` → torch.bfloat16; None stays None (the checkpoint's own)."""
    import torch

    return getattr(torch, name) if name else None
