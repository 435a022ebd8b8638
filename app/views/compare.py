"""Compare: send the same caller turns to 2-4 persona versions or parameter variants, side by side, and vote.

Replies stream into their columns: one column after another when the variants share a serial backend (the
embedded model answers one request at a time, so each TTFT stays the variant's own), all at once otherwise. A
blind comparison's columns are shuffled when it starts and named only A, B, … until you vote on a turn.
"""

from __future__ import annotations

import threading

import streamlit as st
from streamlit.delta_generator import DeltaGenerator

from app.common import (
    FAILED,
    backend_picker,
    current_user,
    metric_chips,
    model_picker,
    persona_picker,
    require,
    run_action,
    safe_markdown,
    service,
    store,
    version_picker,
    wait_for_stored,
)
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.experiments.comparisons import (
    MAX_VARIANTS,
    MIN_VARIANTS,
    ComparisonDetail,
    ComparisonRun,
    Variant,
    VariantInfo,
    VariantReply,
    end_comparison,
    get_comparison,
    list_comparisons,
    running_order,
    start_comparison,
    stream_turn,
    vote,
)
from callbot_core.personas.catalog import persona_catalog
from callbot_core.personas.fields import TEMPERATURE

CMP = "compare_comparison_id"
NOTICE = "compare_notice"
# Set once the run streaming a turn has stored every variant's end. A click while replies stream makes Streamlit
# start the next run at once, in a new thread, while the streaming one is still storing its turns as interrupted
# (Chat's docstring tells the same story): the next run waits for this before it reads the comparison, or it draws
# a variant's turn as never sent.
LIVE = "compare_live_turn"

user = current_user()
require("compare")
svc = service()

st.title("Compare")


def _setup() -> None:
    """The form that starts a comparison: variants, backend and model, blind mode."""
    catalog = persona_catalog(store())
    if not catalog:
        st.warning("No personas yet: run `callbot db upgrade` to seed the defaults.")
        st.stop()
    with st.container(border=True):
        count = st.number_input(
            "Variants", min_value=MIN_VARIANTS, max_value=MAX_VARIANTS, value=MIN_VARIANTS, step=1, key="compare_count"
        )
        variants: list[Variant] = []
        for i, column in enumerate(st.columns(int(count))):
            with column:
                # Numbers, not letters: a blind comparison shuffles its columns, so "Variant A" there need not be
                # the first one set up here.
                st.markdown(f"**Variant {i + 1}**")
                choice = persona_picker(catalog, key=f"compare_persona_{i}")
                version = version_picker(choice.versions, key=f"compare_version_{i}_{choice.key}")
                temperature = st.number_input(
                    "Temperature",
                    min_value=TEMPERATURE.low,
                    max_value=TEMPERATURE.high,
                    value=None,
                    step=0.1,
                    placeholder="the version's own",
                    key=f"compare_temperature_{i}",
                    help="Leave empty to use the temperature saved in the persona version",
                )
            params = {"temperature": round(float(temperature), 2)} if temperature is not None else None
            variants.append(Variant(f"{choice.key}@{version}", params))
        c1, c2, c3 = st.columns([2, 3, 3])
        backend = backend_picker(key="compare_backend", where=c1)
        model = model_picker(backend, key=f"compare_model_{backend}", where=c2)
        title = c3.text_input("Title (optional)", key="compare_title", max_chars=200)
        blind = st.toggle(
            "Blind",
            key="compare_blind",
            help="Shuffle the columns and name them only A, B, … until you have voted on a turn",
        )
        if st.button("Start comparison", type="primary", disabled=model is None, key="compare_start"):
            try:
                info = start_comparison(
                    svc, variants, actor=user, title=title, blind=blind, backend=backend, model=model
                )
            except CallbotError as exc:
                st.error(str(exc))
            else:
                st.session_state[CMP] = info.id
                st.rerun()

    earlier = list_comparisons(store(), 30, created_by=user.id)
    if earlier:
        with st.expander("Open an earlier comparison"):
            picked = st.selectbox(
                "Comparison",
                earlier,
                format_func=lambda r: (
                    f"#{r.id} {r.title or 'untitled'} · {r.variants} variants · {r.votes} votes"
                    + (" · blind" if r.blind else "")
                ),
                key="compare_earlier",
            )
            if st.button("Open", key="compare_open") and picked is not None:
                st.session_state[CMP] = picked.id
                st.rerun()


