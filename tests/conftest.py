"""Shared fixtures: one tiny corpus, a tokenizer trained on it, a packed dataset, random tiny models and checkpoints.

Everything session-scoped is built once (a second or so) and only read by tests; tests that write get
their own `tmp_path`.
"""

from __future__ import annotations

import contextlib
import json
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from lmforge.config import preset
from lmforge.data.pack import pack
from lmforge.lm import LM
from lmforge.model.gpt import GPT
from lmforge.tokenizer import Tokenizer, train_tokenizer

_WORDS = [
    "the", "a", "model", "token", "learns", "to", "predict", "next", "word", "from", "context", "and", "data",
    "train", "test", "loss", "rate", "step", "window", "batch", "layer", "head", "attention", "value", "key",
    "query", "norm", "weight", "bias", "cat", "dog", "sat", "on", "mat", "while", "for", "in", "def", "return",
    "import", "class", "self", "print", "if", "else", "true", "false", "none",
]
_EXTRAS = ["naïve café", "你好，世界", "🙂🚀", "def add(a, b):\n    return a + b\n", "x = [i * 2 for i in range(10)]"]

TINY_VOCAB = 512


def run_cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    """`lmforge.cli.main(args)` in-process → (exit code, stdout, stderr), whether it returns or exits."""
    from lmforge.cli import main
    try:
        code = main(args)
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else 1
    out, err = capsys.readouterr()
    return code, out, err


def tiny_documents(n: int = 240, seed: int = 0) -> list[str]:
    """Deterministic pseudo-English sentences with a little code, accents, CJK and emoji mixed in."""
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        sentences = [" ".join(rng.choices(_WORDS, k=rng.randint(5, 14))).capitalize() + "."
                     for _ in range(rng.randint(1, 4))]
        if i % 7 == 0:
            sentences.append(rng.choice(_EXTRAS))
        docs.append(" ".join(sentences))
    return docs


def write_jsonl(path: Path, docs: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for doc in docs:
            f.write(json.dumps({"text": doc}, ensure_ascii=False) + "\n")
    return path


@pytest.fixture(scope="session")
def tiny_docs() -> list[str]:
    return tiny_documents()


@pytest.fixture(scope="session")
def tiny_corpus(tmp_path_factory: pytest.TempPathFactory, tiny_docs: list[str]) -> Path:
    """A folder with one corpus.jsonl of `tiny_docs`."""
    root = tmp_path_factory.mktemp("tiny_corpus")
    write_jsonl(root / "corpus.jsonl", tiny_docs)
    return root


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path) -> Path:
    return train_tokenizer(tiny_corpus, tmp_path_factory.mktemp("tiny_tok") / "tok", vocab_size=TINY_VOCAB)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_tokenizer_dir: Path) -> Tokenizer:
    return Tokenizer.load(tiny_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_packed(tmp_path_factory: pytest.TempPathFactory, tiny_corpus: Path, tiny_tokenizer_dir: Path) -> Path:
    """`tiny_corpus` packed with a 20% validation split, in-process (workers=1)."""
    return pack(tiny_corpus, tiny_tokenizer_dir, tmp_path_factory.mktemp("tiny_packed") / "packed",
                val_fraction=0.2, workers=1)


def random_gpt(name: str, vocab_size: int, *, seed: int = 0, std: float | None = 0.3, **overrides) -> GPT:
    """A preset with random weights; std 0.3 on matrices (not the init's 0.02) so logits differ by token."""
    torch.manual_seed(seed)
    model = GPT(preset(name, vocab_size=vocab_size, **overrides))
    if std is not None:
        with torch.no_grad():
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, std)
    return model.eval()


@torch.no_grad()
def greedy_text(model: torch.nn.Module, tokenizer: Tokenizer, prompt_ids: list[int], max_new_tokens: int,
                stop_ids: set[int]) -> str:
    """A reference for greedy decoding: argmax of a full forward over the whole sequence at every step (no KV
    cache, no engine), ending before any of `stop_ids`, decoded as a user sees it (special tokens skipped)."""
    was_training = model.training
    model.eval()
    new: list[int] = []
    for _ in range(max_new_tokens):
        token = int(model(torch.tensor([[*prompt_ids, *new]]))[0, -1].argmax())
        if token in stop_ids:
            break
        new.append(token)
    model.train(was_training)
    return tokenizer.decode(new, skip_special_tokens=True)


@pytest.fixture(scope="session")
def make_lm(tiny_tokenizer: Tokenizer) -> Callable[..., LM]:
    """Factory: `make_lm("gpt2-tiny", max_position_embeddings=32)` → an in-memory LM with the tiny tokenizer."""

    def make(name: str = "gpt2-tiny", *, seed: int = 0, std: float | None = 0.3,
             generation_config: dict | None = None, **overrides) -> LM:
        model = random_gpt(name, tiny_tokenizer.vocab_size, seed=seed, std=std, **overrides)
        return LM(model, tiny_tokenizer, generation_config or {"max_new_tokens": 8, "temperature": 1.0})

    return make


@pytest.fixture(scope="session")
def make_checkpoint(make_lm: Callable[..., LM], tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """Factory: `make_checkpoint("gpt2-tiny", out=dir)` saves a random tiny LM with `LM.save` and returns the dir."""

    def make(name: str = "gpt2-tiny", out: Path | None = None, **kwargs) -> Path:
        out = out if out is not None else tmp_path_factory.mktemp(f"ckpt_{name}")
        return make_lm(name, **kwargs).save(out)

    return make


@contextlib.contextmanager
def running_server(app: Any) -> Iterator[str]:
    """uvicorn serving a FastAPI `app` on a free loopback port in a thread; yields the base URL and stops it
    gracefully (the server tests and the evaluation of endpoints both use it)."""
    import uvicorn

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=5))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
        sock.close()
