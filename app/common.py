"""What every page shares: the engine objects, the signed-in user, and safe rendering.

Only this module and the page scripts import Streamlit; everything they do goes through callbot_core.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import streamlit as st

from callbot_core.access.signin import UserInfo
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import CallbotError
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store

USER_KEY = "cb_user"


@st.cache_resource(show_spinner=False)
def _engine() -> tuple[Settings, Store, ConversationService]:
    settings = get_settings()
    store = open_store(settings)
    return settings, store, ConversationService(store, settings)


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
    try:
        ip = st.context.ip_address
    except Exception:  # no browser behind the session (tests, bare mode)
        return None
    return ip if isinstance(ip, str) else None


def current_user() -> UserInfo:
    """The signed-in user; a page reached without one stops here (the main script normally prevents it)."""
    user = st.session_state.get(USER_KEY)
    if not isinstance(user, UserInfo):
        st.error("Please sign in.")
        st.stop()
    return user


def require(allowed: bool, what: str) -> None:
    if not allowed:
        st.error(f"Your role may not {what}.")
        st.stop()


# User and model text goes to st.markdown / st.write_stream through `no_remote_images`. Streamlit renders
# Markdown without raw HTML unless `unsafe_allow_html=True`, which this app never passes: a `<script>` in
# a reply is shown as text (tests/test_browser.py checks it in chromium). Escaping HTML ourselves as well
# would show `&lt;` literally inside code blocks. Markdown images are the one thing left that makes a
# viewer's browser fetch a URL that someone else (or a model) wrote, so they are shown as links instead.

_CODE = re.compile(r"(```.*?(?:```|$)|`[^`\n]*`)", re.DOTALL)


def no_remote_images(text: str) -> str:
    """Markdown with `![alt](url)` turned into `!`+link, leaving code spans and blocks untouched."""
    parts = _CODE.split(text)
    return "".join(part if i % 2 else part.replace("![", "\\![") for i, part in enumerate(parts))


def no_remote_images_stream(pieces: Iterable[str]) -> Iterator[str]:
    """The same for a token stream: a `!` is held back until the next piece shows whether `[` follows."""
    held = ""
    for piece in pieces:
        text = held + piece
        held = ""
        if text.endswith("!"):
            text, held = text[:-1], "!"
        yield text.replace("![", "\\![")
    if held:
        yield held


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