def _header(detail: ComparisonDetail, variant: VariantInfo, revealed: bool) -> str:
    """A column's title: only its label while blind and not yet voted on, so the vote rests on the text."""
    header = f"Variant {variant.label}"
    if revealed:
        header += f" · {variant.describe()}"
        if detail.blind:
            header += f" · set up as variant {variant.setup_position + 1}"
    return header


def _names(variants: list[VariantInfo]) -> str:
    labels = [f"Variant {v.label}" for v in variants]
    return labels[0] if len(labels) == 1 else ", ".join(labels[:-1]) + " and " + labels[-1]


def _running_note(groups: list[list[VariantInfo]]) -> str:
    """How a turn runs the variants, and so whether their latencies compare as they are."""
    serial = [g for g in groups if len(g) > 1]
    if not serial:
        return ":green-badge[at the same time] Every variant gets each turn at the same time."
    group = serial[0]
    backend = group[0].backend
    note = (
        f":orange-badge[one after another] {_names(group)} run one after another, in column order: {backend} "
        "answers one request at a time, so no TTFT includes a wait for another variant"
    )
    rest = [v for g in groups if g is not group for v in g]
    note += f"; {_names(rest)} at the same time." if rest else "."
    # Seen here on the embedded model, one persona in both columns: 2.3 s TTFT for the first, 0.13 s for the second.
    return note + " A later column may find the prompt they share already evaluated, which shortens its TTFT."


def _reply_metrics(reply: VariantReply) -> None:
    if reply.error:
        st.caption(f":red-badge[failed] {safe_markdown(reply.error)}")
        return
    chips = metric_chips(reply.ttft_ms, reply.tokens_per_s, reply.completion_tokens, reply.total_ms)
    st.markdown(f"{chips} :gray-badge[{reply.words} words]")


def _show(detail: ComparisonDetail) -> None:
    """Every turn: the caller's text, then one column per variant with its reply, metrics and vote button."""
    for turn in detail.turns:
        with st.chat_message("user"):
            st.markdown(safe_markdown(turn.user_text))
        revealed = detail.reveal(turn.index, user.id)
        chosen = detail.vote_of(turn.index, user.id)
        for variant, reply, column in zip(detail.variants, turn.replies, st.columns(len(detail.variants)), strict=True):
            with column, st.container(border=True):
                st.markdown(
                    f"**{safe_markdown(_header(detail, variant, revealed))}**"
                    + (" :violet-badge[preferred]" if chosen == variant.id else "")
                )
                if reply is None:
                    st.caption("No reply: this turn was not sent to this variant.")
                    continue
                if not reply.error:
                    st.markdown(safe_markdown(reply.text))
                _reply_metrics(reply)
                if not reply.error and st.button(
                    f"Prefer {variant.label}",
                    key=f"compare_vote_{detail.id}_{turn.index}_{variant.id}",
                    disabled=chosen == variant.id,
                ):
                    try:
                        vote(store(), detail.id, turn.index, variant.id, actor=user)
                    except CallbotError as exc:
                        st.session_state[NOTICE] = str(exc)
                    st.rerun()


def _status(run: ComparisonRun, done: set[int]) -> str:
    """The status line of a turn in progress: which variants run, how, and which have answered."""
    waiting = [v for v in run.variants if v.id not in done]
    if run.serial:
        order = ", then ".join(f"Variant {v.label}" for v in run.variants)
        now = f"Variant {waiting[0].label} is answering…" if waiting else "Every variant has answered."
        return f"Asking {order}, one after another: {now}"
    asked = f"Asking {_names(run.variants)} at the same time"
    return f"{asked}: " + (f"waiting for {_names(waiting)}…" if waiting else "every variant has answered.")


