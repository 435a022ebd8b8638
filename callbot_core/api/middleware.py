"""ASGI middleware that every request passes: a request id, and a cap on the body's size.

Plain ASGI rather than Starlette's BaseHTTPMiddleware: that one buffers streaming responses (server-sent events
would arrive all at once) and runs each request in an extra task.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

REQUEST_ID_HEADER = "x-request-id"
# A client's own request id is kept when it looks like one (so a phone stack can follow its call through our logs).
_CLIENT_ID = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key.lower() == name:
            return value.decode("latin-1")
    return None


class _TooLarge(Exception):
    pass


async def _send_error(send: Send, status: int, code: str, message: str, request_id: str) -> None:
    body = json.dumps({"error": {"code": code, "message": message}}).encode()
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        (REQUEST_ID_HEADER.encode(), request_id.encode()),
    ]})  # fmt: skip
    await send({"type": "http.response.body", "body": body})


class RequestLimits:
    """Gives every request an id (`scope["state"]["request_id"]`, echoed in `X-Request-ID`) and refuses a body over
    `max_body_bytes` with 413 before a route reads it: by Content-Length when given, else as it streams in. Paths
    matching `upload_paths` (document uploads) get `max_upload_bytes` instead."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        max_upload_bytes: int | None = None,
        upload_paths: re.Pattern[str] | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_upload_bytes = max_upload_bytes or max_body_bytes
        self.upload_paths = upload_paths

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = _header(scope, REQUEST_ID_HEADER.encode())
        request_id = given if given and _CLIENT_ID.match(given) else uuid.uuid4().hex[:16]
        scope.setdefault("state", {})["request_id"] = request_id
        if scope["type"] == "websocket":
            await self.app(scope, receive, send)
            return

        limit, setting = self.max_body_bytes, "CALLBOT_API_MAX_BODY_BYTES"
        if self.upload_paths is not None and self.upload_paths.match(scope.get("path", "")):
            limit, setting = self.max_upload_bytes, "CALLBOT_API_MAX_UPLOAD_BYTES"
        too_large = f"The request body is larger than {limit:,} bytes ({setting})"
        length = _header(scope, b"content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            await _send_error(send, 413, "body_too_large", too_large, request_id)
            return

        seen = 0
        started = False
        exceeded = False

        async def counted_receive() -> Message:
            nonlocal seen, exceeded
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def send_with_id(message: Message) -> None:
            nonlocal started
            if exceeded:
                # The framework turned our exception into an error of its own (FastAPI answers 400 to any failure
                # while reading a body): answer what really happened instead, once.
                if not started:
                    started = True
                    await _send_error(send, 413, "body_too_large", too_large, request_id)
                return
            if message["type"] == "http.response.start":
                started = True
                message["headers"] = [*message.get("headers", []), (REQUEST_ID_HEADER.encode(), request_id.encode())]
            await send(message)

        try:
            await self.app(scope, counted_receive, send_with_id)
        except _TooLarge:
            if not started:
                started = True
                await _send_error(send, 413, "body_too_large", too_large, request_id)
