"""Chat: pick a persona, version, backend and model; talk; see each turn's metrics; end with summaries.

Every turn on the page is drawn from the store with its state (answered, failed, interrupted), so a turn never
vanishes: not when a Stop, a message or any other click cuts a reply short, not on a reload. A turn is run like
this: the message box, Retry and Regenerate only queue the text (callbacks, before the script runs), so the page
knows before it draws anything that a reply will stream; it then locks the message box, offers Stop, streams the
reply below the stored turns and, once the reply is stored, reruns to draw it from the store like the rest.

A click while a reply streams (Stop is one) makes Streamlit start a new run at once and stop the streaming one at
its next Streamlit call, in its own thread: only then does its `with turn:` store the turn as interrupted (the
engine keeps the caller's message, never a partial reply). So the streaming run leaves a `_LiveTurn` in the
session, and the next run waits for it before reading the store: the turn is drawn interrupted, not as a question
left hanging, with what had arrived of the reply (kept in this browser session only). A reply waiting for its
first words, or stalled, sees the click at its next word or at the backend's read timeout.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app.common import (
    backend_picker,
    current_user,
    metric_chips,
    model_picker,
    persona_picker,
    require,
    safe_markdown,
    service,
    settings,
    show_citations,
    store,
    version_picker,
    wait_for_stored,
    write_markdown_stream,
)
from callbot_core.conversations.service import TurnStream
from callbot_core.conversations.transcripts import MessageRow, get_conversation, list_conversations
from callbot_core.conversations.validation import clean_message
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.personas.catalog import persona_catalog

CID = "chat_conversation_id"
PENDING = "chat_pending"  # the caller's text to send on this run (queued by the box, Retry or Regenerate)
NOTICE = "chat_notice"  # one line for the next run: (level, text)
# Why the last message was not sent: [(level, text)], shown on every run until the next message or conversation. A
# rerun the caller did not ask for (a component's late answer, seen in the browser tests) must not wipe it.
REFUSED = "chat_refused"
PARTIAL = "chat_partial"  # {user message id: the reply text shown before it was cut short}, this session only
LIVE = "chat_live_turn"  # the `_LiveTurn` of the run streaming a reply
SUMMARIES = "chat_summaries"
INPUT = "chat_input"
HISTORY_SIZE = 30
PARTIALS_KEPT = 20

THINKING = ":material/hourglass_top: Thinking…"
CHIPS_HELP = (
    "**TTFT**: time to first token, from the start of generation to the reply's first words.  \n"
    "**tok/s**: tokens per second while the reply was written (the decode rate).  \n"
    "**Tokens**: the reply's length in tokens.  \n"
    "**total**: the whole reply, from the start of generation to its last token."
)

user = current_user()
require("chat")
svc = service()

st.title("Chat")


def _queue(text: str) -> None:
    """Send `text` on the run this click starts (a callback: it runs before the page is drawn)."""
    st.session_state[PENDING] = text


def _queue_from_box() -> None:
    text = st.session_state.get(INPUT)
    if isinstance(text, str):
        _queue(text)


def _stopped() -> None:
    st.session_state[NOTICE] = ("info", "Stopped: the reply was cut short, and the turn is stored as interrupted.")


def _forget_turn_state() -> None:
    for key in (PENDING, NOTICE, SUMMARIES, REFUSED):
        st.session_state.pop(key, None)


@dataclass
class _LiveTurn:
    """What the run streaming a reply hands to the run after it. Once Streamlit has stopped that run it may not
    touch the session state, so it fills this object, which the session state already holds."""

    user_message_id: int | None
    partial: str = ""  # the reply as far as it had arrived, if it was cut short
    done: threading.Event = field(default_factory=threading.Event)  # set once the turn's end is stored


def _remember_partial(user_message_id: int | None, text: str) -> None:
    if user_message_id is None or not text:
        return
    kept = st.session_state.setdefault(PARTIAL, {})
    kept[user_message_id] = text
    for old in list(kept)[:-PARTIALS_KEPT]:
        del kept[old]


def _settle_live_turn() -> None:
    """Wait for the reply this session was streaming to be stored, so the page reads the store after it."""
    live_turn = st.session_state.get(LIVE)
    if live_turn is None:
        return
    if wait_for_stored(live_turn.done, "Stopping the reply…"):  # else still stalled: drawn as waiting, settled later
        _remember_partial(live_turn.user_message_id, live_turn.partial)
        st.session_state.pop(LIVE, None)


catalog = persona_catalog(store())
if not catalog:
    st.warning("No personas yet: run `callbot db upgrade` to seed the defaults.")
    st.stop()

with st.container(border=True):
    c1, c2, c3, c4 = st.columns([3, 1, 2, 3])
    choice = persona_picker(catalog, key="chat_persona", where=c1)
    version = version_picker(choice.versions, key=f"chat_version_{choice.key}", where=c2)
    backend = backend_picker(key="chat_backend", where=c3)
    model = model_picker(backend, key=f"chat_model_{backend}", where=c4)
    start = st.button(
        "New conversation", type="primary", disabled=model is None, help="Start talking to this persona version"
    )

if start:
    try:
        info = svc.start(f"{choice.key}@{version}", actor=user, backend=backend, model=model)
    except CallbotError as exc:
        st.error(str(exc))
    else:
        st.session_state[CID] = info.id
        _forget_turn_state()

mine = list_conversations(store(), username=user.username, status="active", limit=HISTORY_SIZE)
if mine:
    with st.expander(f"Your active conversations ({len(mine)})", icon=":material/history:"):
        current = st.session_state.get(CID)
        picked = st.selectbox(
            "Conversation",
            mine,
            format_func=lambda r: (
                f"#{r.id} · {r.persona_key}@{r.persona_version} · {r.turns} turn{'s' if r.turns != 1 else ''}"
                f" · {r.backend} {r.model} · started {r.started_at:%Y-%m-%d %H:%M}"
                + (" · open now" if r.id == current else "")
            ),
            key="chat_history",
            help="Reopen one of your conversations that has not ended, to read it and go on",
        )
        if st.button("Continue", key="chat_open", icon=":material/forum:") and picked is not None:
            st.session_state[CID] = picked.id
            _forget_turn_state()
            st.rerun()

cid = st.session_state.get(CID)
if cid is None:
    st.info("Choose a persona and press **New conversation** to begin, or reopen one of your conversations above.")
    st.stop()

_settle_live_turn()
try:
    detail = get_conversation(store(), cid)
except CallbotError as exc:
    st.session_state.pop(CID, None)
    st.error(str(exc))
    st.stop()

row = detail.row
active = row.status == "active"
st.caption(f"Conversation {row.id} · {row.persona_key}@{row.persona_version} · {row.backend} · {row.model}")


# -- the turn queued for this run: started before anything is drawn, so the page knows a reply will stream -------

notices: list[tuple[str, str]] = []
if notice := st.session_state.pop(NOTICE, None):
    notices.append(notice)
pending = st.session_state.pop(PENDING, None)
if pending is not None:
    st.session_state.pop(REFUSED, None)  # a new message replaces the last refusal
refused: list[tuple[str, str]] = []
turn: TurnStream | None = None
if pending is not None and active:
    try:
        turn = svc.send(cid, pending, actor=user)
    except InvalidInput as exc:
        refused.append(("warning", f"Not sent: {exc}"))
        if pending.strip():
            # Back in the box to be fixed, not lost; the box itself has no room to say why.
            st.session_state[INPUT] = pending
            try:
                length = len(clean_message(pending, max_chars=len(pending)))
            except InvalidInput:
                length = len(pending)
            limit = settings().max_message_chars
            over = f": {length - limit:,} too many" if length > limit else ""
            refused.append(("caption", f"Your message is back in the box · {length:,} / {limit:,} characters{over}"))
    except CallbotError as exc:
        refused.append(("error", str(exc)))
elif pending is not None:
    refused.append(("warning", "Not sent: this conversation has ended; start a new one to go on."))
if refused:
    st.session_state[REFUSED] = refused
notices += st.session_state.get(REFUSED, [])
streaming = turn is not None


# -- the stored turns ----------------------------------------------------------------------------------------


def _state(messages: list[MessageRow], index: int) -> str:
    """What became of the caller's message at `index`: answered, failed, interrupted, or waiting (no end yet)."""
    if index + 1 < len(messages) and messages[index + 1].role == "assistant":
        return "answered"
    error = messages[index].error
    if error is None:
        return "waiting"
    return "interrupted" if error.startswith("interrupted") else "failed"