def _stream(detail: ComparisonDetail, text: str) -> None:
    """Send one caller turn to every variant and show the replies as they stream, each in its column."""
    # Shown before anything runs: preparing the turns may load the model first.
    with st.chat_message("user"):
        st.markdown(safe_markdown(text))
    status = st.empty()
    status.caption(f"Sending the turn to {_names(detail.variants)}…")
    try:
        run = stream_turn(svc, detail.id, text, actor=user)
    except InvalidInput as exc:
        status.empty()
        st.warning(safe_markdown(f"Not sent: {exc}"))
        return
    except CallbotError as exc:
        status.empty()
        st.error(safe_markdown(str(exc)))
        return
    stored = st.session_state[LIVE] = threading.Event()
    try:
        _stream_replies(detail, run, status)
    finally:
        stored.set()  # no session state here: a run Streamlit has stopped may not touch it
    st.rerun()  # the stored turn, with its vote buttons


def _stream_replies(detail: ComparisonDetail, run: ComparisonRun, status: DeltaGenerator) -> None:
    # `with`: a turn cut short (a new message, Stop, a closed tab stop this script) stores every variant's turn
    # as interrupted at once, with the caller's message kept.
    with run:
        done: set[int] = set()
        status.caption(_status(run, done))
        slots = {}
        for variant, column in zip(run.variants, st.columns(len(run.variants)), strict=True):
            with column, st.container(border=True):
                st.markdown(f"**{safe_markdown(_header(detail, variant, not detail.blind))}**")
                text_slot, metrics_slot = st.empty(), st.empty()
                later = run.serial and variant.id != run.variants[0].id
                text_slot.caption("Waiting for its turn…" if later else "Waiting for the first words…")
                slots[variant.id] = (text_slot, metrics_slot)
        texts = {v.id: "" for v in run.variants}
        for event in run:
            text_slot, metrics_slot = slots[event.variant_id]
            if event.reply is None:
                # Made safe as a whole after each piece, as Chat does (app.common.write_markdown_stream).
                texts[event.variant_id] += event.piece
                text_slot.markdown(safe_markdown(texts[event.variant_id]))
                continue
            done.add(event.variant_id)
            if event.reply.error:
                text_slot.empty()
            with metrics_slot.container():
                _reply_metrics(event.reply)
            status.caption(_status(run, done))


def _settle() -> None:
    """Wait for the turn this session was streaming to be stored, so the page reads the store after it."""
    stored = st.session_state.get(LIVE)
    if stored is None:
        return
    if wait_for_stored(stored, "Stopping the replies…"):  # else still stalled: settled by a later run
        st.session_state.pop(LIVE, None)


cid = st.session_state.get(CMP)
if cid is None:
    st.info("Choose 2–4 persona versions or temperatures and press **Start comparison**.")
    _setup()
    st.stop()

_settle()
try:
    detail = get_comparison(store(), cid)
except CallbotError as exc:
    st.session_state.pop(CMP, None)
    st.error(str(exc))
    st.stop()

top = st.columns([6, 1])
top[0].caption(
    f"Comparison {detail.id}"
    + (f" · {safe_markdown(detail.title)}" if detail.title else "")
    + f" · {len(detail.variants)} variants"
    + (" · blind" if detail.blind else "")
)
top[0].caption(safe_markdown(_running_note(running_order(svc, detail.variants))))
if detail.blind:
    top[0].caption(
        "Blind: the columns were shuffled when the comparison started. A column shows its persona and parameters "
        "once you have voted on that turn."
    )
# The one being left ends now: its conversations (turns or none) must not stay active for ever.
if top[1].button("New comparison", key="compare_new") and (
    run_action(end_comparison, store(), detail.id, actor=user) is not FAILED
):
    st.session_state.pop(CMP, None)
    st.rerun()

notice = st.session_state.pop(NOTICE, None)
if notice:
    st.error(safe_markdown(notice))

# Pinned to the bottom wherever it is called; asked first so the hint below goes once a turn is on its way.
prompt = st.chat_input("Say the same thing to every variant", key="compare_input")
_show(detail)
if not detail.turns and not prompt:
    st.info("Type a caller turn below: every variant gets the same text.")
if prompt:
    _stream(detail, prompt)
