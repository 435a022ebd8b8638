"""Every page in chromium, with data in the store: no "None" where a value is missing, no error box, no traceback.
Screenshots of each land in test-artifacts/ (40_page_*.png) for a look at the layout."""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import IN_CI, MISSING, RunningApp, open_page, screenshot, sign_in

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")

PAGES = ("chat", "compare", "conversations", "personas", "knowledge", "analytics", "dashboards", "leaderboard",
         "reports", "admin")  # fmt: skip
HEADINGS = {"chat": "Chat", "compare": "Compare", "conversations": "Conversations", "personas": "Personas",
            "knowledge": "Knowledge", "analytics": "Analytics", "dashboards": "Dashboards",
            "leaderboard": "Leaderboard", "reports": "Reports", "admin": "Admin"}  # fmt: skip


def _plant(app: RunningApp) -> None:
    """One conversation with a reply and one that ended without a turn: values present and missing."""
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.conversations.service import ConversationService
    from callbot_core.settings import Settings
    from callbot_core.store import Store
    from tests.engine.scripted import Scripted

    store = Store(app.database_url)
    try:
        service = ConversationService(store, Settings(_env_file=None), backends=lambda name: Scripted())  # type: ignore[call-arg]
        info = service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted")
        service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR).text()
        empty = service.start("support", actor=LOCAL_OPERATOR, backend="scripted")
        service.end(empty.id, actor=LOCAL_OPERATOR)
    finally:
        store.dispose()


def test_every_page_reads_without_none_or_errors(page: Page, app: RunningApp) -> None:

    _plant(app)
    sign_in(page, app.base_url)
    for path in PAGES:
        open_page(page, app.base_url, path, HEADINGS[path])
        page.wait_for_timeout(1500)  # charts and tables draw after the heading
        if path == "conversations":  # its table's grid fills in after the page; slower on a loaded machine
            cell = page.locator("[data-testid=stDataFrame] td", has_text="receptionist@1").first
            cell.wait_for(state="attached", timeout=30_000)
        main = page.locator("[data-testid=stMain]")
        # Tables are drawn on a canvas; their cells are also in the grid's accessible DOM, which is read here.
        cells = " | ".join(page.locator("[data-testid=stDataFrame] td").all_text_contents())
        text = main.inner_text() + "\n" + cells
        if path == "conversations":
            assert "receptionist@1" in cells, "the table's cells were not read"
        screenshot(page, f"40_page_{path}")
        assert not re.search(r"\bNone\b", text), f"{path}: 'None' shown: …{text[text.find('None') - 80 :][:160]}…"
        assert page.get_by_test_id("stException").count() == 0, f"{path}: a traceback is shown"
        assert "Something went wrong on our side" not in text, f"{path}: {text[:300]}"
