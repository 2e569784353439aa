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


@pytest.mark.slow
def test_documents_toggle_answers_with_cited_sources(make_lm: Callable[..., LM], tmp_path) -> None:
    """With `serve --index`, the page shows a documents toggle; switched on, a question goes to /v1/answer and
    the reply is the Python API's answer, with the retrieved sources listed under it (their chunk text folded).
    Without an index the toggle stays hidden."""
    playwright = pytest.importorskip("playwright.sync_api")
    from test_server import running_server

    from lmforge.apps.answer import generative_answer
    from lmforge.data.index import DocumentIndex, build_index

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "files.md").write_text("Open a file for appending with mode 'a'. Writing then adds text at the end.")
    (docs / "math.md").write_text("The square root of a number is computed by math.sqrt, which returns a float.")
    build_index(docs, tmp_path / "idx", embed=None, encoder=None)
    documents = DocumentIndex(tmp_path / "idx")
    lm = make_lm("gpt2-tiny")
    question = "Which function computes the square root?"
    hits = documents.search(question, 5, None)
    expected = generative_answer(lm, question, hits, max_new_tokens=12, temperature=0.0)
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        with running_server(create_app(lm, name="plain")) as url:
            page = browser.new_page()
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'plain'")
            assert not page.is_visible("#documents")
        with running_server(create_app(lm, name="docs", documents=documents)) as url:
            page = browser.new_page()
            requests = []
            page.on("request", lambda r: requests.append(r) if "/v1/" in r.url and r.method == "POST" else None)
            page.goto(url)
            page.wait_for_function("document.getElementById('model').textContent === 'docs'")
            page.check("#documents")
            page.fill("#temperature", "0")
            page.fill("#max-tokens", "12")
            page.fill("#input", question)
            page.press("#input", "Enter")
            page.wait_for_selector(".msg.assistant[data-done='true']", timeout=30_000)
            assert page.query_selector(".msg.error") is None
            assert [r.url.rsplit("/", 1)[1] for r in requests] == ["answer"]
            assert requests[0].post_data_json == {"question": question, "temperature": 0, "max_tokens": 12}
            assert page.eval_on_selector(".msg.assistant", "e => e.textContent") == expected.answer
            listed = page.eval_on_selector_all(".sources summary", "els => els.map(e => e.textContent)")
            assert [s.split(" ")[0] for s in listed] == [s["id"] for s in expected.sources]
            first = page.eval_on_selector(".sources pre", "e => e.textContent")
            assert first == next(h.chunk.text for h in hits if h.chunk.id == expected.sources[0]["id"])
        browser.close()
