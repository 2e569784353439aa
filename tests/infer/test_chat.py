"""`lmforge chat`: streamed replies through the chat template, history across turns, /reset, /system, /quit."""

from __future__ import annotations

import io
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from lmforge.infer.chat import chat_loop
from lmforge.lm import LM

GREEDY = dict(max_new_tokens=6, temperature=0)


@pytest.fixture(scope="module")
def lm(make_lm: Callable[..., LM]) -> LM:
    return make_lm("gpt2-tiny")


def test_each_turn_sees_the_history_and_commands_reset_it(lm: LM) -> None:
    """Replies equal LM.chat on the conversation so far; /system sets the system prompt and resets;
    /reset keeps only it; /quit ends (later lines are never read as turns)."""
    stdin = io.StringIO("the cat\nsat on\n/system Be terse.\nthe dog\n/reset\nthe mat\n/quit\nnever\n")
    stdout = io.StringIO()
    messages = chat_loop(lm, stdin=stdin, stdout=stdout, **GREEDY)
    first = lm.chat([{"role": "user", "content": "the cat"}], **GREEDY)
    second = lm.chat([{"role": "user", "content": "the cat"}, {"role": "assistant", "content": first},
                      {"role": "user", "content": "sat on"}], **GREEDY)
    system = {"role": "system", "content": "Be terse."}
    third = lm.chat([system, {"role": "user", "content": "the dog"}], **GREEDY)
    fourth = lm.chat([system, {"role": "user", "content": "the mat"}], **GREEDY)
    assert messages == [system, {"role": "user", "content": "the mat"}, {"role": "assistant", "content": fourth}]
    lines = stdout.getvalue().splitlines()
    assert lines == [first, second, "(system prompt set; conversation reset)", third, "(conversation reset)", fourth]
    assert first != second  # the history changed the prompt


def test_unknown_command_prints_help(lm: LM) -> None:
    stdout = io.StringIO()
    assert chat_loop(lm, stdin=io.StringIO("/frobnicate\n"), stdout=stdout) == []
    assert "/reset" in stdout.getvalue()


@pytest.mark.slow
def test_cli_verb_reads_stdin_until_end_of_input(make_checkpoint: Callable[..., Path], lm: LM) -> None:
    ckpt = make_checkpoint("gpt2-tiny")
    result = subprocess.run([sys.executable, "-m", "lmforge", "chat", "--model", str(ckpt), "--temperature", "0",
                             "--max-new-tokens", "6"], input="the cat\n", capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == [lm.chat([{"role": "user", "content": "the cat"}], **GREEDY)]
