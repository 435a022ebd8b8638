"""The real app in a real browser (Debian chromium under Playwright): sign in, chat, summaries, sign out.

AppTest covers the pages' logic; this covers what only a browser shows: the login form and its cookie,
the websocket-driven streaming, HTML in messages rendered as text. Skipped when /usr/bin/chromium is
missing, except in CI (CI=true), where that is a failure. Screenshots of each step go to test-artifacts/.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import (
    ADMIN_PASSWORD,
    HTML_PROBE,
    IN_CI,
    MISSING,
    TTFT,
    TURN_TIMEOUT_MS,
    WATCH_STREAM_JS,
    RunningApp,
    chat_input,
    click_button,
    open_page,
    screenshot,
    sign_in,
    wait_idle,
    wait_signed_in,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")


def _bubbles(page: Page, role: str) -> Locator:
    return page.locator(f'[data-testid=stChatMessageContent][aria-label="Chat message from {role}"]')


def _send(page: Page, text: str) -> None:
    box = chat_input(page)
    box.fill(text)
    box.press("Enter")


def _wait_reply(page: Page, replies_before: int) -> Locator:
    """The newest assistant bubble once its metrics badge shows, i.e. once the streamed turn is stored."""
    from playwright.sync_api import expect

    replies = _bubbles(page, "assistant")
    expect(replies).to_have_count(replies_before + 1, timeout=TURN_TIMEOUT_MS)
    reply = replies.nth(replies_before)
    expect(reply.get_by_text(TTFT)).to_be_visible(timeout=TURN_TIMEOUT_MS)
    return reply


def test_chat_end_to_end(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    page.goto(app.base_url + "/")
    expect(page.get_by_text("Sign in to Callbot Workbench")).to_be_visible()
    screenshot(page, "01_sign_in_form")

    sign_in(page, app.base_url)
    expect(page.get_by_role("heading", name="Chat", exact=True)).to_be_visible()
    screenshot(page, "02_signed_in_chat")

    # Receptionist is the default persona; the selectbox shows it before anything is chosen. While a rerun is drawing,
    # Streamlit keeps the previous run's elements (faded) beside the new ones until the run ends: wait for one.
    persona = page.get_by_role("combobox", name="Persona")
    expect(persona).to_have_count(1)
    expect(persona).to_have_value("Clinic receptionist (receptionist)")
    click_button(page, "New conversation")
    expect(chat_input(page)).to_be_visible()
    expect(page.get_by_text(re.compile(r"Conversation \d+ · receptionist@"))).to_be_visible()
    wait_idle(page)  # the greeting is drawn by the run that drew the box: count it once that run has ended
    greetings = _bubbles(page, "assistant").count()  # the persona's greeting, if it has one

    page.evaluate(WATCH_STREAM_JS)
    _send(page, "What are your opening hours?")
    expect(_bubbles(page, "user").last).to_have_text("What are your opening hours?")
    reply = _wait_reply(page, greetings)
    reply_text = reply.locator("[data-testid=stMarkdownContainer]").first.inner_text().strip()
    assert reply_text, "the assistant's reply is empty"
    lengths = {n for count, n in page.evaluate("window.__cbLengths") if count == greetings + 1 and n > 0}
    assert len(lengths) >= 3, f"the reply appeared in {len(lengths)} step(s): it was not streamed"
    screenshot(page, "03_streamed_reply")

    # HTML typed by a user is shown as text: no script runs, no markup is built from it.
    _send(page, HTML_PROBE)
    user_bubble = _bubbles(page, "user").last
    expect(user_bubble).to_contain_text("<script>")
    expect(user_bubble).to_contain_text(HTML_PROBE)
    _wait_reply(page, greetings + 1)
    assert page.evaluate("typeof window.__pwned") == "undefined"
    expect(page.locator("[data-testid=stChatMessage] b", has_text="bold?")).to_have_count(0)
    expect(page.locator("[data-testid=stChatMessage] script")).to_have_count(0)
    screenshot(page, "04_html_as_text")

    page.get_by_role("button", name="End conversation").click()
    heading = page.get_by_role("heading", name="Summary", exact=True)
    expect(heading).to_be_visible(timeout=TURN_TIMEOUT_MS)
    expect(page.get_by_text("This conversation has ended.")).to_be_visible()
    # The short summary is the markdown element right after the heading's container.
    summary = (
        page.locator("[data-testid=stElementContainer]", has=heading)
        .locator("xpath=following-sibling::*[1]")
        .locator("[data-testid=stMarkdownContainer]")
    )
    summary_text = summary.inner_text().strip()
    assert summary_text and summary_text != "No summary was written.", summary_text
    full = page.locator("[data-testid=stExpander]", has_text="Full summary").locator("[data-testid=stExpanderDetails]")
    expect(full).to_be_visible()
    assert full.inner_text().strip() not in ("", "No summary was written.")
    expect(chat_input(page)).to_have_count(0)
    screenshot(page, "05_summary")


def test_code_in_a_message_shows_its_angle_brackets(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    click_button(page, "New conversation")
    expect(chat_input(page)).to_be_visible()
    wait_idle(page)  # the greeting is drawn by the run that drew the box: count it once that run has ended
    greetings = _bubbles(page, "assistant").count()
    _send(page, "What does `<div>` mean?")
    code = _bubbles(page, "user").last.locator("code")
    expect(code).to_have_count(1)
    _wait_reply(page, greetings)  # let the turn finish: the next test must not share the model with it
    screenshot(page, "06_code_in_message")
    # Escaping HTML by hand once showed `&lt;div&gt;` here: markdown keeps entities literal inside code.
    assert code.inner_text() == "<div>"


def test_reload_keeps_the_user_signed_in(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    # The cookie is written by a browser component just after the signed-in page is drawn: wait for it.
    page.wait_for_function("document.cookie.includes('callbot_auth=')", timeout=15_000)
    page.reload()
    login_form = page.get_by_text("Sign in to Callbot Workbench")
    sign_out = page.get_by_role("button", name="Sign out")
    expect(sign_out.or_(login_form)).to_be_visible()
    screenshot(page, "07_after_reload")
    assert "callbot_auth" in {c["name"] for c in page.context.cookies()}, "no sign-in cookie was set"
    expect(sign_out).to_be_visible()


def test_a_deep_link_survives_sign_in(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    page.goto(app.base_url + "/conversations")
    form = page.locator("[data-testid=stForm]").filter(has_text="Sign in to Callbot Workbench")
    form.get_by_role("textbox", name="Username", exact=True).fill("admin")
    form.get_by_role("textbox", name="Password", exact=True).fill(ADMIN_PASSWORD)
    form.get_by_role("button", name="Login").click()
    wait_signed_in(page)
    expect(page.get_by_role("heading", level=1)).to_have_count(1)
    screenshot(page, "10_deep_link_after_sign_in")
    assert page.get_by_role("heading", level=1).inner_text() == "Conversations", page.url


def test_sign_out_shows_the_login_form_again(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    wait_signed_in(page)
    page.get_by_role("button", name="Sign out").click()
    login_form = page.locator("[data-testid=stForm]").filter(has_text="Sign in to Callbot Workbench")
    expect(login_form).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    screenshot(page, "08_signed_out")

    # Signed out stays signed out: a leftover sign-in cookie must not sign the browser back in.
    page.reload()
    expect(login_form).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    screenshot(page, "09_signed_out_after_reload")


def test_sql_console_in_the_browser(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    open_page(page, app.base_url, "analytics", "Analytics")
    editor = page.get_by_role("textbox", name="SQL")
    editor.fill("select persona, count(*) as turns from turns group by 1")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.get_by_text(re.compile(r"\d+ row\(s\) in [\d,]+ ms"))).to_be_visible()
    expect(page.locator("[data-testid=stDataFrame]").filter(visible=True).first).to_be_visible()
    screenshot(page, "11_sql_console")

    editor.fill("drop table messages")
    page.get_by_role("button", name="Run", exact=True).click()
    expect(page.locator("[data-testid=stAlertContentError]").first).to_contain_text("DROP", ignore_case=True)
    screenshot(page, "12_sql_refused")

    # Ctrl+Enter in the editor runs the query, as the Run button does.
    editor.fill("select * from (values (1), (2), (3), (4), (5), (6), (7)) t(n)")
    editor.press("Control+Enter")
    expect(page.get_by_text(re.compile(r"^7 row\(s\) in [\d,]+ ms"))).to_be_visible()
    # A canned query loads and runs in one click; so does a view's name in "Views you can query".
    page.get_by_role("button", name="Turns per persona", exact=True).click()
    expect(editor).to_have_value(re.compile(r"^select persona, count\(\*\) as turns from turns"))
    page.get_by_role("tab", name="Views you can query").click()
    expect(page.locator("[data-testid=stDataFrame]").filter(visible=True).first).to_be_visible()
    screenshot(page, "12b_sql_views")
    page.get_by_role("button", name="daily_activity", exact=True).click()
    expect(editor).to_have_value("select * from daily_activity limit 100")
    expect(page.get_by_text(re.compile(r"\d+ row\(s\) in [\d,]+ ms"))).to_be_visible()
    screenshot(page, "12c_sql_view_loaded")


def _add_dashboard_turns(database_url: str) -> None:
    """Two personas' turns from the last hour, one of them 19 s long: the charts have series to colour, a slow
    bar to show, and one day of data (whose axes once ticked 23:59:59.999)."""
    from datetime import UTC, datetime, timedelta

    from callbot_core.store import Store
    from tests.analytics.test_analytics import add_conversation, version_of

    store = Store(database_url)
    started = datetime.now(UTC) - timedelta(hours=1)
    try:
        with store.session() as s:
            for persona, totals in (("receptionist", [420.0, 650.0, 19_000.0]), ("support", [510.0, 880.0])):
                turns = [(f"question {i}", started + timedelta(minutes=i), "answer", 120.0 + 40 * i, total, 8, 25.0)
                         for i, total in enumerate(totals)]  # fmt: skip
                add_conversation(s, version_of(s, persona), backend="embedded", model="m1", user=None,
                                 started=started, turns=turns)  # fmt: skip
    finally:
        store.dispose()


# Each chart's series colours as plotly.js drew them (its resolved trace colours), chart by chart.
_SERIES_COLOURS_JS = """() => [...document.querySelectorAll('.js-plotly-plot')].map(gd =>
    gd._fullData.map(t => (t.marker && typeof t.marker.color === 'string' && t.marker.color)
                          || (t.line && t.line.color) || ''))"""
# The x tick labels of the charts of daily series.
_DAILY_TICKS_JS = """() => [...document.querySelectorAll('.js-plotly-plot')]
    .filter(gd => /per day|over time/.test((gd.layout.title && gd.layout.title.text) || ''))
    .flatMap(gd => [...gd.querySelectorAll('.xtick text')].map(t => t.textContent))"""


def test_dashboard_export_opens_offline(page: Page, app: RunningApp, tmp_path) -> None:  # type: ignore[no-untyped-def]
    from playwright.sync_api import expect

    _add_dashboard_turns(app.database_url)
    sign_in(page, app.base_url)
    open_page(page, app.base_url, "dashboards", "Dashboards")
    expect(page.locator("[data-testid=stPlotlyChart]").first).to_be_visible()
    page.get_by_role("button", name="Export dashboard").click()
    with page.expect_download() as info:
        page.get_by_role("button", name="Download dashboard (HTML, works offline)").click()
    path = tmp_path / "dashboard.html"
    info.value.save_as(path)
    screenshot(page, "13_dashboards")

    # Open the file with every network request refused: the charts must still draw.
    offline = page.context.browser.new_context()  # type: ignore[union-attr]
    requests: list[str] = []
    offline.route("**/*", lambda route: (requests.append(route.request.url), route.abort())
                  if not route.request.url.startswith("file:") else route.continue_())  # fmt: skip
    report = offline.new_page()
    report.goto(path.as_uri())
    expect(report.locator(".plotly-graph-div").first).to_be_visible()
    assert report.locator(".plotly-graph-div").count() == 12
    assert report.locator(".main-svg").count() >= 12  # plotly.js ran and drew
    assert requests == [], requests
    report.screenshot(path=str(screenshot(page, "14_dashboard_export").with_name("14_dashboard_export_file.png")))

    # The file draws every series in the colour the page drew it in, and none near-black.
    expect(page.locator(".js-plotly-plot")).to_have_count(12)
    on_page, in_file = page.evaluate(_SERIES_COLOURS_JS), report.evaluate(_SERIES_COLOURS_JS)
    assert in_file == on_page, (in_file, on_page)
    drawn = [c for chart in in_file for c in chart]
    assert len(drawn) >= 10 and all(c.startswith("#") and max(int(c[i : i + 2], 16) for i in (1, 3, 5)) >= 0x40
                                    for c in drawn), drawn  # fmt: skip
    # One day of data: the daily charts tick by day, not by the millisecond.
    for where in (report, page):
        ticks = where.evaluate(_DAILY_TICKS_JS)
        assert ticks and not [t for t in ticks if ":" in t], ticks
    offline.close()