def _sent_again(previous_state: str | None) -> str:
    if previous_state == "failed":
        return ":material/replay: Retry: the same message sent again after the failed turn above"
    if previous_state == "interrupted":
        return ":material/refresh: Regeneration: the same message sent again after the interrupted reply above"
    return ":material/refresh: Regeneration: the same message sent again for a new reply"


def _user_bubble(text: str, previous: tuple[str, str] | None) -> None:
    """The caller's words; a message that repeats the one before is marked as a retry or a regeneration."""
    with st.chat_message("user"):
        st.markdown(safe_markdown(text))
        if previous is not None and previous[0] == text:
            st.caption(_sent_again(previous[1]))


def _chips(ttft_ms, tokens_per_s, tokens, total_ms) -> None:  # type: ignore[no-untyped-def]
    st.markdown(metric_chips(ttft_ms, tokens_per_s, tokens, total_ms), help=CHIPS_HELP)


def _no_reply(message: MessageRow, state: str, *, last: bool) -> None:
    """The bot's side of a turn that got no reply: why, what had arrived (this session), and a way to send again."""
    with st.chat_message("assistant"):
        if state == "interrupted":
            reason = (message.error or "").removeprefix("interrupted:").strip()
            st.caption(safe_markdown(f":orange-badge[interrupted] No reply was stored: {reason}."))
        elif state == "failed":
            st.caption(f":red-badge[failed] {safe_markdown(message.error or '')}")
        else:
            st.caption(":gray-badge[no reply yet] The reply is being written elsewhere, or its process stopped.")
        partial = st.session_state.get(PARTIAL, {}).get(message.id)
        if partial:
            st.caption(safe_markdown(f"What had arrived before it was cut short (not stored): {partial}"))
        if not last and state in ("interrupted", "failed") and active:
            st.button(
                "Send again",
                key=f"chat_again_{message.id}",
                icon=":material/replay:",
                type="tertiary",
                disabled=streaming,
                on_click=_queue,
                args=(message.text,),
                help="Send this message again as a new turn at the end of the conversation",
            )


