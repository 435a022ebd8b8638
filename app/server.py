"""The browser app as Streamlit serves it (`callbot app` runs this file): the pages of `streamlit_app.py` behind
HTTP security headers, with script errors logged under an id instead of shown as tracebacks.

`st.App` is Streamlit's own server with room for ASGI middleware; `streamlit run` finds the `app` below and serves
it with uvicorn, XSRF protection and every other server option as before.
"""

from __future__ import annotations

import sys
from pathlib import Path

# `streamlit run` puts this folder on sys.path, not the project root that `app.failures` needs.
_ROOT = str(Path(__file__).resolve().parents[1])
if _ROOT not in sys.path:
    sys.path.insert(0, _ROOT)

import streamlit as st  # noqa: E402
from starlette.middleware import Middleware  # noqa: E402
from starlette.types import ASGIApp, Message, Receive, Scope, Send  # noqa: E402

from app.failures import show_failure  # noqa: E402

# What the app can promise about itself. Scripts are not restricted (Streamlit's front end needs inline styles and
# its own bundles; a script-src policy would need a nonce Streamlit does not support): user text is kept from
# becoming markup instead (app/rendering.py), and reports are shown in an opaque-origin sandbox (pages/reports).
SECURITY_HEADERS: dict[str, str] = {
    # Only this app may frame its pages (clickjacking); Streamlit's own components are same-origin frames.
    "Content-Security-Policy": "frame-ancestors 'self'; object-src 'none'; base-uri 'self'; form-action 'self'",
    "X-Frame-Options": "SAMEORIGIN",
    "X-Content-Type-Options": "nosniff",
    # Links a model writes into a reply must not carry the app's URLs (conversation ids) to other sites.
    "Referrer-Policy": "same-origin",
    "Cross-Origin-Opener-Policy": "same-origin",
    # Voice calls will need the microphone from this origin only; nothing else is ever asked for.
    "Permissions-Policy": "camera=(), geolocation=(), payment=(), usb=(), microphone=(self)",
}


class SecurityHeaders:
    """Adds `SECURITY_HEADERS` to every HTTP response that does not set its own (WebSockets pass untouched)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in SECURITY_HEADERS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                headers.extend((name, value) for name, value in self._headers if name not in present)
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def _on_script_error(exc: Exception) -> bool:
    # An error outside a page (the sign-in, the menu) or in a widget callback: logged with an id, shown as one line.
    show_failure(exc)
    return True


app = st.App(
    Path(__file__).with_name("streamlit_app.py"),
    middleware=[Middleware(SecurityHeaders)],
    on_script_error=_on_script_error,
)
