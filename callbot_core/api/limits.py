"""Rate limits on the API's sign-in, key-making and chat routes (`access/limits.py` counts; this decides what).

A plain ASGI middleware that matches a request's method and path against `ROUTES` before routing, so it covers a
route whatever module defines it, and counts requests that are then refused (a wrong password, a bad body) too:
those cost us as much. Over the limit it answers 429 `rate_limited`, naming the limit and its setting, with
`Retry-After` in seconds.

Who is counted: the client's address (through trusted proxies only, as sign-in throttling reads it), and the
credential: an API key by its digest, a token by the user it was signed for (its signature is checked here; the
store is not read, so a revoked token still counts against its user, and its request is refused by auth after).
A request without a credential counts only against its address.
"""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import jwt
from fastapi import FastAPI
from fastapi.concurrency import run_in_threadpool

from callbot_core.access import apikeys, tokens
from callbot_core.access.clients import client_address
from callbot_core.access.limits import RateLimits
from callbot_core.access.sessions import token_digest
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import error_response

Scope = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[MutableMapping[str, Any]]]
Send = Callable[[MutableMapping[str, Any]], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

# (method, path pattern, group). Patterns, not routes: the chat routes may be defined anywhere, or later.
ROUTES: list[tuple[str, re.Pattern[str], str]] = [
    ("POST", re.compile(r"/v1/auth/token"), "signin"),
    ("POST", re.compile(r"/v1/apikeys"), "keys"),
    ("POST", re.compile(r"/v1/conversations/[^/]+/turns(/[^/]+)?"), "chat"),
    ("POST", re.compile(r"/v1/chat/completions"), "chat"),
]

# Enough of a digest to tell credentials apart in a counter's name, not enough to be worth stealing.
DIGEST_CHARS = 24


def group_of(method: str, path: str) -> str | None:
    for route_method, pattern, group in ROUTES:
        if method == route_method and pattern.fullmatch(path):
            return group
    return None


def _headers(scope: Scope) -> dict[bytes, str]:
    return {key.lower(): value.decode("latin-1") for key, value in scope.get("headers", ())}


def key_identity(headers: dict[bytes, str], secret: str) -> str | None:
    """Whose budget a request spends: `key:<digest>` for an API key, `user:<name>` for a token we signed, the
    digest of anything else (it will be refused as unauthorised, but it still came in), None without one."""
    credential = headers.get(b"x-api-key")
    if not credential:
        scheme, _, value = headers.get(b"authorization", "").partition(" ")
        credential = value.strip() if scheme.lower() == "bearer" else ""
    if not credential:
        return None
    digest = token_digest(credential)[:DIGEST_CHARS]
    if apikeys.looks_like_key(credential):
        return f"key:{digest}"
    try:
        claims = jwt.decode(credential, secret, algorithms=[tokens.ALGORITHM], audience=tokens.AUDIENCE)
    except jwt.PyJWTError:
        return f"credential:{digest}"
    subject = claims.get("sub")
    return f"user:{subject}" if isinstance(subject, str) and subject else f"credential:{digest}"


class RateLimitMiddleware:
    """Counts each request of a limited group (`ROUTES`) and answers 429 over the limit. The limits are read from
    `ctx.parts["rate_limits"]` per request, so a test or a plugin may replace them."""

    def __init__(self, app: ASGIApp, *, ctx: ApiContext) -> None:
        self.app = app
        self.ctx = ctx

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        limits: RateLimits | None = self.ctx.parts.get("rate_limits")
        group = group_of(scope["method"], scope["path"]) if scope["type"] == "http" else None
        if limits is None or group is None:
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        peer = scope["client"][0] if scope.get("client") else None
        client = client_address(peer, headers.get(b"x-forwarded-for"), self.ctx.settings.trusted_proxies)
        key = key_identity(headers, self.ctx.secret)
        if limits.limiter.blocking:
            refusal = await run_in_threadpool(limits.check, group, client=client, key=key)
        else:
            refusal = limits.check(group, client=client, key=key)
        if refusal is None:
            await self.app(scope, receive, send)
            return
        response = error_response(429, "rate_limited", refusal.message, {"Retry-After": str(refusal.retry_after_s)})
        await response(scope, receive, send)


def setup(app: FastAPI, ctx: ApiContext) -> None:
    """Limit the API's sign-in, key-making and chat routes as configured (`CALLBOT_RATE_LIMIT_*`)."""
    limits = RateLimits.from_settings(ctx.settings)
    ctx.parts["rate_limits"] = limits
    close = getattr(limits.limiter, "close", None)
    if close is not None:
        ctx.parts.setdefault("on_close", []).append(close)
    app.add_middleware(RateLimitMiddleware, ctx=ctx)
