"""Chat in a real browser (issue 11): a reply streams slowly enough to act on it; the message box is locked while
it streams, Stop keeps the turn on the page marked interrupted, Regenerate sends the message again as a new turn,
and a message too long to send comes back to the box.

The app talks to an Ollama-protocol server (tests/fake_ollama.py, its real wire format) that waits before each
piece of its reply, so the browser has time to see the thinking state and to act mid-reply. Screenshots land in
test-artifacts/chat_*.png.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from sqlalchemy import select

from callbot_core.store import Store
from callbot_core.store.models import Message, TurnMetrics
from tests.browser.helpers import (
    IN_CI,
    MISSING,
    TTFT,
    TURN_TIMEOUT_MS,
    RunningApp,
    chat_input,
    click_button,
    running_app,
    screenshot,
    sign_in,
)
from tests.fake_ollama import FakeOllama

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")

REPLY = ("We", " are", " open", " Monday", " to", " Friday", ",", " 8", " to", " 6", ",", " and", " Saturday", " 9",
         " to", " 1", ".")  # fmt: skip
REPLY_TEXT = "".join(REPLY)
INTERRUPTED = "interrupted: the reply was not read to the end"


@pytest.fixture(scope="module")
def slow_ollama() -> Iterator[FakeOllama]:
    # Slow enough to act mid-reply in a browser: 1.5 s before the first words, 0.3 s between pieces.
    with FakeOllama(reply=REPLY, first_delay_s=1.5, piece_delay_s=0.3) as fake:
        yield fake


@pytest.fixture(scope="module")
def app(slow_ollama: FakeOllama) -> Iterator[RunningApp]:
    """This module's own app, chatting with the slow server by default."""
    extra = {"CALLBOT_OLLAMA_URL": slow_ollama.url, "CALLBOT_LLM_BACKEND": "ollama"}
    with running_app(extra_env=extra) as running:
        yield running


def _bubbles(page: Page, role: str) -> Locator:
    return page.locator(f'[data-testid=stChatMessageContent][aria-label="Chat message from {role}"]')


def _new_conversation(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    expect(page.get_by_role("combobox", name="Backend").first).to_have_value("ollama")
    click_button(page, "New conversation")
    expect(_bubbles(page, "assistant")).to_have_count(1)  # the greeting
    expect(chat_input(page)).to_be_enabled()


def _send(page: Page, text: str) -> None:
    box = chat_input(page)
    box.fill(text)
    box.press("Enter")


def _turns(app: RunningApp) -> list[tuple[str, str | None]]:
    """(caller's text, stored error) of every turn in the app's store, in order."""
    store = Store(app.database_url)
    try:
        with store.session() as session:
            rows = session.execute(
                select(Message.text, TurnMetrics.error)
                .join(TurnMetrics, TurnMetrics.user_message_id == Message.id)
                .order_by(Message.id)
            )
            return [(text, error) for text, error in rows]
    finally:
        store.dispose()


def test_stop_keeps_the_turn_and_regenerate_sends_it_again(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    _new_conversation(page, app)
    box = chat_input(page)
    _send(page, "When are you open?")
    live = _bubbles(page, "assistant").nth(1)
    expect(live).to_contain_text("Thinking…")  # before the first words
    screenshot(page, "chat_01_thinking")

    expect(live).to_contain_text("We are open")  # streaming
    expect(box).to_be_disabled()
    stop = page.locator(".st-key-chat_stop").get_by_role("button", name="Stop")
    expect(stop).to_be_visible()
    # A second message cannot be sent while the reply streams: the box takes no text and Enter sends nothing.
    box.click(force=True)
    page.keyboard.type("And on Saturday?")
    page.keyboard.press("Enter")
    expect(box).to_have_value("")
    screenshot(page, "chat_02_locked_while_streaming")

    stop.click()
    expect(page.get_by_text("Stopped: the reply was cut short")).to_be_visible()
    expect(_bubbles(page, "user")).to_have_count(1)
    expect(_bubbles(page, "user").first).to_have_text("When are you open?")
    note = _bubbles(page, "assistant").nth(1)
    expect(note).to_contain_text("interrupted")
    expect(note).to_contain_text("We are open")  # what had arrived, marked as not stored
    expect(note).not_to_contain_text(REPLY_TEXT)
    expect(stop).to_have_count(0)
    expect(box).to_be_enabled()
    screenshot(page, "chat_03_stopped")
    assert _turns(app) == [("When are you open?", INTERRUPTED)]

    page.locator(".st-key-chat_regenerate").get_by_role("button", name="Regenerate").click()
    expect(_bubbles(page, "user")).to_have_count(2)
    expect(_bubbles(page, "user").nth(1)).to_contain_text("Regeneration")
    expect(box).to_be_disabled()
    reply = _bubbles(page, "assistant").nth(2)
    expect(reply.get_by_text(TTFT)).to_be_visible(timeout=TURN_TIMEOUT_MS)
    expect(reply).to_contain_text(REPLY_TEXT)
    expect(box).to_be_enabled()
    # The first turn is still on the page, as it was stored.
    expect(_bubbles(page, "user").first).to_have_text("When are you open?")
    expect(_bubbles(page, "assistant").nth(1)).to_contain_text("interrupted")
    screenshot(page, "chat_04_regenerated")
    assert _turns(app) == [("When are you open?", INTERRUPTED), ("When are you open?", None)]

    # The chips explain themselves on hover.
    reply.locator("[data-testid=stTooltipIcon]").first.hover()
    expect(page.get_by_text("time to first token", exact=False)).to_be_visible()
    screenshot(page, "chat_05_chip_tooltip")

    # Stop before the first words: the turn is kept all the same.
    _send(page, "Is there parking?")
    expect(_bubbles(page, "assistant").nth(3)).to_contain_text("Thinking…")
    stop.click()
    note = _bubbles(page, "assistant").nth(3)
    expect(note).to_contain_text("interrupted")
    expect(_bubbles(page, "user").nth(2)).to_have_text("Is there parking?")
    expect(box).to_be_enabled()
    screenshot(page, "chat_06_stopped_while_thinking")
    assert _turns(app)[-1] == ("Is there parking?", INTERRUPTED)


def test_a_blank_message_is_refused_and_a_too_long_one_comes_back_to_the_box(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    _new_conversation(page, app)
    box = chat_input(page)
    _send(page, "   ")  # the browser sends blanks: refused, with no empty bubble
    expect(page.get_by_text("Not sent: The message is empty")).to_be_visible()
    expect(_bubbles(page, "user")).to_have_count(0)

    text = "Please note: " + "x" * 7989  # 8,002 characters, over the 8,000 allowed
    _send(page, text)
    expect(page.get_by_text("Not sent: The message is too long")).to_be_visible()
    expect(page.get_by_text("8,002 / 8,000 characters: 2 too many")).to_be_visible()
    expect(box).to_have_value(text)
    expect(_bubbles(page, "user")).to_have_count(0)
    screenshot(page, "chat_07_too_long_kept")

    box.press("End")
    box.press("Backspace")
    box.press("Backspace")
    box.press("Enter")
    expect(_bubbles(page, "user")).to_have_count(1)
    reply = _bubbles(page, "assistant").nth(1)
    expect(reply.get_by_text(TTFT)).to_be_visible(timeout=TURN_TIMEOUT_MS)
    expect(page.get_by_text("Not sent")).to_have_count(0)
    expect(box).to_have_value("")
