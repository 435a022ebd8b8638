"""The Chat page in daily use (issue 11) through AppTest: a turn never vanishes, the input is locked while a reply
streams, Stop, Regenerate, the thinking state, metric tooltips, rejected messages, the history list, summaries.

Streamlit interrupts a running script when the browser sends a new event (a click, a message): the script's next
Streamlit call raises. The `mid_stream` fixture does that from inside the reply's stream: it queues on the running
script the event the browser would send (every widget's value, with one button clicked or one message submitted),
or asks it to stop as the browser's Stop does, and the page's own next call meets it. AppTest then reruns the
script in the same thread; the real server starts the new run at once in a new thread while the old one winds
down, which tests/browser/test_browser_chat.py covers. Replies come from the Ollama-protocol server in
tests/fake_ollama.py through the real backend.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import pytest
from sqlalchemy import select
from streamlit.proto.WidgetStates_pb2 import WidgetStates
from streamlit.runtime.scriptrunner import RerunData
from streamlit.runtime.scriptrunner_utils.script_run_context import get_script_run_ctx
from streamlit.testing.v1 import AppTest

from callbot_core.backends.llm import ChatMessage, GenerationParams, Token
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations import summaries
from callbot_core.conversations.prompt import PastMessage
from callbot_core.store import Store
from callbot_core.store.models import Message, TurnMetrics
from tests.app.helpers import PW, button, sign_in

REPLY = "Our hours are 8 to 6."
GREETING = "Good morning, you've reached the clinic. How can I help you today?"
TRIGGERS = {"trigger_value", "string_trigger_value", "chat_input_value", "json_trigger_value"}


# -- helpers -----------------------------------------------------------------------------------


def _start(at: AppTest, backend: str = "ollama") -> int:
    """A new conversation with the receptionist on `backend`; returns its id."""
    persona = at.selectbox(key="chat_persona")
    persona.select_index(next(i for i, o in enumerate(persona.options) if "(receptionist)" in o))
    at.selectbox(key="chat_backend").select(backend)
    at.run()
    button(at, "New conversation").click()
    at.run()
    assert not at.exception, at.exception
    return _conversation_id(at)


def _conversation_id(at: AppTest) -> int:
    found = next(m for c in at.caption if (m := re.match(r"Conversation (\d+) ·", c.value)))
    return int(found.group(1))


def _bubbles(at: AppTest, role: str | None = None):  # type: ignore[no-untyped-def]
    return [m for m in at.chat_message if role is None or m.name == role]


def _texts(at: AppTest, role: str | None = None) -> list[str]:
    return [m.markdown[0].value for m in _bubbles(at, role) if m.markdown]


def _captions(block) -> list[str]:  # type: ignore[no-untyped-def]
    return [c.value for c in block.caption]


def _send(at: AppTest, text: str) -> AppTest:
    at.chat_input(key="chat_input").set_value(text).run()
    assert not at.exception, at.exception
    return at


def _turns(store: Store, cid: int) -> list[tuple[str, str | None]]:
    """(caller's text, stored error) of every turn of a conversation, in order."""
    with store.session() as session:
        rows = session.execute(
            select(Message.text, TurnMetrics.error)
            .join(TurnMetrics, TurnMetrics.user_message_id == Message.id)
            .where(Message.conversation_id == cid)
            .order_by(Message.id)
        )
        return [(text, error) for text, error in rows]


def _browser_sends(*, click: str | None = None, message: str | None = None) -> Callable[[], None]:
    """What the browser sends when a button is clicked or a message submitted while the script runs: every widget's
    value, with this one trigger set. Queued on the running script, it meets the script's next Streamlit call."""

    def event() -> None:
        ctx = get_script_run_ctx()
        assert ctx is not None and ctx.script_requests is not None
        state = ctx.session_state._state
        states = WidgetStates()
        for widget in state.get_widget_states():
            if widget.WhichOneof("value") not in TRIGGERS:
                states.widgets.add().CopyFrom(widget)
        if click is not None:
            widget_id = state.get_widget_id_from_key(click)
            assert widget_id is not None, f"no widget {click!r} on the page while the reply streams"
            clicked = states.widgets.add()
            clicked.id, clicked.trigger_value = widget_id, True
        if message is not None:
            widget_id = state.get_widget_id_from_key("chat_input")
            assert widget_id is not None
            sent = states.widgets.add()
            sent.id = widget_id
            sent.chat_input_value.data = message
        ctx.script_requests.request_rerun(
            RerunData(widget_states=states, page_script_hash=ctx.page_script_hash, query_string=ctx.query_string)
        )

    return event


def _browser_stops() -> None:
    """The browser's own Stop (or a closed tab): the script stops at its next Streamlit call, nothing reruns."""
    ctx = get_script_run_ctx()
    assert ctx is not None and ctx.script_requests is not None
    ctx.script_requests.request_stop()


@pytest.fixture
def mid_stream(monkeypatch: pytest.MonkeyPatch) -> Callable[[int, Callable[[], None]], None]:
    """`mid_stream(n, event)`: the next reply fires `event` once, after n pieces have reached the page."""

    def arm(after: int, event: Callable[[], None]) -> None:
        original = OllamaBackend.stream
        fired: list[bool] = []

        def stream(
            self: OllamaBackend, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
        ) -> Iterator[Token]:
            pieces = 0
            for token in original(self, messages, params, model=model):
                if pieces == after and not fired:
                    fired.append(True)
                    event()
                pieces += 1 if token.text else 0
                yield token

        monkeypatch.setattr(OllamaBackend, "stream", stream)

    return arm


# -- a turn never vanishes ---------------------------------------------------------------------


def test_the_input_is_locked_while_a_reply_streams_and_stop_is_offered(app_store: Store, mid_stream) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    assert at.chat_input(key="chat_input").proto.disabled is False
    mid_stream(3, _browser_stops)  # the page as it stands while the fourth piece is on its way
    _send(at, "When are you open?")
    assert at.chat_input(key="chat_input").proto.disabled is True, "the message box is usable mid-reply"
    assert "Stop" in [b.label for b in at.button]
    assert _texts(at, "user")[-1] == "When are you open?"
    assert _texts(at, "assistant")[-1] == "Our hours are"  # the reply so far
    assert _turns(app_store, cid) == [("When are you open?", "interrupted: the reply was not read to the end")]

    at.run()  # the next thing the browser does: the turn is drawn from the store, with its state
    assert at.chat_input(key="chat_input").proto.disabled is False
    assert "Stop" not in [b.label for b in at.button]
    assert _texts(at, "user") == ["When are you open?"]
    assert any("interrupted" in c for m in _bubbles(at) for c in _captions(m))
    assert "Regenerate" in [b.label for b in at.button]


def test_a_message_sent_mid_reply_is_refused_and_the_first_turn_stays(app_store: Store, mid_stream) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    # The box is locked while a reply streams, in the browser and on the server: a message that still arrives (a
    # stale page, a forged event) is not sent. The event still stops the script, so the reply is cut short: the
    # first turn stays on the page, marked interrupted, with what had arrived of its reply.
    mid_stream(2, _browser_sends(message="And on Saturday?"))
    _send(at, "When are you open?")
    assert _texts(at, "user") == ["When are you open?"]
    assert _turns(app_store, cid) == [("When are you open?", "interrupted: the reply was not read to the end")]
    notes = [c for m in _bubbles(at, "assistant") for c in _captions(m)]
    assert any("interrupted" in c for c in notes), notes
    assert not any("failed" in c for c in notes), notes  # interrupted is not a failure
    assert any("Our hours" in c for c in notes), "the partial reply went"
    assert "Regenerate" in [b.label for b in at.button]
    assert at.chat_input(key="chat_input").proto.disabled is False


def test_stop_stores_the_turn_as_interrupted_and_shows_it(app_store: Store, mid_stream) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    mid_stream(2, _browser_sends(click="chat_stop"))
    _send(at, "Can I book for Tuesday?")
    assert _turns(app_store, cid) == [("Can I book for Tuesday?", "interrupted: the reply was not read to the end")]
    assert any(i.value.startswith("Stopped") for i in at.info), [i.value for i in at.info]
    assert _texts(at, "user") == ["Can I book for Tuesday?"]
    assert any("interrupted" in c for m in _bubbles(at) for c in _captions(m))
    assert at.chat_input(key="chat_input").proto.disabled is False
    assert "Regenerate" in [b.label for b in at.button]
    assert "Stop" not in [b.label for b in at.button]


def test_regenerate_sends_the_last_message_again_as_a_new_turn(app_store: Store, mid_stream) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    _send(at, "When are you open?")
    assert _texts(at) == [GREETING, "When are you open?", REPLY]
    button(at, "Regenerate").click()
    at.run()
    assert not at.exception, at.exception
    assert _texts(at) == [GREETING, "When are you open?", REPLY, "When are you open?", REPLY]
    again = [m for m in _bubbles(at, "user") if m.markdown][-1]
    assert any("Regeneration" in c for c in _captions(again)), _captions(again)
    assert _turns(app_store, cid) == [("When are you open?", None), ("When are you open?", None)]

    # After a Stop, Regenerate asks again for the reply that was cut short.
    mid_stream(1, _browser_sends(click="chat_stop"))
    _send(at, "Is there parking?")
    button(at, "Regenerate").click()
    at.run()
    assert _turns(app_store, cid)[-2:] == [
        ("Is there parking?", "interrupted: the reply was not read to the end"),
        ("Is there parking?", None),
    ]
    assert _texts(at)[-2:] == ["Is there parking?", REPLY]


def test_a_reply_shows_a_thinking_state_until_its_first_words(app_store: Store, mid_stream) -> None:
    at = sign_in("rita", PW)
    _start(at)
    mid_stream(0, _browser_stops)  # stopped before the first piece arrives
    _send(at, "When are you open?")
    last = _bubbles(at, "assistant")[-1]
    assert any("Thinking" in c for c in _captions(last)), _captions(last)

    at.run()
    _send(at, "And on Saturday?")  # a whole reply: the first words replace the thinking state
    assert not any("Thinking" in c.value for c in at.caption)
    assert _texts(at, "assistant")[-1] == REPLY


def test_metric_chips_explain_themselves(app_store: Store) -> None:
    at = sign_in("rita", PW)
    _start(at)
    _send(at, "When are you open?")
    chips = [md for md in at.markdown if "TTFT" in md.value]
    assert chips, [md.value for md in at.markdown]
    tooltip = chips[-1].proto.help
    for words in ("Time to first token", "tokens per second", "Tokens"):
        assert words.lower() in tooltip.lower(), tooltip


# -- what the box accepts ----------------------------------------------------------------------


def test_a_blank_message_leaves_no_bubble(app_store: Store) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    _send(at, "  \n\t ")
    assert any("Not sent: The message is empty" in w.value for w in at.warning)
    assert _bubbles(at, "user") == []
    assert _turns(app_store, cid) == []
    # A rerun nobody asked for (a component's late answer) keeps the refusal on the page; the next message clears it.
    at.run()
    assert any("Not sent: The message is empty" in w.value for w in at.warning)
    _send(at, "Hello")
    assert not any("Not sent" in w.value for w in at.warning)


def test_an_over_long_message_stays_in_the_box_with_a_counter(app_store: Store) -> None:
    at = sign_in("rita", PW)
    cid = _start(at)
    limit = 8000  # CALLBOT_MAX_MESSAGE_CHARS' default
    text = "Please note: " + "x" * (limit - 12)
    _send(at, text)
    assert any(w.value.startswith("Not sent: The message is too long") for w in at.warning)
    assert _bubbles(at, "user") == [], "a refused message was drawn as if it had been said"
    assert _turns(app_store, cid) == []
    box = at.chat_input(key="chat_input")
    assert box.proto.value == text and box.proto.set_value, "the refused text is not back in the box"
    assert any(f"{len(text):,} / {limit:,} characters" in c.value for c in at.caption), [c.value for c in at.caption]

    _send(at, text[: limit - 100])  # shortened: sent
    assert _texts(at, "user") == [text[: limit - 100]]
    assert not any("characters" in c.value and "/" in c.value for c in at.caption)


# -- history -----------------------------------------------------------------------------------


def test_history_reopens_an_active_conversation_to_continue_it(app_store: Store) -> None:
    at = sign_in("rita", PW)
    first = _start(at)
    _send(at, "I would like a flamingo appointment")
    second = _start(at)
    assert second != first and _texts(at) == [GREETING]

    again = sign_in("rita", PW)  # another day, another browser session
    picker = again.selectbox(key="chat_history")
    assert any(f"#{first} " in str(o) for o in picker.options), picker.options
    picker.select_index(next(i for i, o in enumerate(picker.options) if f"#{first} " in str(o)))
    again.run()
    button(again, "Continue").click()
    again.run()
    assert _conversation_id(again) == first
    assert "I would like a flamingo appointment" in _texts(again)
    _send(again, "And a pelican one?")
    assert _texts(again)[-2:] == ["And a pelican one?", REPLY]
    assert [t for t, _ in _turns(app_store, first)] == ["I would like a flamingo appointment", "And a pelican one?"]


def test_history_lists_only_my_active_conversations(app_store: Store) -> None:
    rita = sign_in("rita", PW)
    mine = _start(rita)
    button(rita, "End conversation").click()
    rita.run()
    admin = sign_in("admin", "admin-pass-1")
    theirs = _start(admin)
    rita = sign_in("rita", PW)
    options = [str(o) for o in rita.selectbox(key="chat_history").options]
    assert not any(f"#{mine} " in o for o in options), options  # ended
    assert not any(f"#{theirs} " in o for o in options), options  # someone else's


# -- summaries ---------------------------------------------------------------------------------


def test_the_full_summary_is_not_the_short_one(app_store: Store) -> None:
    at = sign_in("rita", PW)
    _start(at)
    _send(at, "When are you open?")
    _send(at, "Can I book with Dr. Patel on Tuesday at 10?")
    button(at, "End conversation").click()
    at.run()
    assert "This conversation has ended." in [s.value for s in at.success]
    full = next(e for e in at.expander if e.label == "Full summary").markdown[0].value
    shown = [m.value for m in at.markdown]
    short = shown[shown.index(full) - 1]  # the short summary sits right above the full one
    assert short != full and len(full) > len(short)
    assert "Dr. Patel on Tuesday at 10" in full  # the details, as they were said


@pytest.mark.model
def test_the_real_model_writes_a_longer_full_summary(embedded, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small token limits keep this quick; the full summary must still be the longer, more detailed one.
    monkeypatch.setattr(summaries, "SHORT_PARAMS", GenerationParams(temperature=0.2, top_p=0.9, max_tokens=40, seed=7))
    monkeypatch.setattr(summaries, "FULL_PARAMS", GenerationParams(temperature=0.2, top_p=0.9, max_tokens=60, seed=7))
    history = [
        PastMessage("assistant", GREETING, -1),
        PastMessage("user", "What are your opening hours?", -1),
        PastMessage("assistant", "We are open Monday to Friday from 8am to 6pm and Saturday from 9am to 1pm.", -1),
        PastMessage("user", "Can I book an appointment with Dr. Patel on Tuesday at 10?", -1),
        PastMessage("assistant", "Yes, I have booked you with Dr. Patel on Tuesday at 10am. May I have your name?", -1),
        PastMessage("user", "It's Maria Lopez.", -1),
        PastMessage("assistant", "Thank you, Maria. See you on Tuesday.", -1),
    ]
    written = summaries.summarise_transcript(embedded, embedded.default_model, "Clinic receptionist", history)
    assert written.short and written.full and written.short != written.full
    assert len(written.full) > 2 * len(written.short), written
    assert len(re.findall(r"[.!?](?:\s|$)", written.short)) <= 3, written.short
    for detail in ("Dr. Patel on Tuesday at 10", "Maria Lopez", "8am to 6pm"):
        assert detail in written.full, written.full
