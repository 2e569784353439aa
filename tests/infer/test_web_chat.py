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
