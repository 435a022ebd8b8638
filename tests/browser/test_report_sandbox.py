"""A report opened on the Reports page cannot reach the app: its scripts run (plotly needs them), but in a frame
of its own opaque origin, so the app's document, cookies and storage are out of their reach.

The report here is planted straight into the store with a script that tries what an injected one would.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import IN_CI, MISSING, RunningApp, open_page, screenshot, sign_in

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")

# The first script says where it ran; the second tries the app's title, storage and cookies, through `parent`
# and `top` (either may be the app, however deeply the report is framed), and says whether it got through.
PLANTED = """<!DOCTYPE html>
<html><head><title>planted report</title></head><body>
<h1>Planted report</h1>
<p id="origin">the report's script did not run</p>
<p id="reach">unknown</p>
<script>document.getElementById('origin').textContent = 'ran in origin ' + window.origin;</script>
<script>
try {
  parent.document.title = 'PWNED'; top.document.title = 'PWNED';
  parent.localStorage.setItem('pwned', '1'); top.localStorage.setItem('pwned', '1');
  document.getElementById('reach').textContent = 'reached the app, cookies: ' + top.document.cookie;
} catch (e) {
  document.getElementById('reach').textContent = 'blocked: ' + e.name;
}
</script>
</body></html>
"""


def _plant_report(app: RunningApp, folder: Path) -> str:
    from callbot_core.store import Store
    from callbot_core.store.models import ReportRun, utcnow

    html = folder / "planted.html"
    html.write_text(PLANTED, encoding="utf-8")
    store = Store(app.database_url)
    try:
        with store.session() as session:
            row = ReportRun(
                name="performance_report", parameters={}, requested_by="admin", status="succeeded",
                finished_at=utcnow(), output_html=str(html),
            )  # fmt: skip
            session.add(row)
            session.flush()
            return f"#{row.id} · performance_report · succeeded"
    finally:
        store.dispose()


def test_a_script_in_a_report_runs_in_an_opaque_origin_and_cannot_reach_the_app(
    page: Page, app: RunningApp, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    label = _plant_report(app, tmp_path)
    sign_in(page, app.base_url)
    open_page(page, app.base_url, "reports", "Reports")
    title = page.title()

    page.get_by_role("combobox", name="Open a report").click()
    page.get_by_role("option", name=label).first.click()
    expect(page.get_by_role("button", name="Download the report (HTML)")).to_be_visible()

    # Wait until the report's frame exists and its first script has run.
    frame = None
    for _ in range(100):
        frame = next((f for f in page.frames if f.locator("#origin").count()), None)
        if frame is not None and frame.locator("#origin").inner_text() != "the report's script did not run":
            break
        page.wait_for_timeout(200)  # polling the frames, which appear once the component mounts
    screenshot(page, "report_sandbox")
    assert frame is not None, "the report was not shown in any frame"

    expect(frame.locator("#origin")).to_have_text("ran in origin null")  # scripts run, in an opaque origin
    expect(frame.locator("#reach")).to_have_text("blocked: SecurityError")
    assert page.title() == title != "PWNED"
    assert page.evaluate("() => window.localStorage.getItem('pwned')") is None
