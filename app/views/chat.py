"""Chat: pick a persona, version, backend and model; talk; see each turn's metrics; end with summaries."""

from __future__ import annotations

import streamlit as st

from app.common import (
    backend_picker,
    current_user,
    metric_chips,
    model_picker,
    persona_picker,
    require,
    safe_markdown,
    service,
    store,
    version_picker,
    write_markdown_stream,
)
from callbot_core.conversations.transcripts import get_conversation
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.personas.catalog import persona_catalog

CID = "chat_conversation_id"
RETRY = "chat_retry_text"
SUMMARIES = "chat_summaries"

user = current_user()
require("chat")
svc = service()

st.title("Chat")


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
        st.session_state.pop(RETRY, None)
        st.session_state.pop(SUMMARIES, None)

cid = st.session_state.get(CID)
if cid is None:
    st.info("Choose a persona and press **New conversation** to begin.")
    st.stop()

try:
    detail = get_conversation(store(), cid)
except CallbotError as exc:
    st.session_state.pop(CID, None)
    st.error(str(exc))
    st.stop()

row = detail.row
st.caption(f"Conversation {row.id} · {row.persona_key}@{row.persona_version} · {row.backend} · {row.model}")

for message in detail.messages:
    with st.chat_message("user" if message.role == "user" else "assistant"):
        st.markdown(safe_markdown(message.text))
        if message.error:
            st.caption(f":red-badge[failed] {safe_markdown(message.error)}")
        elif message.ttft_ms is not None:
            st.markdown(
                metric_chips(message.ttft_ms, message.tokens_per_s, message.completion_tokens, message.total_ms)
            )


def _run_turn(text: str) -> None:
    with st.chat_message("user"):
        st.markdown(safe_markdown(text))
    try:
        turn = svc.send(cid, text, actor=user)
    except InvalidInput as exc:
        st.warning(f"Not sent: {exc}")
        return
    except CallbotError as exc:
        st.error(str(exc))
        return
    with st.chat_message("assistant"):
        try:
            # `with`: a reply cut short (a new message, Stop, a closed tab stop this script) is stored as
            # interrupted at once, with the caller's message kept.
            with turn:
                write_markdown_stream(turn)
        except CallbotError as exc:
            st.session_state[RETRY] = text
            st.error(safe_markdown(f"The turn failed: {exc}"))
            return
        st.session_state.pop(RETRY, None)
        result = turn.result
        if result is not None:
            st.markdown(metric_chips(result.ttft_ms, result.tokens_per_s, result.completion_tokens, result.total_ms))


active = row.status == "active"
retry_text = st.session_state.get(RETRY)
if active and retry_text:
    st.warning("The last turn failed and was not answered.")
    if st.button("Retry the last message", key="chat_retry"):
        st.session_state.pop(RETRY, None)
        _run_turn(retry_text)

if active:
    prompt = st.chat_input("Say something to the bot", key="chat_input")
    if prompt:
        _run_turn(prompt)
    if st.button("End conversation", key="chat_end", help="End the call and write its summaries"):
        with st.spinner("Writing the summaries…"):
            try:
                summaries = svc.end(cid, actor=user)
            except CallbotError as exc:
                st.error(f"The conversation ended, but its summaries could not be written: {exc}")
            else:
                st.session_state[SUMMARIES] = (summaries.short, summaries.full)
        st.rerun()
else:
    short, full = st.session_state.get(SUMMARIES) or (row.summary_short, detail.summary_full)
    st.success("This conversation has ended.")
    st.subheader("Summary")
    st.markdown(safe_markdown(short or "No summary was written."))
    with st.expander("Full summary", expanded=True):
        st.markdown(safe_markdown(full or "No summary was written."))
