"""Live events over WebSocket: `WS /v1/conversations/{id}/events` streams one conversation's events as they happen.

What the events are and how they travel (in-process, or through Redis from any process) is the engine's
(`callbot_core/conversations/events.py`); this module authenticates the listener, subscribes it and forwards.

The credential is a token or an API key, as on every route (`Authorization: Bearer …` or `X-API-Key`), or the
`token` query parameter for browsers, which cannot set headers on a WebSocket. The actor must be allowed
"conversation.read". The socket is accepted first and then closed with a code the client can read (a refusal
before accepting is a bare HTTP 403 to a browser):

4401 no valid credential · 4403 not allowed to read conversations · 4404 no such conversation ·
1000 the conversation ended (after its "ended" event) · 1013 this listener fell too far behind (after an "overrun"
event) · 1011 live events unavailable, e.g. Redis unreachable or lost (after an "error" event) · 1001 the server
is shutting down.

The first message is {"type": "subscribed", "status": ...}: from then on every event is delivered, in order,
unless the listener falls behind. A `token` in the URL may end up in a proxy's logs (ours hides it from
uvicorn's): prefer a short-lived token from POST /v1/auth/token there over an API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re

from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect
from fastapi.concurrency import run_in_threadpool

from callbot_core.access.permissions import require
from callbot_core.api.auth import resolve_actor
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import ApiError
from callbot_core.conversations.events import (
    EventBus,
    EventsUnavailable,
    ListenerOverrun,
    LiveObserver,
    Subscription,
    conversation_status,
    event_bus,
    make_event,
)
from callbot_core.errors import NotFound, PermissionDenied

UNAUTHORIZED, FORBIDDEN, NOT_FOUND = 4401, 4403, 4404
ENDED, GOING_AWAY, UNAVAILABLE, TOO_SLOW = 1000, 1001, 1011, 1013
# A close frame's reason is at most 123 bytes; the full message goes in the event before it, where there is one.
MAX_REASON_BYTES = 123

router = APIRouter()
ID = re.compile(r"[0-9]{1,18}")


class HideQueryToken(logging.Filter):
    """uvicorn logs a WebSocket's path with its query string: a credential given as `?token=` stays out of logs."""

    PATTERN = re.compile(r"([?&]token=)[^&\s\"]*")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple) and any(isinstance(a, str) and "token=" in a for a in record.args):
            record.args = tuple(self.PATTERN.sub(r"\1[hidden]", a) if isinstance(a, str) else a for a in record.args)
        return True


def _reason(text: str) -> str:
    first = text.strip().splitlines()[0] if text.strip() else ""
    data = first.encode("utf-8")[:MAX_REASON_BYTES]
    return data.decode("utf-8", "ignore")


def _credential(websocket: WebSocket, token: str | None) -> str | None:
    """Like the HTTP routes' credential (Bearer or X-API-Key), or the `token` query parameter."""
    header = websocket.headers.get("authorization", "")
    scheme, _, value = header.partition(" ")
    if scheme.lower() == "bearer" and value.strip():
        return value.strip()
    return websocket.headers.get("x-api-key") or token or None


def _authorise(ctx: ApiContext, credential: str | None, conversation_id: str) -> int:
    """The conversation's id once the credential, the permission and the id are checked, in that order (so an
    anonymous caller learns nothing about ids); raises what the close codes say. Blocking: run it off the loop."""
    actor = resolve_actor(ctx, credential)
    require(actor, "conversation.read")
    if not ID.fullmatch(conversation_id):
        raise NotFound(f"Unknown conversation id {conversation_id[:40]!r}: ids are whole numbers")
    cid = int(conversation_id)
    conversation_status(ctx.store, cid)
    return cid


