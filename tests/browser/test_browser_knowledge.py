"""The Knowledge page in a real browser, with the real embedder (all-MiniLM-L6-v2 in the app's own process): name a
new collection, upload sample documents and a broken one through the page's file input, ingest them with a
progress bar, see each file's outcome and the documents table, and search.

The app runs as a separate process (`callbot app`), so the bag-of-words stand-in of the AppTest suite cannot be
registered there: this is the one end-to-end run of the main path (tests/app/test_app_knowledge.py covers the rest).
Screenshots land in the test's tmp folder (after the ingest, after the search) and in
test-artifacts/knowledge_search.png.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import (
    IN_CI,
    MISSING,
    TURN_TIMEOUT_MS,
    RunningApp,
    click_button,
    open_page,
    screenshot,
    sign_in,
    wait_idle,
)

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = [pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or ""), pytest.mark.model]

SAMPLES = Path(__file__).resolve().parents[2] / "data" / "knowledge" / "clinic"
COLLECTION = "clinic-browser"

# Records the text of every progress bar that appears while files are ingested: the bar is gone once the page
# reruns to show the outcomes, so it is watched, not looked for afterwards.
WATCH_PROGRESS_JS = """() => {
  window.__cbProgress = [];
  new MutationObserver(() => {
    for (const bar of document.querySelectorAll('[data-testid=stProgress]')) {
      const text = bar.innerText.trim();
      if (text && window.__cbProgress[window.__cbProgress.length - 1] !== text) window.__cbProgress.push(text);
    }
  }).observe(document.body, {subtree: true, childList: true, characterData: true});
}"""


def test_upload_ingest_and_search_in_the_browser(page: Page, app: RunningApp, tmp_path: Path) -> None:
    from playwright.sync_api import expect

    bad = tmp_path / "scan.pdf"  # a JPEG under a PDF's name
    bad.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\0" * 256)

    sign_in(page, app.base_url)
    open_page(page, app.base_url, "knowledge", "Knowledge")
    main = page.get_by_test_id("stMain")
    expect(main.get_by_text("No collections yet. Name one above and upload documents into it.")).to_be_visible()

    name = main.get_by_role("textbox", name="or a new one")
    name.fill(COLLECTION)
    name.press("Enter")
    wait_idle(page)
    expect(main.get_by_role("tab", name="Documents")).to_be_visible()
    ingest = main.get_by_role("button", name="Ingest", exact=True)
    expect(ingest).to_be_disabled()

    files = [SAMPLES / "fees.pdf", SAMPLES / "opening-hours.md", bad]
    main.locator("[data-testid=stFileUploader] input[type=file]").set_input_files([str(f) for f in files])
    uploaded = main.get_by_test_id("stFileChip")
    expect(uploaded).to_have_count(3)
    expect(ingest).to_be_enabled()
    page.evaluate(WATCH_PROGRESS_JS)
    click_button(page, "Ingest")

    # One line per file: the good ones with their passages, the broken one with its reason, on one line.
    alerts = main.get_by_test_id("stAlertContainer")
    expect(alerts.filter(has_text=re.compile(r"^ingested: fees\.pdf \(\d+ passages\)$"))).to_have_count(
        1, timeout=TURN_TIMEOUT_MS
    )
    expect(alerts.filter(has_text=re.compile(r"^ingested: opening-hours\.md \(\d+ passages\)$"))).to_have_count(1)
    refused = alerts.filter(has_text="scan.pdf:")
    expect(refused).to_have_text("scan.pdf: not a PDF (the bytes are a JPEG image)")
    progress = page.evaluate("window.__cbProgress")
    assert any(re.fullmatch(r"\d of 3 · .+", p) for p in progress), progress
    expect(uploaded).to_have_count(0)  # the uploader is emptied for the next batch
    # The new collection is the one picked now; the name box is empty for the next new one.
    expect(main.get_by_role("combobox", name="Collection")).to_have_value(COLLECTION)
    expect(name).to_have_value("")

    # The documents table (a canvas grid: its cells are read from the grid's accessible table).
    tables = main.get_by_test_id("stDataFrame")
    expect(tables).to_have_count(2)  # the collections, then this collection's documents
    documents = tables.nth(1)
    expect(documents.locator("td").filter(has_text=re.compile(r"^fees\.pdf$"))).to_have_count(1)
    expect(documents.locator("td").filter(has_text=re.compile(r"^opening-hours\.md$"))).to_have_count(1)
    cells = documents.locator("td").all_text_contents()
    assert "scan.pdf" not in cells and "None" not in cells, cells  # a missing page count reads "–"

    wait_idle(page)
    page.screenshot(path=str(tmp_path / "knowledge_ingested.png"))

    main.get_by_role("tab", name="Search").click()
    form = main.get_by_test_id("stForm")
    form.get_by_role("textbox", name="Question").fill("How much is the no-show fee?")
    wait_idle(page)
    form.get_by_role("button", name="Search", exact=True).click()
    first = main.locator("[data-testid=stMarkdownContainer] p").filter(has_text=re.compile(r"^1\. "))
    expect(first).to_have_count(1, timeout=TURN_TIMEOUT_MS)
    expect(first).to_have_text(re.compile(r"^1\. fees\.pdf, page 3 · similarity 0\.\d\d( · .+)?$"))
    similarity = float(re.search(r"similarity (\d\.\d\d)", first.inner_text()).group(1))  # type: ignore[union-attr]
    assert similarity >= 0.35, first.inner_text()
    expect(main.get_by_text("Low relevance:")).to_have_count(0)
    wait_idle(page)

    page.screenshot(path=str(tmp_path / "knowledge_search.png"))
    screenshot(page, "knowledge_search")
