"""Conversations: filter, search (snippets with the match highlighted), open one from its row, grouped by date,
export what is listed in one click, delete (admins)."""

from __future__ import annotations

import io
from collections.abc import Callable
from datetime import UTC, datetime, time, timedelta
from itertools import groupby

import pandas as pd
import streamlit as st

from app.common import (
    FAILED,
    allowed,
    client_addr,
    current_user,
    filter_picker,
    fmt_ms,
    metric_chips,
    run_action,
    safe_markdown,
    settings,
    show_citations,
    store,
)
from app.rendering import highlight, plain_markdown
from callbot_core.access.signin import list_users
from callbot_core.conversations.transcripts import (
    MessageRow,
    delete_conversation,
    export_conversations,
    get_conversation,
    list_conversations,
    search,
)
from callbot_core.errors import CallbotError
from callbot_core.personas.catalog import persona_catalog

PAGE_SIZE = 100
OPEN = "conv_open_id"
SNIPPETS_SHOWN = 20
CLICKED = "conv_clicked_row"
# How often "Follow live" re-reads an open conversation: a turn shows within this of being stored.
FOLLOW_EVERY_S = 2

user = current_user()
st.title("Conversations")

catalog = persona_catalog(store())
usernames = [u.username for u in list_users(store())]

with st.container(border=True):
    f1, f2, f3, f4 = st.columns([2, 2, 3, 2])
    persona = filter_picker("Persona", [p.key for p in catalog], key="conv_persona", where=f1)
    who = filter_picker("User", usernames, key="conv_user", where=f2)
    today = datetime.now(UTC).date()
    dates = f3.date_input(
        "Started between", (today - timedelta(days=30), today), max_value=today, key="conv_dates", format="YYYY-MM-DD"
    )
    status = filter_picker("Status", ["active", "ended"], key="conv_status", where=f4)
    q1, q2 = st.columns([4, 1], vertical_alignment="bottom")
    query = q1.text_input("Search messages and summaries", key="conv_search", placeholder="a word from the call")
    by_meaning = q2.toggle(
        "By meaning", key="conv_semantic", help="Find messages that mean the same, in other words (the embedder)"
    )

since = until = None
if isinstance(dates, tuple | list) and len(dates) == 2:
    since = datetime.combine(dates[0], time.min, tzinfo=UTC)
    until = datetime.combine(dates[1], time.min, tzinfo=UTC) + timedelta(days=1)

ids = None
hits = []
meaning_hits = []
if query.strip() and by_meaning:
    from callbot_core.knowledge.index import KnowledgeBase
    from callbot_core.knowledge.semantic import semantic_search

    try:
        with st.spinner("Searching by meaning…"):
            meaning_hits = semantic_search(KnowledgeBase(store(), settings()), query, actor=user, limit=SNIPPETS_SHOWN)
    except CallbotError as exc:
        st.warning(str(exc))
    ids = sorted({h.conversation_id for h in meaning_hits})
elif query.strip():
    try:
        hits = search(store(), query, limit=500)
    except CallbotError as exc:
        st.warning(str(exc))
    ids = sorted({h.conversation_id for h in hits})

page = st.session_state.get("conv_page", 0)
rows = list_conversations(
    store(),
    persona=persona,
    username=who,
    status=status,
    since=since,
    until=until,
    ids=ids,
    limit=PAGE_SIZE + 1,
    offset=page * PAGE_SIZE,
)
has_more = len(rows) > PAGE_SIZE
rows = rows[:PAGE_SIZE]

MISSING = "–"  # what an empty cell shows: "None" reads as if something were called None

if query.strip() and by_meaning:
    st.caption(
        f"{len(meaning_hits)} message(s) closest in meaning to “{plain_markdown(query.strip())}”"
        " (similarity 0-1, higher is closer)"
    )
    with st.expander("What was said", expanded=True):
        for hit in meaning_hits:
            st.markdown(
                f"**#{hit.conversation_id}** · {hit.role} · similarity {hit.similarity:.2f} · "
                + plain_markdown(hit.text[:300])
            )
elif query.strip():
    st.caption(f"{len(hits)} match(es) for “{plain_markdown(query.strip())}” in {len(ids or [])} conversation(s)")
    with st.expander("Where it was said", expanded=True):
        for hit in hits[:SNIPPETS_SHOWN]:
            where = "summary" if hit.source == "summary" else (hit.role or "message")
            st.markdown(f"**#{hit.conversation_id}** · {where} · {highlight(hit.snippet, query.strip())}")
        if len(hits) > SNIPPETS_SHOWN:
            st.caption(f"… and {len(hits) - SNIPPETS_SHOWN} more; narrow the search or the filters.")

if not rows:
    st.info("No conversations match these filters.")