@router.websocket("/v1/conversations/{conversation_id}/events")
async def conversation_events(websocket: WebSocket, conversation_id: str, token: str | None = None) -> None:
    ctx: ApiContext = websocket.app.state.ctx
    bus: EventBus = ctx.parts["events"]
    await websocket.accept()
    with contextlib.suppress(WebSocketDisconnect):  # the listener left: nothing more to tell it
        try:
            cid = await run_in_threadpool(_authorise, ctx, _credential(websocket, token), conversation_id)
        except ApiError as exc:
            await websocket.close(UNAUTHORIZED, _reason(exc.message))
            return
        except PermissionDenied as exc:
            await websocket.close(FORBIDDEN, _reason(str(exc)))
            return
        except NotFound as exc:
            await websocket.close(NOT_FOUND, _reason(str(exc)))
            return
        await _listen(websocket, bus, ctx, cid)


async def _listen(websocket: WebSocket, bus: EventBus, ctx: ApiContext, cid: int) -> None:
    try:
        subscription = await bus.subscribe(cid)
    except EventsUnavailable as exc:
        await websocket.send_json(make_event("error", cid, code="events_unavailable", message=str(exc)))
        await websocket.close(UNAVAILABLE, _reason(str(exc)))
        return
    async with subscription:
        # Read again once subscribed: an end between the check above and now is then either seen here or heard.
        try:
            status = await run_in_threadpool(conversation_status, ctx.store, cid)
        except NotFound as exc:  # deleted in between
            await websocket.close(NOT_FOUND, _reason(str(exc)))
            return
        await websocket.send_json(make_event("subscribed", cid, status=status))
        if status != "active":
            await websocket.send_json(make_event("ended", cid))
            await websocket.close(ENDED, "conversation ended")
            return
        await _stream(websocket, subscription, cid)


async def _stream(websocket: WebSocket, subscription: Subscription, conversation_id: int) -> None:
    """Forward events until the conversation ends, the listener leaves, falls behind, or the bus fails."""

    async def forward() -> tuple[int, str]:
        while True:
            try:
                event = await subscription.get()
            except ListenerOverrun as exc:
                await websocket.send_json(make_event("overrun", conversation_id, message=str(exc)))
                return TOO_SLOW, "listener fell too far behind"
            except EventsUnavailable as exc:
                await _send_quietly(
                    websocket, make_event("error", conversation_id, code="events_unavailable", message=str(exc))
                )
                return (GOING_AWAY if exc.going_away else UNAVAILABLE), _reason(str(exc))
            await websocket.send_json(event)
            if event.get("type") == "ended":
                return ENDED, "conversation ended"

    async def listener_gone() -> None:
        # Nothing is expected from the listener; reading is how its leaving is noticed while no event comes.
        while (await websocket.receive())["type"] != "websocket.disconnect":
            pass

    sender = asyncio.create_task(forward())
    watcher = asyncio.create_task(listener_gone())
    try:
        done, _ = await asyncio.wait({sender, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (sender, watcher):
            task.cancel()
        with contextlib.suppress(BaseException):
            await asyncio.gather(sender, watcher, return_exceptions=True)
    if sender in done and sender.exception() is None:
        code, reason = sender.result()
        with contextlib.suppress(WebSocketDisconnect, RuntimeError):  # the listener left at the same moment
            await websocket.close(code, reason)


async def _send_quietly(websocket: WebSocket, event: dict[str, object]) -> None:
    with contextlib.suppress(WebSocketDisconnect, RuntimeError):
        await websocket.send_json(event)


def setup(app: FastAPI, ctx: ApiContext) -> None:
    """Publish the service's conversations on the bus `settings.redis_url` chooses, and serve its listeners."""
    bus = event_bus(ctx.settings)
    observer = LiveObserver(bus)
    ctx.service.observers.append(observer)
    ctx.parts["events"] = bus

    def close() -> None:
        if observer in ctx.service.observers:  # a service outliving this app (tests) stops publishing here
            ctx.service.observers.remove(observer)
        bus.close()

    ctx.parts.setdefault("on_close", []).append(close)
    app.include_router(router)
    uvicorn_log = logging.getLogger("uvicorn.error")  # the logger uvicorn's WebSocket protocols write to
    if not any(isinstance(f, HideQueryToken) for f in uvicorn_log.filters):
        uvicorn_log.addFilter(HideQueryToken())
