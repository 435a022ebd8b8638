"""Compare: send the same caller turns to 2-4 persona versions or parameter variants, side by side, and vote."""

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
)
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.experiments.comparisons import (
    MAX_VARIANTS,
    MIN_VARIANTS,
    ComparisonDetail,
    Variant,
    get_comparison,
    list_comparisons,
    send_turn,
    start_comparison,
    vote,
)
from callbot_core.personas.catalog import persona_catalog
from callbot_core.personas.fields import TEMPERATURE

CMP = "compare_comparison_id"
NOTICE = "compare_notice"

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
            label = chr(ord("A") + i)
            with column:
                st.markdown(f"**Variant {label}**")
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
            "Blind", key="compare_blind", help="Hide which variant is which until you have voted on a turn"
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


def _show(detail: ComparisonDetail) -> None:
    """Every turn: the caller's text, then one column per variant with its reply, metrics and vote button."""
    for turn in detail.turns:
        with st.chat_message("user"):
            st.markdown(safe_markdown(turn.user_text))
        revealed = detail.reveal(turn.index, user.id)
        chosen = detail.vote_of(turn.index, user.id)
        for variant, reply, column in zip(detail.variants, turn.replies, st.columns(len(detail.variants)), strict=True):
            with column, st.container(border=True):
                # Blind: only the label until this user has voted on this turn, so the vote rests on the text.
                header = f"Variant {variant.label}"
                if revealed:
                    header += f" · {variant.describe()}"
                st.markdown(
                    f"**{safe_markdown(header)}**" + (" :violet-badge[preferred]" if chosen == variant.id else "")
                )
                if reply is None:
                    st.caption("No reply: this turn was not sent to this variant.")
                    continue
                if reply.error:
                    st.caption(f":red-badge[failed] {safe_markdown(reply.error)}")
                else:
                    st.markdown(safe_markdown(reply.text))
                    chips = metric_chips(reply.ttft_ms, reply.tokens_per_s, reply.completion_tokens, reply.total_ms)
                    st.markdown(f"{chips} :gray-badge[{reply.words} words]")
                    if st.button(
                        f"Prefer {variant.label}",
                        key=f"compare_vote_{detail.id}_{turn.index}_{variant.id}",
                        disabled=chosen == variant.id,
                    ):
                        try:
                            vote(store(), detail.id, turn.index, variant.id, actor=user)
                        except CallbotError as exc:
                            st.session_state[NOTICE] = str(exc)
                        st.rerun()


cid = st.session_state.get(CMP)
if cid is None:
    st.info("Choose 2–4 persona versions or temperatures and press **Start comparison**.")
    _setup()
    st.stop()

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
if top[1].button("New comparison", key="compare_new"):
    st.session_state.pop(CMP, None)
    st.rerun()

notice = st.session_state.pop(NOTICE, None)
if notice:
    st.error(safe_markdown(notice))

_show(detail)
if not detail.turns:
    st.info("Type a caller turn below: every variant gets the same text at once.")

prompt = st.chat_input("Say the same thing to every variant", key="compare_input")
if prompt:
    with st.spinner("Waiting for every variant…"):
        try:
            send_turn(svc, detail.id, prompt, actor=user)
        except InvalidInput as exc:
            st.warning(f"Not sent: {exc}")
            st.stop()
        except CallbotError as exc:
            st.error(str(exc))
            st.stop()
    st.rerun()
