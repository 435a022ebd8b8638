"""The persona studio in a real browser, as a new user walks it on the embedded model.

Clone the receptionist, change the clone's prompt, compare the old and new versions on three questions and
vote, run the shipped receptionist suite on both versions at two temperatures, promote the winner on the
Leaderboard; then `callbot sql` over the leaderboard view shows what the pages stored. Screenshots of each
step go to test-artifacts/.
"""

from __future__ import annotations

import json
import re
import subprocess
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import (
    CALLBOT,
    IN_CI,
    MISSING,
    TURN_TIMEOUT_MS,
    RunningApp,
    app_env,
    open_page,
    screenshot,
    send_in_chat_box,
    sign_in,
    wait_idle,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")

QUESTIONS = ["What are your opening hours?", "Can I book an appointment for Tuesday?", "Where is the clinic?"]
NEW_PROMPT = (
    "You are Sam, the friendly front desk of a small medical clinic, open Monday to Friday 8am to 6pm and "
    "Saturday 9am to 1pm. Answer in one or two short sentences. Book, move and cancel appointments."
)
# 4 cases of 6 caller turns on the embedded model, with a browser and the app sharing two cores.
SUITE_TIMEOUT_MS = 600_000


def _choose(page: Page, select: Locator, option: str) -> None:
    """Pick `option` in a Streamlit selectbox or multiselect.

    A pick reruns the script and may redraw the next widget (its key can depend on the pick), swallowing a
    click that lands meanwhile; so the dropdown is opened again until the option shows.
    """
    from playwright.sync_api import Error

    item = page.get_by_role("option", name=option, exact=True)
    for _ in range(5):
        wait_idle(page)
        # The arrow opens both kinds; the middle of a multiselect may be a chip, whose click does not.
        select.locator("svg").last.click()
        try:
            item.click(timeout=4_000)
            return
        except Error:
            page.keyboard.press("Escape")
    screenshot(page, "debug_choose")
    raise AssertionError(f"option {option!r} never showed in {select}")


def _ask(page: Page, question: str) -> None:
    """Send a caller turn on the Compare page: sent means the page shows it."""
    send_in_chat_box(page, question, page.get_by_text(question, exact=True), what="Compare page")


def _select(page: Page, label: str) -> Locator:
    return page.get_by_test_id("stSelectbox").filter(visible=True).filter(has=page.get_by_text(label, exact=True))


def _flash(page: Page, text: str, timeout_ms: float | None = None) -> None:
    from playwright.sync_api import expect

    expect(page.get_by_test_id("stAlertContentSuccess").filter(has_text=text)).to_be_visible(timeout=timeout_ms)


@pytest.mark.timeout(600)  # the whole studio walk on the real model; 300 s is tight on a loaded machine
def test_persona_studio_end_to_end(page: Page, app: RunningApp) -> None:  # noqa: F811
    try:
        _walk(page, app)
    except Exception as exc:
        # What the page showed and what the app logged: the browser and the server are gone afterwards.
        screenshot(page, "29_studio_failure")
        raise AssertionError(f"{exc}\n--- app log ---\n{app.log_tail()}") from exc


def _walk(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    open_page(page, app.base_url, "personas", "Personas")

    # Clone the receptionist: the page then shows the clone.
    page.get_by_role("tab", name="Manage").click()
    clone = page.get_by_test_id("stForm").filter(has_text="Clone receptionist@")
    clone.get_by_label("New key").fill("frontdesk")
    clone.get_by_label("New name").fill("Front desk")
    clone.get_by_role("button", name="Clone").click()
    _flash(page, "Created frontdesk@1.")
    expect(page.get_by_text("Front desk · frontdesk@1")).to_be_visible()
    screenshot(page, "20_studio_cloned")

    # Choosing a card to import keeps the Card tab open, though the message above the tabs goes away.
    page.get_by_role("tab", name="Card").click()
    page.get_by_test_id("stFileUploader").filter(visible=True).locator("input[type=file]").set_input_files(
        files=[{"name": "card.json", "mimeType": "application/json", "buffer": b'{"spec": "chara_card_v2"}'}]
    )
    expect(page.get_by_role("button", name="Import")).to_be_visible()
    expect(page.get_by_test_id("stAlertContentSuccess")).to_have_count(0)
    expect(page.get_by_role("tab", name="Card", selected=True)).to_be_visible()

    # Change its prompt: saving makes version 2, which the page then shows; version 1 stays as it was.
    page.get_by_role("tab", name="Edit").click()
    edit = page.get_by_test_id("stForm").filter(has_text="Save as a new version")
    edit.get_by_label("System prompt").fill(NEW_PROMPT)
    edit.get_by_label("What changed").fill("shorter answers, a name")
    edit.get_by_role("button", name="Save as a new version").click()
    _flash(page, "Saved frontdesk@2.")
    expect(page.get_by_text("Front desk · frontdesk@2")).to_be_visible()
    # The clone is compared with its source, word by word.
    page.get_by_role("tab", name="Diff").click()
    expect(_select(page, "From").get_by_role("combobox")).to_have_value("receptionist@1")
    expect(_select(page, "To").get_by_role("combobox")).to_have_value("2")
    expect(page.locator(".stMarkdownColoredBackground", has_text="friendly front desk")).to_be_visible()
    expect(page.locator(".stMarkdownColoredBackground del", has_text="receptionist")).to_be_visible()
    screenshot(page, "21_studio_diff")

    # Compare version 1 and version 2 side by side on three questions; prefer version 2 each time.
    open_page(page, app.base_url, "compare", "Compare")
    # Picking variant 2's persona reruns the page while variant 1's version may still be on its way: check what the
    # pickers hold, and pick again until both are taken (a person sees the value and picks again too).
    wanted = ["1", "2"]
    for _ in range(3):
        for i, version in enumerate(wanted):
            _choose(page, _select(page, "Persona").nth(i), "Front desk (frontdesk)")
            _choose(page, _select(page, "Version").nth(i), version)
        wait_idle(page)
        held = [_select(page, "Version").nth(i).get_by_role("combobox").input_value() for i in range(len(wanted))]
        if held == wanted:
            break
    assert held == wanted, held
    page.get_by_role("button", name="Start comparison").click()
    expect(page.get_by_text("Type a caller turn below")).to_be_visible()
    chips = page.get_by_text(re.compile(r"TTFT [\d,]+ ms"))
    for n, question in enumerate(QUESTIONS, start=1):
        # Both variants' replies carry their metrics once the turn is stored. A component's rerun right after the
        # page loads can cancel the run that took the question before it stored anything (seen in CI: the page
        # back at "Type a caller turn below"); then the question is asked again, as a person would.
        for attempt in range(2):
            _ask(page, question)
            try:
                expect(chips).to_have_count(2 * n, timeout=TURN_TIMEOUT_MS)
                break
            except AssertionError:
                stored = page.get_by_test_id("stChatMessage").filter(has_text=question).count()
                if attempt or stored:
                    raise
    for n in range(1, len(QUESTIONS) + 1):
        page.get_by_role("button", name="Prefer B").filter(visible=True).and_(page.locator(":enabled")).first.click()
        expect(page.get_by_text("preferred")).to_have_count(n)
    screenshot(page, "22_studio_compared")

    # Run the shipped receptionist suite on both versions at two temperatures, from the Personas page.
    open_page(page, app.base_url, "personas", "Personas")
    _choose(page, _select(page, "Persona"), "frontdesk")
    page.get_by_role("tab", name="Suites").click()
    _choose(page, _select(page, "Suite"), "receptionist.yaml")
    versions = page.get_by_test_id("stMultiSelect").filter(visible=True)
    _choose(page, versions, "frontdesk@1")
    page.keyboard.press("Escape")
    wait_idle(page)
    temperatures = page.get_by_label("Temperatures (comma separated; empty: the version's own)")
    temperatures.fill("0.2, 0.7")
    temperatures.press("Enter")
    page.get_by_role("button", name="Run suite").click()
    expect(page.get_by_test_id("stProgress").first).to_be_visible()
    _flash(page, "4 case(s) of receptionist stored.", SUITE_TIMEOUT_MS)  # shown once the whole batch is stored
    screenshot(page, "23_studio_suite")

    # Promote version 2 on the Leaderboard.
    open_page(page, app.base_url, "leaderboard", "Leaderboard")
    _choose(page, _select(page, "Version"), "frontdesk@2")
    page.get_by_role("button", name="Promote to production").click()
    _flash(page, "frontdesk@2 is now the production version.")
    screenshot(page, "24_studio_promoted")

    # The leaderboard view through `callbot sql` holds what the pages stored.
    proc = subprocess.run(
        [str(CALLBOT), "sql", "--format", "json",
         "select persona_version, params, production, eval_runs, assertions, votes, comparisons, pass_rate "
         "from leaderboard where persona = 'frontdesk' order by 1, 2"],
        env=app_env(app.database_url, app.log_path.parent, "unused"), cwd=app.log_path.parent,
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    rows = {(r["persona_version"], r["params"]): r for r in json.loads(proc.stdout)}
    cool, warm = '{"temperature": 0.2}', '{"temperature": 0.7}'
    assert set(rows) == {(v, p) for v in (1, 2) for p in ("{}", cool, warm)}, rows
    # 6 turns with 2-3 checks each: 15 checks per run.
    for v in (1, 2):
        for p in (cool, warm):
            assert (rows[v, p]["eval_runs"], rows[v, p]["assertions"]) == (1, 15), rows[v, p]
            assert 0.0 <= rows[v, p]["pass_rate"] <= 1.0
        assert rows[v, "{}"]["comparisons"] == 3 and rows[v, "{}"]["eval_runs"] == 0
        assert all(r["production"] is (v == 2) for (rv, _), r in rows.items() if rv == v)
    assert (rows[1, "{}"]["votes"], rows[2, "{}"]["votes"]) == (0, 3)
