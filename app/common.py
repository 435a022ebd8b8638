"""What every page shares: the engine objects, the signed-in user, running an action, the pickers, and safe
rendering.

Only this module and the page scripts import Streamlit; everything they do goes through callbot_core. Pages hide
what the user's role cannot use (`allowed`), but the engine checks every action again and refuses with
`PermissionDenied`; `run_action` shows that refusal, like any other engine error, as one line.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final, TypeVar

import streamlit as st

from app.rendering import safe_markdown, safe_markdown_stream
from callbot_core.access import permissions
from callbot_core.access.clients import client_address
from callbot_core.access.signin import UserInfo
from callbot_core.backends.llm import available_backends
from callbot_core.conversations.events import live_observers
from callbot_core.conversations.metrics import PrometheusObserver, serve_metrics
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import CallbotError, PermissionDenied
from callbot_core.personas.catalog import PersonaChoice
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store

USER_KEY = "cb_user"
# How long a run waits for the streaming run it replaced to store its turn (Chat, Compare).
STOP_WAIT_S = 15.0


@st.cache_resource(show_spinner=False)
def _engine() -> tuple[Settings, Store, ConversationService]:
    settings = get_settings()
    store = open_store(settings)
    # With Redis configured, the app's turns are published too: the API's WebSocket listeners see them.
    service = ConversationService(store, settings, observers=[*live_observers(settings), PrometheusObserver()])
    # The same metrics as the API's /metrics, on 127.0.0.1 only (no sign-in guards that port); once per process.
    serve_metrics(settings.metrics_port, store)
    return settings, store, service


def settings() -> Settings:
    return _engine()[0]


def store() -> Store:
    return _engine()[1]


def service() -> ConversationService:
    return _engine()[2]


@st.cache_data(ttl=30, show_spinner=False)
def backend_models(backend: str) -> tuple[list[str], str | None]:
    """A backend's models, or the reason it has none to offer (down, misconfigured); cached for 30 s so a
    rerun does not ask a remote server again."""
    try:
        return service().backend(backend).list_models(), None
    except CallbotError as exc:
        return [], str(exc)


def client_addr() -> str | None:
    """The browser's address, through trusted proxies (`callbot_core.access.clients`)."""
    try:
        ip = st.context.ip_address
        forwarded = st.context.headers.get("X-Forwarded-For")
    except Exception:  # no browser behind the session (tests, bare mode)
        return None
    return client_address(ip if isinstance(ip, str) else None, forwarded, settings().trusted_proxies)


def current_user() -> UserInfo:
    """The signed-in user; a page reached without one stops here (the main script normally prevents it)."""
    user = st.session_state.get(USER_KEY)
    if not isinstance(user, UserInfo):
        st.error("Please sign in.")
        st.stop()
    return user


def allowed(action: str) -> bool:
    """Whether the signed-in user may do `action`: what a page shows or hides (the engine checks it again)."""
    return permissions.allowed(current_user(), action)


def require(action: str) -> None:
    """Stop a page the signed-in user may not use (reached by a stale link) with the engine's one-line refusal."""
    try:
        permissions.require(current_user(), action)
    except PermissionDenied as exc:
        st.error(str(exc))
        st.stop()


T = TypeVar("T")


class Failed:
    """What `run_action` returns when the engine refused or failed; the reason is already on the page."""

    def __bool__(self) -> bool:
        return False

    def __repr__(self) -> str:
        return "FAILED"


FAILED: Final = Failed()


def run_action(fn: Callable[..., T], /, *args: Any, **kwargs: Any) -> T | Failed:
    """Call an engine function for a button or form: a refusal (`PermissionDenied`) or any other engine error is
    shown as one `st.error` line and `FAILED` is returned, so the page goes on drawing; anything else is a bug
    and propagates."""
    try:
        return fn(*args, **kwargs)
    except CallbotError as exc:
        st.error(str(exc))
        return FAILED


# -- pickers: the same persona, version, backend and model choosers on every page --------------------

DEFAULT_PERSONA = "receptionist"
ALL = "All"


def persona_picker(catalog: Sequence[PersonaChoice], *, key: str, where: Any = st) -> PersonaChoice:
    """A persona (shown as "Name (key)"), the receptionist first chosen; `where` is a column or `st`."""
    keys = [p.key for p in catalog]
    index = keys.index(DEFAULT_PERSONA) if DEFAULT_PERSONA in keys else 0
    return where.selectbox("Persona", catalog, index=index, format_func=lambda p: f"{p.name} ({p.key})", key=key)


