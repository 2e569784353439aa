"""The web chat page at `/`, end to end in headless Chromium: type a message, see the reply stream in."""

from __future__ import annotations

import shutil
from collections.abc import Callable

import pytest

from lmforge.infer.server import create_app
from lmforge.lm import LM

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]


@pytest.mark.slow
def test_page_streams_a_reply_with_the_chosen_settings(make_lm: Callable[..., LM]) -> None:
    """The page sends the conversation with its temperature and max-tokens settings and renders the
    streamed reply, which equals the Python API's greedy reply to the same message."""
    playwright = pytest.importorskip("playwright.sync_api")
    from test_server import running_server

    lm = make_lm("gpt2-tiny")
    expected = lm.chat([{"role": "user", "content": "the cat sat"}], temperature=0, max_new_tokens=12)
    assert len(expected) > 1
    with running_server(create_app(lm, name="tiny")) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r) if r.url.endswith("/chat/completions") else None)
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'tiny'")
        page.fill("#temperature", "0")
        page.fill("#max-tokens", "12")
        page.fill("#input", "the cat sat")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
        assert page.inner_text(".msg.user") == "the cat sat"
        assert page.eval_on_selector(".msg.assistant", "e => e.textContent") == expected
        assert int(page.get_attribute(".msg.assistant", "data-chunks")) > 1  # it arrived in pieces
        body = requests[0].post_data_json
        assert body["stream"] is True and body["temperature"] == 0 and body["max_tokens"] == 12
        assert page.query_selector(".msg.error") is None
        browser.close()


@pytest.mark.slow
def test_page_fits_max_tokens_to_a_short_context_and_says_so(make_lm: Callable[..., LM]) -> None:
    """A 32-token model (as the demo's 256 against the page's old default of 256): the page reads the context
    from /v1/models, lowers its default, and trims a max-tokens setting that cannot fit beside the prompt
    (counted by /tokenize) with a note; the first message gets a reply, not a context-length error."""
    playwright = pytest.importorskip("playwright.sync_api")
    from test_server import running_server

    lm = make_lm("gpt2-tiny", max_position_embeddings=32)
    prompt_tokens = len(lm.tokenizer.chat_ids([{"role": "user", "content": "the cat sat"}]))
    with running_server(create_app(lm, name="short")) as url, playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page()
        requests = []
        page.on("request", lambda r: requests.append(r) if r.url.endswith("/chat/completions") else None)
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent === 'short'")
        assert page.input_value("#max-tokens") == "16"  # half the context, not 256
        page.fill("#max-tokens", "256")
        page.fill("#input", "the cat sat")
        page.press("#input", "Enter")
        page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
        assert page.query_selector(".msg.error") is None
        assert requests[0].post_data_json["max_tokens"] == 32 - prompt_tokens
        note = page.inner_text(".msg.note")
        assert f"trimmed from 256 to {32 - prompt_tokens}" in note and "32-token context" in note
        browser.close()