# The page keeps one shape from run to run (the stored turns in one container, then the live turn, the notices
# and the buttons): when a reply is stored and the page reruns, everything stays where it was and nothing is drawn
# twice while the rerun catches up.
history = st.container()
messages = detail.messages
last_user = next((i for i in range(len(messages) - 1, -1, -1) if messages[i].role == "user"), None)
previous: tuple[str, str] | None = None  # (text, state) of the caller's message before
with history:
    for index, message in enumerate(messages):
        if message.role != "user":
            with st.chat_message("assistant"):
                st.markdown(safe_markdown(message.text))
                if message.ttft_ms is not None:
                    _chips(message.ttft_ms, message.tokens_per_s, message.completion_tokens, message.total_ms)
                if message.low_relevance is not None:
                    show_citations(message.citations, message.low_relevance, message.retrieve_ms)
            continue
        state = _state(messages, index)
        _user_bubble(message.text, previous)
        if state != "answered":
            _no_reply(message, state, last=index == last_user)
        previous = (message.text, state)


# -- the live turn, the notices and buttons under it, the message box ---------------------------------------------

live = st.empty()  # an empty slot: the streamed copy of a turn goes as soon as the rerun reaches it
notice_slot = st.empty()
controls = st.container(horizontal=True) if active else None
last_failed = active and not streaming and previous is not None and previous[1] == "failed"
if notices or last_failed:
    with notice_slot.container():
        for level, text in notices:
            getattr(st, level)(text)
        if last_failed:
            st.warning("The last turn failed and was not answered.")

end = False
if controls is not None:
    with controls:
        if streaming:
            st.button(
                "Stop",
                key="chat_stop",
                icon=":material/stop_circle:",
                on_click=_stopped,
                help="Stop the reply here; the turn is kept, marked as interrupted",
            )
        elif last_failed and previous is not None:
            st.button(
                "Retry the last message",
                key="chat_retry",
                icon=":material/replay:",
                on_click=_queue,
                args=(previous[0],),
                help="Send the message that failed again",
            )
        elif previous is not None:
            st.button(
                "Regenerate",
                key="chat_regenerate",
                icon=":material/refresh:",
                on_click=_queue,
                args=(previous[0],),
                help="Send your last message again for a new reply; what is on the page stays on record",
            )
        end = st.button("End conversation", key="chat_end", help="End the call and write its summaries")
    st.chat_input(
        "Say something to the bot",
        key=INPUT,
        disabled=streaming,
        submit_mode="disable",  # locked from the moment of sending, before this script even hears of it
        on_submit=_queue_from_box,
    )


def _stream(turn: TurnStream, text: str) -> None:
    """Stream the reply into the live area, then rerun to draw the stored turn."""
    live_turn = _LiveTurn(turn.turn.user_message_id)
    st.session_state[LIVE] = live_turn
    shown: list[str] = []

    def pieces(thinking: DeltaGenerator) -> Iterator[str]:
        for piece in turn:
            if not shown:
                thinking.empty()  # the first words replace the thinking state
            shown.append(piece)
            yield piece

    with live.container():
        _user_bubble(text, previous)
        with st.chat_message("assistant"):
            thinking = st.empty()
            thinking.caption(THINKING)
            try:
                # `with`: a reply cut short (Stop, a new message, a closed tab stop this script) is stored as
                # interrupted at once, with the caller's message kept.
                with turn:
                    write_markdown_stream(pieces(thinking))
            except CallbotError as exc:
                st.session_state[NOTICE] = ("error", safe_markdown(f"The turn failed: {exc}"))
            finally:
                # No session state here: a run Streamlit has stopped may not touch it (see `_LiveTurn`).
                live_turn.partial = "" if turn.result is not None and turn.result.error is None else "".join(shown)
                live_turn.done.set()
    st.rerun()


if turn is not None:
    _stream(turn, pending)

if end:
    st.session_state.pop(REFUSED, None)
    with st.spinner("Writing the summaries…"):
        try:
            summaries = svc.end(cid, actor=user)
        except CallbotError as exc:
            st.session_state[NOTICE] = (
                "error",
                f"The conversation ended, but its summaries could not be written: {exc}",
            )
        else:
            st.session_state[SUMMARIES] = (summaries.short, summaries.full)
    st.rerun()

if not active:
    short, full = st.session_state.get(SUMMARIES) or (row.summary_short, detail.summary_full)
    st.success("This conversation has ended.")
    st.subheader("Summary")
    st.markdown(safe_markdown(short or "No summary was written."))
    with st.expander("Full summary", expanded=True):
        st.markdown(safe_markdown(full or "No summary was written."))
