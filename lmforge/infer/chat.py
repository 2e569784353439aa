"""`lmforge chat`: a conversation in the terminal, streamed as it is generated, through the chat template."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

from lmforge.lm import LM
from lmforge.precision import InferenceDtype

HELP = "commands: /reset (forget the conversation), /system TEXT (set the system prompt and reset), /quit"


def chat_loop(lm: LM, *, system: str | None = None, stdin: TextIO | None = None, stdout: TextIO | None = None,
              **sampling: Any) -> list[dict[str, str]]:
    """Read user turns from `stdin`, stream replies to `stdout`; returns the conversation at exit.

    The whole history goes through the chat template each turn, so the model sees every earlier turn.
    Ctrl-C stops the reply being written and keeps what was said so far.
    """
    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    interactive = stdin.isatty()

    def fresh() -> list[dict[str, str]]:
        return [{"role": "system", "content": system}] if system else []

    messages = fresh()
    if interactive:
        print(f"chatting with {lm.path or 'the model'}; {HELP}", file=stdout)
    while True:
        if interactive:
            print("> ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in ("/quit", "/exit"):
            break
        if text == "/reset":
            messages = fresh()
            print("(conversation reset)", file=stdout, flush=True)
            continue
        if text == "/system" or text.startswith("/system "):
            system = text[len("/system"):].strip() or None
            messages = fresh()
            print(f"(system prompt {'set' if system else 'cleared'}; conversation reset)", file=stdout, flush=True)
            continue
        if text.startswith("/"):
            print(f"(unknown command {text.split()[0]}; {HELP})", file=stdout, flush=True)
            continue
        messages.append({"role": "user", "content": text})
        reply = ""
        try:
            for piece in lm.chat_stream(messages, **sampling):
                reply += piece
                print(piece, end="", file=stdout, flush=True)
        except KeyboardInterrupt:
            print(" (interrupted)", end="", file=stdout)
        print(file=stdout, flush=True)
        messages.append({"role": "assistant", "content": reply})
    return messages


def chat(
    model: Path,
    *,
    system: str | None = None,
    max_new_tokens: int = 256,
    temperature: float | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    max_model_len: int | None = None,
    device: str | None = None,
    dtype: InferenceDtype = "auto",
    compile: bool = False,
) -> None:
    """Chat with a model in the terminal: replies stream as they are generated.

    Type a message and press Enter. /reset forgets the conversation, /system TEXT sets the system
    prompt (and resets), /quit or end of input (Ctrl-D) exits. Ctrl-C stops a reply mid-way.

    Args:
        model: Checkpoint directory (its tokenizer needs a chat template).
        system: System prompt to start with.
        max_new_tokens: Most tokens per reply.
        temperature: 0 is greedy; by default the checkpoint's generation_config.json.
        top_p: Nucleus sampling threshold.
        seed: Seed for reproducible replies.
        max_model_len: Most tokens (conversation + reply) the KV cache holds; by default the model's context,
            or less where it would not fit a quarter of the free memory. The cache grows with the conversation.
        device: "cpu", "cuda", ...; default CUDA when present.
        dtype: "auto" (default) decodes in bfloat16 where this machine has fast bf16 matmuls (AMX, a recent
            GPU), else in the checkpoint's own; "float32" or "bfloat16" forces one.
        compile: Decode through a compiled step: 1.5-3x faster per token on a CPU, after a 20-90 s compile
            (worth it for long replies, not for a few tokens).
    """
    from lmforge.lm import load

    lm = load(model, device=device, dtype=dtype, compile=compile)
    lm.require_decoder("chat")
    lm.max_model_len = max_model_len
    chat_loop(lm, system=system, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed)
