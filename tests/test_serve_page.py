"""The web page of ``rag-app serve`` in headless Chromium (Debian's ``chromium`` driven by
Playwright): a key entered, a question typed, the answer watched as it streams, a citation
clicked and its source highlighted. The screenshot is kept in tests/artifacts/."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.conftest import REPO, SERVE_KEYS

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
ARTIFACTS = REPO / "tests" / "artifacts"
# SmolLM2 (greedy) cites both excerpts when asked which one says what.
QUESTION = "Which excerpt, [1] or [2], describes HNSW?"

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium package")


def test_the_page_streams_an_answer_whose_citations_point_at_their_sources(rag_server):
    from playwright.sync_api import expect, sync_playwright

    server = rag_server.ensure()
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "serve-page.png"
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 900})
            page.goto(server.url + "/")
            expect(page.locator("#key-label")).to_be_visible()  # keys: the page asks for one
            page.fill("#key", SERVE_KEYS["full"])
            page.dispatch_event("#key", "change")
            expect(page.locator("#collection option")).to_have_count(2)
            assert page.input_value("#collection") == "rag_docs"

            page.fill("#question", QUESTION)
            page.click("#send")
            # Streaming: text is on the page while the answer is still being written.
            page.wait_for_function(
                "document.querySelector('#answer').classList.contains('streaming')"
                " && document.querySelector('#answer').textContent.length > 0"
            )
            expect(page.locator("#status")).to_have_text("done", timeout=120_000)
            expect(page.locator("#sources li")).to_have_count(3)
            citation = page.locator("#answer a.cite").first
            expect(citation).to_be_visible()
            number = citation.inner_text().strip("[]")
            citation.click()
            source = page.locator(f"#source-{number}")
            expect(source).to_have_class("highlight")
            expect(page.locator("#sources li.highlight")).to_have_count(1)
            assert "s" in page.inner_text("#timings")  # retrieval, first token, total
            page.screenshot(path=str(shot), full_page=True)
        finally:
            browser.close()
    assert Path(shot).stat().st_size > 10_000
    print(f"screenshot: {shot}")