else:
    table = pd.DataFrame(
        [
            {
                "id": r.id,
                "started": r.started_at.strftime("%Y-%m-%d %H:%M"),
                "persona": f"{r.persona_key}@{r.persona_version}",
                "user": r.username or "(cli)",
                "backend": r.backend or MISSING,
                "model": r.model or MISSING,
                "status": r.status,
                "turns": r.turns,
                "failed": r.failed_turns,
                "mean TTFT ms": MISSING if r.mean_ttft_ms is None else f"{r.mean_ttft_ms:,.0f}",
                "summary": r.summary_short or MISSING,
            }
            for r in rows
        ]
    )
    # Clicking a row opens that conversation below (the picker further down does the same by keyboard).
    picked = st.dataframe(
        table, hide_index=True, width="stretch", key="conv_table", on_select="rerun", selection_mode="single-row"
    )
    selected = picked.selection.rows if picked is not None else []
    clicked = rows[selected[0]].id if selected and selected[0] < len(rows) else None
    # Only a new click opens: the selection stays on every rerun, and the picker below may have chosen since.
    if clicked is not None and clicked != st.session_state.get(CLICKED):
        # The picker follows (it is drawn later in this run, so its state may still be set).
        st.session_state[OPEN] = st.session_state["conv_open_select"] = clicked
    st.session_state[CLICKED] = clicked

    nav1, nav2, nav3 = st.columns([1, 1, 6])
    if nav1.button("◀ Newer", disabled=page == 0, key="conv_prev"):
        st.session_state["conv_page"] = page - 1
        st.rerun()
    if nav2.button("Older ▶", disabled=not has_more, key="conv_next"):
        st.session_state["conv_page"] = page + 1
        st.rerun()
    nav3.caption(f"Page {page + 1} · showing {len(rows)} conversation(s)")

    # -- export: one click; the file is made when the button is pressed, not on every rerun ------------
    listed = [r.id for r in rows]

    def _export(fmt: str) -> Callable[[], bytes]:
        def make() -> bytes:
            buffer = io.StringIO()
            export_conversations(store(), fmt, buffer, ids=listed)
            return buffer.getvalue().encode("utf-8")

        return make

    e1, e2, _ = st.columns([1, 1, 4])
    for column, fmt in ((e1, "csv"), (e2, "jsonl")):
        column.download_button(
            f"Export {len(listed)} as {fmt.upper()}",
            data=_export(fmt),
            file_name=f"conversations.{fmt}",
            mime="text/csv" if fmt == "csv" else "application/jsonl",
            key=f"conv_export_{fmt}",
            on_click="ignore",
        )

    # -- one conversation -------------------------------------------------------------------------
    labels = {r.id: f"#{r.id} · {r.persona_key}@{r.persona_version} · {r.started_at:%Y-%m-%d %H:%M}" for r in rows}
    current = st.session_state.get(OPEN)
    chosen = st.selectbox(
        "Open a conversation",
        list(labels),
        index=list(labels).index(current) if current in labels else None,
        format_func=labels.get,
        placeholder="Choose a conversation",
        key="conv_open_select",
    )
    if chosen is not None:
        st.session_state[OPEN] = chosen


def show_messages(messages: list[MessageRow]) -> None:
    for day, same_day in groupby(messages, key=lambda m: m.created_at.date()):
        st.markdown(f"##### {day:%A %d %B %Y}")
        for m in same_day:
            with st.chat_message("user" if m.role == "user" else "assistant"):
                st.markdown(safe_markdown(m.text))
                meta = f"{m.created_at:%H:%M:%S}"
                if m.error:
                    st.caption(f"{meta} · :red-badge[failed] {safe_markdown(m.error)}")
                elif m.ttft_ms is not None:
                    st.markdown(f"{meta} " + metric_chips(m.ttft_ms, m.tokens_per_s, m.completion_tokens, m.total_ms))
                else:
                    st.caption(meta)
                if m.low_relevance is not None:
                    show_citations(m.citations, m.low_relevance, m.retrieve_ms)


@st.fragment(run_every=FOLLOW_EVERY_S)
def follow_live(conversation_id: int) -> None:
    """The conversation re-read from the store on a timer: only this part of the page reruns. Turns from any
    process (the API, a phone stack, another tab) show once stored; the page reruns whole when the call ends."""
    try:
        now = get_conversation(store(), conversation_id)
    except CallbotError as exc:  # deleted meanwhile
        st.error(str(exc))
        return
    show_messages(now.messages)
    if now.row.status != "active":
        st.rerun()  # the whole page: the toggle goes and the summary shows
    st.caption(f":green-badge[live] {now.row.turns} turn(s) · checked {datetime.now(UTC):%H:%M:%S} UTC")


open_id = st.session_state.get(OPEN)
if open_id is not None and rows and open_id in {r.id for r in rows}:
    try:
        detail = get_conversation(store(), open_id)
    except CallbotError as exc:
        st.session_state.pop(OPEN, None)
        st.error(str(exc))
        st.stop()
    r = detail.row
    st.divider()
    st.subheader(f"Conversation {r.id}")
    st.caption(
        f"{r.persona_key}@{r.persona_version} · {r.backend} · {r.model} · {r.channel} · {r.status} · "
        f"{r.turns} turn(s), {r.failed_turns} failed · mean TTFT {fmt_ms(r.mean_ttft_ms)}"
    )
    if r.summary_short or detail.summary_full:
        with st.container(border=True):
            st.markdown("**Summary**")
            st.markdown(safe_markdown(r.summary_short or ""))
            if detail.summary_full:
                with st.expander("Full summary"):
                    st.markdown(safe_markdown(detail.summary_full))
    following = r.status == "active" and st.toggle(
        "Follow live",
        key=f"conv_follow_{r.id}",
        help=f"Show new turns as they are stored (every {FOLLOW_EVERY_S} s), wherever they are sent from",
    )
    if following:
        follow_live(r.id)
    else:
        show_messages(detail.messages)

    if allowed("conversation.delete"):
        with st.expander("Delete this conversation"):
            confirm = st.checkbox(f"Yes, delete conversation {r.id} and all its messages", key="conv_delete_ok")
            if st.button("Delete", type="primary", disabled=not confirm, key="conv_delete"):
                done = run_action(delete_conversation, store(), r.id, actor=user, client_addr=client_addr())
                if done is not FAILED:
                    st.session_state.pop(OPEN, None)
                    st.toast(f"Conversation {r.id} deleted")
                    st.rerun()
