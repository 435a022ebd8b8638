"""The Conversations page in chromium: a search shows where it was said, a row opens its conversation, and one click
exports what is listed."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import IN_CI, MISSING, RunningApp, screenshot, sign_in

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")


def _plant_conversation(app: RunningApp) -> int:
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.conversations.service import ConversationService
    from callbot_core.settings import Settings
    from callbot_core.store import Store
    from tests.engine.scripted import Scripted

    store = Store(app.database_url)
    try:
        service = ConversationService(store, Settings(_env_file=None), backends=lambda name: Scripted())  # type: ignore[call-arg]
        info = service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted")
        service.send(info.id, "Can I book a flamingo appointment?", actor=LOCAL_OPERATOR).text()
        return info.id
    finally:
        store.dispose()


def test_search_open_from_the_row_and_export_in_one_click(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    cid = _plant_conversation(app)
    sign_in(page, app.base_url)
    page.goto(app.base_url + "/conversations")
    expect(page.get_by_role("heading", name="Conversations", level=1)).to_be_visible()
    page.get_by_label("Search messages and summaries").fill("flamingo")
    page.get_by_label("Search messages and summaries").press("Enter")
    expect(page.get_by_text(f"#{cid}").first).to_be_visible()
    expect(page.locator("mark, span").filter(has_text="flamingo").first).to_be_visible()

    # A click on the row's selection cell selects it; the conversation opens below. The search reruns the page,
    # which may redraw the table under the pointer: wait for it to hold the one row, and click again if needed.
    grid = page.get_by_test_id("stDataFrame").first
    expect(grid.locator("td").filter(has_text="receptionist@1")).to_have_count(1)
    opened = page.get_by_role("heading", name=f"Conversation {cid}")
    for _ in range(3):
        box = grid.bounding_box()
        assert box is not None
        page.mouse.click(box["x"] + 12, box["y"] + 52)  # the selection column of the first row
        try:
            expect(opened).to_be_visible(timeout=10_000)
            break
        except AssertionError:
            continue
    expect(opened).to_be_visible()
    screenshot(page, "30_conversations_opened")

    with page.expect_download() as download_info:
        page.get_by_role("button", name="Export 1 as CSV").click()
    body = download_info.value.path().read_text(encoding="utf-8")
    assert "flamingo appointment" in body and str(cid) in body