def version_picker(versions: Sequence[int], *, key: str, where: Any = st, label: str = "Version") -> int:
    """One of a persona's version numbers, newest first. Key it by persona: a kept choice must not leak to another."""
    return where.selectbox(label, list(reversed(versions)), key=key)


def backend_picker(*, key: str, where: Any = st) -> str:
    """A registered LLM backend, the configured one first chosen."""
    backends = available_backends()
    configured = settings().llm_backend
    index = backends.index(configured) if configured in backends else 0
    return where.selectbox("Backend", backends, index=index, key=key)


def model_picker(backend: str, *, key: str, where: Any = st) -> str | None:
    """One of `backend`'s models (None when it offers none); why it offers none is shown under the pickers.

    Key it by backend: a model name kept from another backend would not be in this list.
    """
    models, error = backend_models(backend)
    model = where.selectbox("Model", models, key=key, disabled=not models)
    if error:
        st.error(safe_markdown(error))
    return model


def filter_picker(label: str, options: Sequence[str], *, key: str, where: Any = st) -> str | None:
    """A filter with "All" first: the chosen option, or None for all."""
    choice = where.selectbox(label, [ALL, *options], key=key)
    return None if choice == ALL else choice


# Text someone else wrote (callers, models, other users' personas and saved queries) is shown through
# `safe_markdown` (app/rendering.py says why and how); a streamed reply through `write_markdown_stream`.


def write_markdown_stream(pieces: Iterable[str], *, where: Any = st) -> str:
    """Show a token stream as it arrives, made safe as a whole after each piece; returns the text as shown.

    `st.write_stream` cannot be used: it appends pieces, while safety depends on the whole text so far.
    """
    placeholder = where.empty()
    text = ""
    for text in safe_markdown_stream(pieces):
        placeholder.markdown(text)
    return text


def fmt_ms(value: float | None) -> str:
    return "–" if value is None else f"{value:,.0f} ms"


def metric_chips(
    ttft_ms: float | None, tokens_per_s: float | None, tokens: int | None, total_ms: float | None = None
) -> str:
    """A row of badges (Streamlit markdown) for one turn's metrics."""
    chips = [f":blue-badge[TTFT {fmt_ms(ttft_ms)}]"]
    if tokens_per_s is not None:
        chips.append(f":green-badge[{tokens_per_s:,.0f} tok/s]")
    chips.append(f":gray-badge[{tokens or 0} tokens]")
    if total_ms is not None:
        chips.append(f":gray-badge[total {fmt_ms(total_ms)}]")
    return " ".join(chips)


@st.cache_resource(show_spinner=False)
def _analytics():  # type: ignore[no-untyped-def]
    from callbot_core.analytics import Analytics

    return Analytics.open(_engine()[0])


def analytics():  # type: ignore[no-untyped-def]
    """The process's analytics handle (DuckDB snapshot of the store; refreshed before each query)."""
    return _analytics()


def wait_for_stored(stored: threading.Event, what: str) -> bool:
    """Wait (up to `STOP_WAIT_S`, with a spinner saying `what`) for the streaming run this one replaced to store its
    turn; whether it has. A click while a reply streams makes Streamlit start the next run at once, in a new thread,
    while the streaming one is still storing its turn as interrupted: the page must read the store after that."""
    if not stored.is_set():
        with st.spinner(what):
            stored.wait(STOP_WAIT_S)
    return stored.is_set()


def show_citations(citations: Sequence[Any], low_relevance: bool | None, retrieve_ms: float | None = None) -> None:
    """Under a reply whose persona answers from documents: the passages it was given, numbered as it cites them
    ([1]), each with its source, page and similarity; their text on demand. File names and passages are the
    uploader's text: shown literally, never as Markdown or HTML."""
    from app.rendering import plain_markdown

    if low_relevance:
        st.caption(
            ":orange-badge[low relevance] The documents matched this question poorly: the reply may not come from them."
        )
    if not citations:
        return
    took = f" · retrieval {retrieve_ms:,.0f} ms" if retrieve_ms is not None else ""
    lines = [
        f"[{c.number}] {plain_markdown(c.label)}"
        + ("" if c.similarity is None else f" · similarity {c.similarity:.2f}")
        for c in citations
    ]
    st.caption(
        "  \n".join(lines) + took, help="Similarity: how close the passage is to the question, 0-1, higher is better"
    )
    with st.expander("Passages", icon=":material/format_quote:"):
        for c in citations:
            st.caption(
                f"[{c.number}] {plain_markdown(c.label)}" + (f" · {plain_markdown(c.heading)}" if c.heading else "")
            )
            st.text(c.text if c.text is not None else "(this passage's document was re-ingested or deleted since)")
