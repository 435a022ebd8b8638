"""Prometheus metrics and access logs of the API: `/metrics`, the HTTP latency histogram, one log line per request.

`/metrics` needs a credential allowed "metrics.read" (any role; an API key needs the `read` scope): a key for
the scraper is made with `callbot apikey create --user NAME --name prometheus --scope read`, and Prometheus sends
it as `authorization: {credentials: <key>}`. It serves prometheus_client's default registry: the turn metrics
every front end shares (`callbot_core.conversations.metrics`), this module's HTTP latency, the process's own.

`RequestTelemetry` times every HTTP request by route template (`/v1/conversations/{id}`, never the raw path:
label values must stay few), binds its request id to the log context (`callbot_core.conversations.logs`) and logs
one access line: method, route, status, duration_ms, api_key_id, username.
"""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.concurrency import run_in_threadpool
from prometheus_client import REGISTRY, Histogram
from prometheus_client.exposition import choose_encoder
from structlog.contextvars import bound_contextvars

from callbot_core.access.permissions import require
from callbot_core.api.auth import CurrentActor
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import ERROR_RESPONSES
from callbot_core.api.middleware import ASGIApp, Message, Receive, Scope, Send
from callbot_core.conversations.logs import TurnLogObserver
from callbot_core.conversations.metrics import PrometheusObserver, watch_store

access_log = logging.getLogger("callbot.access")

HTTP_SECONDS = Histogram(
    "callbot_http_request_duration_seconds",
    "HTTP requests to the API, by route template, method and status: until the response's last byte (a stream's "
    "whole length)",
    ("route", "method", "status"),
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0),
)
METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
UNMATCHED = "unmatched"  # no route matched (a 404, or a 413 refused before routing): raw paths would be unbounded

router = APIRouter(tags=["metrics"])


@router.get(
    "/metrics",
    response_class=Response,
    responses={
        **ERROR_RESPONSES,
        200: {
            "description": "The Prometheus text format (OpenMetrics when the Accept header asks for it)",
            "content": {
                "text/plain": {"schema": {"type": "string"}},
                "application/openmetrics-text": {"schema": {"type": "string"}},
            },
        },
    },  # fmt: skip
)
async def metrics(request: Request, actor: CurrentActor) -> Response:
    """Every metric of this process, for Prometheus. Needs a token, or an API key with the `read` scope."""
    require(actor, "metrics.read")
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    # Collecting runs a query (active conversations): off the event loop.
    body = await run_in_threadpool(encoder, REGISTRY)
    return Response(body, headers={"content-type": content_type})


def _route(scope: Scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None)
    return path if isinstance(path, str) else UNMATCHED


class RequestTelemetry:
    """Times each HTTP request, labels it by route template, logs one access line; binds the request id (set by
    `RequestLimits`, which wraps this) to the log context of everything the request runs, WebSockets included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        state: dict[str, Any] = scope.setdefault("state", {})
        with bound_contextvars(request_id=state.get("request_id")):
            if scope["type"] == "websocket":
                await self.app(scope, receive, send)
                return
            await self._http(scope, receive, send, state)

    async def _http(self, scope: Scope, receive: Receive, send: Send, state: dict[str, Any]) -> None:
        started = time.perf_counter()
        status = 500  # unless a response starts: an exception escaping the app becomes a 500 outside us

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            seconds = time.perf_counter() - started
            route, method = _route(scope), scope.get("method", "")
            HTTP_SECONDS.labels(route, method if method in METHODS else "other", str(status)).observe(seconds)
            actor = state.get("actor")
            access_log.info(
                "request",
                extra={
                    "method": method,
                    "route": route,
                    "path": scope.get("path", ""),  # without the query string: a search's words are content
                    "status": status,
                    "duration_ms": round(seconds * 1000, 2),
                    "api_key_id": state.get("api_key_id"),
                    "username": getattr(actor, "username", None),
                },
            )


def setup(app: FastAPI, ctx: ApiContext) -> None:
    """`/metrics`, the turn observers on the API's service, the active-conversation count over its store, and the
    request telemetry middleware."""
    if not any(isinstance(o, PrometheusObserver) for o in ctx.service.observers):  # one service, several apps
        ctx.service.observers.append(PrometheusObserver())
    if not any(isinstance(o, TurnLogObserver) for o in ctx.service.observers):
        # Right after the store observer (it has no events): it binds the turn's ids to the log context, so the
        # other observers' lines of each event carry them.
        ctx.service.observers.insert(1, TurnLogObserver(log_content=ctx.settings.log_content))
    ctx.parts.setdefault("on_close", []).append(watch_store(ctx.store))
    app.include_router(router)
    app.add_middleware(RequestTelemetry)
