"""Live events of a conversation, for listeners that follow it as it happens (the API's WebSocket).

`LiveObserver` turns a turn's observer events into small JSON-ready dicts (`turn_started`, one `token` per piece,
`turn_stored` with the turn's metrics, `turn_failed`) and the service's end of a conversation into `ended`; each
carries `type`, `conversation_id`, `turn_id` (the caller's message id, once the turn has started) and `timestamp`.

Two buses, chosen by `settings.redis_url` (`event_bus`):
- in-process (`LocalBus`, the default): a turn run by this process reaches listeners in this process;
- Redis pub/sub (`RedisBus`), one channel per conversation (`{redis_key_prefix}:conversation:{id}`): a turn sent by
  any process or replica sharing that Redis reaches listeners in every one of them.

What must never happen is a listener, or Redis, slowing or failing a turn. So publishing only appends to bounded
queues and returns: each listener has its own (`Subscription`), and one that falls `max_queued` events behind is
cut off (`ListenerOverrun`: it gets what was queued, then is told) instead of holding memory or the turn; the Redis
bus publishes from a thread of its own, which logs Redis being down and drops events meanwhile. A listener whose
Redis connection fails is told so (`EventsUnavailable`).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Protocol

from callbot_core.conversations.observers import TurnObserver
from callbot_core.conversations.turn import conversation_row
from callbot_core.errors import CallbotError

if TYPE_CHECKING:
    from callbot_core.conversations.timing import StageTiming
    from callbot_core.conversations.turn import TurnContext
    from callbot_core.settings import Settings
    from callbot_core.store import Store

log = logging.getLogger(__name__)

Event = dict[str, Any]

# Published for a conversation; a listener's own stream adds "subscribed", "overrun" and "error" (api/events.py).
EVENT_TYPES = ("turn_started", "token", "turn_stored", "turn_failed", "ended")
# A reply of a thousand tokens fits whole in a listener's queue; one further behind than that is not keeping up.
MAX_QUEUED = 1000
# Events waiting for Redis: a few seconds of every turn of a busy process; beyond that Redis is not keeping up.
MAX_PENDING_PUBLISH = 10_000
# After a failed publish, events are dropped (not retried one by one against a dead server) for this long.
REDIS_RETRY_S = 1.0
REDIS_CONNECT_TIMEOUT_S = 2.0
# One reconnection (Redis restarted, a pooled connection it closed), then a clear failure: redis-py's default of
# ten retries with backoff would keep a listener, or the events, waiting for seconds on a server that is gone.
REDIS_RETRIES = 1


class ListenerOverrun(CallbotError):
    """The listener fell too far behind: events after its queue filled were dropped, and it is cut off."""


class EventsUnavailable(CallbotError):
    """Live events cannot be delivered: the bus (Redis) is unreachable, or the server is shutting down
    (`going_away`)."""

    def __init__(self, message: str, *, going_away: bool = False) -> None:
        super().__init__(message)
        self.going_away = going_away


def now_iso() -> str:
    return datetime.now(UTC).isoformat()


def make_event(kind: str, conversation_id: int, turn_id: int | None = None, **fields: Any) -> Event:
    return {"type": kind, "conversation_id": conversation_id, "turn_id": turn_id, "timestamp": now_iso(), **fields}


def conversation_status(store: Store, conversation_id: int) -> str:
    """The conversation's status ("active" or "ended"); `NotFound` for an unknown id.

    Takes no actor: callers check the actor may read conversations first."""
    with store.session() as session:
        return conversation_row(session, conversation_id).status


# -- one listener ----------------------------------------------------------------------------------------------


class Subscription:
    """One listener's bounded queue of one conversation's events: fed from any thread (`offer`), read in the event
    loop that subscribed (`get`). Made by a bus's `subscribe`; close it (`async with`, or `aclose`)."""

    def __init__(
        self,
        conversation_id: int,
        loop: asyncio.AbstractEventLoop,
        max_queued: int,
        on_close: Callable[[Subscription], None] | None = None,
    ) -> None:
        self.conversation_id = conversation_id
        self.max_queued = max_queued
        self._loop = loop
        self._on_close = on_close
        self._lock = threading.Lock()
        self._items: deque[Event] = deque()
        self._ready = asyncio.Event()
        self._overrun = False
        self._dropped = 0
        self._failure: str | None = None
        self._going_away = False
        self._closed = False

    def offer(self, event: Event) -> None:
        """Queue an event; never blocks. A full queue cuts the listener off: it gets what was queued, then is told."""
        with self._lock:
            if self._closed or self._failure is not None:
                return
            if self._overrun or len(self._items) >= self.max_queued:
                self._overrun = True
                self._dropped += 1
                return
            # Wake the reader only when it may be waiting: one loop callback per burst, not one per token.
            wake = not self._items
            self._items.append(event)
        if wake:
            self._wake()

    def fail(self, reason: str, *, going_away: bool = False) -> None:
        """The bus cannot deliver any more (Redis went away, the server stops): `get` raises once the queue is read."""
        with self._lock:
            if self._failure is None:
                self._failure = reason
                self._going_away = going_away
        self._wake()

    def _wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the listener's loop is closed: nobody is waiting any more
            self._loop.call_soon_threadsafe(self._ready.set)

    async def get(self) -> Event:
        """The next event; raises `ListenerOverrun` or `EventsUnavailable` once the events queued before are read."""
        while True:
            with self._lock:
                if self._items:
                    return self._items.popleft()
                if self._overrun:
                    raise ListenerOverrun(
                        f"This listener fell {self.max_queued} events behind; {self._dropped} event(s) after that"
                        " were dropped. Re-read the conversation and reconnect"
                    )
                if self._failure is not None:
                    raise EventsUnavailable(self._failure, going_away=self._going_away)
                # Cleared under the lock: an event offered after this sees an empty queue and wakes us.
                self._ready.clear()
            await self._ready.wait()

    def queued(self) -> int:
        with self._lock:
            return len(self._items)

    async def aclose(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._items.clear()
        if self._on_close is not None:
            self._on_close(self)

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()


# -- the buses -------------------------------------------------------------------------------------------------


class EventBus(Protocol):
    max_queued: int

    def wants(self, conversation_id: int) -> bool:
        """Whether an event of this conversation could reach anyone: False lets a turn skip building it."""

    def publish(self, conversation_id: int, event: Event) -> None:
        """Hand an event to every listener of the conversation, wherever they are; never blocks, never raises."""

    async def subscribe(self, conversation_id: int) -> Subscription:
        """Listen to a conversation from now on (from inside the event loop that will read it)."""

    def close(self) -> None:
        """Stop: listeners are told the server is going away; events not yet sent out are sent (briefly) or dropped."""


class LocalBus:
    """Events stay in this process: a publisher's thread hands them to each listener's queue directly."""

    def __init__(self, *, max_queued: int = MAX_QUEUED) -> None:
        self.max_queued = max_queued
        self._lock = threading.Lock()
        self._listeners: dict[int, set[Subscription]] = {}

    def wants(self, conversation_id: int) -> bool:
        return conversation_id in self._listeners  # a dict lookup: no lock needed for a hint

    def publish(self, conversation_id: int, event: Event) -> None:
        with self._lock:
            listeners = tuple(self._listeners.get(conversation_id, ()))
        for subscription in listeners:
            subscription.offer(event)

    async def subscribe(self, conversation_id: int) -> Subscription:
        subscription = Subscription(conversation_id, asyncio.get_running_loop(), self.max_queued, self._forget)
        with self._lock:
            self._listeners.setdefault(conversation_id, set()).add(subscription)
        return subscription

    def _forget(self, subscription: Subscription) -> None:
        with self._lock:
            listeners = self._listeners.get(subscription.conversation_id)
            if listeners is not None:
                listeners.discard(subscription)
                if not listeners:
                    del self._listeners[subscription.conversation_id]

    def listeners(self, conversation_id: int) -> int:
        with self._lock:
            return len(self._listeners.get(conversation_id, ()))

    def close(self) -> None:
        with self._lock:
            everyone = [s for listeners in self._listeners.values() for s in listeners]
        for subscription in everyone:
            subscription.fail("The server is shutting down", going_away=True)


_STOP = object()


class RedisBus:
    """Events go through Redis pub/sub, one channel per conversation, so every process sharing the Redis sees them.

    Publishing appends to a bounded queue that one thread sends out (in order, pipelined): a turn never waits on
    Redis, and Redis down costs the events, logged, never the turn. Each listener has a Redis connection of its
    own in its event loop, reading into its `Subscription`; losing it fails the subscription.
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "callbot",
        max_queued: int = MAX_QUEUED,
        max_pending: int = MAX_PENDING_PUBLISH,
    ) -> None:
        import redis
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self.url = url
        self.prefix = prefix
        self.max_queued = max_queued
        self._client = redis.Redis.from_url(
            url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            socket_timeout=REDIS_CONNECT_TIMEOUT_S,
            retry=Retry(NoBackoff(), REDIS_RETRIES),
        )
        self._pending: queue.Queue[object] = queue.Queue(maxsize=max_pending)
        self._thread: threading.Thread | None = None
        self._thread_lock = threading.Lock()
        self._closed = False
        self._failing = False  # Redis refused the last publish: logged once, until it answers again
        self._dropped = 0
        self._listeners: set[Subscription] = set()
        self._errors = (redis.RedisError, OSError)

    def channel(self, conversation_id: int) -> str:
        return f"{self.prefix}:conversation:{conversation_id}"

    @property
    def where(self) -> str:
        """The Redis address without credentials, for messages."""
        return self.url.split("@")[-1].split("://")[-1]

    # -- publishing (any thread) ------------------------------------------------------------------------------

    def wants(self, conversation_id: int) -> bool:
        return not self._closed  # listeners may be in any process: only Redis knows

    def publish(self, conversation_id: int, event: Event) -> None:
        if self._closed:
            return
        self._start_sender()
        try:
            self._pending.put_nowait((self.channel(conversation_id), json.dumps(event)))
        except queue.Full:
            self._count_dropped(1, "Redis is not keeping up: live events are dropped")

    def _start_sender(self) -> None:
        if self._thread is not None:
            return
        with self._thread_lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._send_loop, name="callbot-events-redis", daemon=True)
                self._thread.start()

    def _send_loop(self) -> None:
        retry_at = 0.0
        while True:
            first = self._pending.get()
            if first is _STOP:
                return
            batch = [first]
            while len(batch) < 500:
                try:
                    item = self._pending.get_nowait()
                except queue.Empty:
                    break
                if item is _STOP:
                    self._send(batch, retry_at)
                    return
                batch.append(item)
            retry_at = self._send(batch, retry_at)

    def _send(self, batch: list[object], retry_at: float) -> float:
        """Publish a batch in one round trip; returns until when to drop events instead (Redis just failed)."""
        if time.monotonic() < retry_at:  # Redis failed a moment ago: do not make every token wait on it again
            self._count_dropped(len(batch), None)
            return retry_at
        try:
            pipe = self._client.pipeline(transaction=False)
            for channel, data in batch:  # type: ignore[misc]
                pipe.publish(channel, data)
            pipe.execute()
        except self._errors as exc:
            if not self._failing:
                self._failing = True
                log.warning(
                    "Live events are not published: Redis at %s: %s (turns go on; events are dropped until it answers)",
                    self.where,
                    str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                )
            self._dropped += len(batch)
            return time.monotonic() + REDIS_RETRY_S
        if self._failing:
            self._failing = False
            log.warning("Redis at %s answers again: live events are published (%d dropped)", self.where, self._dropped)
            self._dropped = 0
        return 0.0

    def _count_dropped(self, count: int, why: str | None) -> None:
        self._dropped += count
        if why is not None and not self._failing:
            self._failing = True
            log.warning("%s (Redis at %s)", why, self.where)

    # -- listening (inside an event loop) ---------------------------------------------------------------------

    async def subscribe(self, conversation_id: int) -> Subscription:
        import redis
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        if self._closed:
            raise EventsUnavailable("The server is shutting down", going_away=True)
        client = aioredis.Redis.from_url(
            self.url,
            socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
            # A listener waits on its connection for as long as the call lasts: keepalive notices a vanished host.
            socket_keepalive=True,
            retry=Retry(NoBackoff(), REDIS_RETRIES),
        )
        pubsub = client.pubsub()
        channel = self.channel(conversation_id)
        reader: asyncio.Task[None] | None = None

        def closed(subscription: Subscription) -> None:
            self._listeners.discard(subscription)
            if reader is not None:
                reader.cancel()

        subscription = Subscription(conversation_id, asyncio.get_running_loop(), self.max_queued, closed)
        try:
            await pubsub.subscribe(channel)
            # Subscribed only once Redis confirms: an event published after `subscribe` returns then reaches us.
            confirmed = await pubsub.get_message(timeout=REDIS_CONNECT_TIMEOUT_S)
            if not confirmed or confirmed.get("type") != "subscribe":
                raise EventsUnavailable(f"Redis at {self.where} did not confirm the subscription")
        except (redis.RedisError, OSError) as exc:
            await _close_quietly(pubsub, client)
            raise EventsUnavailable(f"Live events are unavailable: Redis at {self.where} is unreachable") from exc
        except BaseException:
            await _close_quietly(pubsub, client)
            raise
        reader = asyncio.create_task(self._read(pubsub, client, subscription))
        self._listeners.add(subscription)
        return subscription

    async def _read(self, pubsub: Any, client: Any, subscription: Subscription) -> None:
        import redis

        try:
            async for message in pubsub.listen():
                if message.get("type") != "message":
                    continue
                try:
                    event = json.loads(message["data"])
                except (TypeError, ValueError):
                    log.warning("Ignored a message that is not JSON on %s", message.get("channel"))
                    continue
                subscription.offer(event)
            subscription.fail(f"Live events stopped: the subscription to Redis at {self.where} ended")
        except asyncio.CancelledError:
            pass
        except (redis.RedisError, OSError) as exc:
            log.warning("A live-events listener lost Redis at %s: %s", self.where, str(exc).splitlines()[0])
            subscription.fail(f"Live events stopped: the connection to Redis at {self.where} was lost")
        finally:
            await _close_quietly(pubsub, client)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for subscription in list(self._listeners):
            subscription.fail("The server is shutting down", going_away=True)
        if self._thread is not None:
            with contextlib.suppress(queue.Full):  # the sender is stuck: it is a daemon, left to die with us
                self._pending.put(_STOP, timeout=1.0)
            self._thread.join(timeout=5.0)
        self._client.close()


async def _close_quietly(pubsub: Any, client: Any) -> None:
    for closing in (pubsub, client):
        with contextlib.suppress(Exception):  # the connection is already gone: nothing left to release
            await closing.aclose()


def event_bus(settings: Settings) -> EventBus:
    """Redis pub/sub when `redis_url` is set (every process sharing it sees each other's events), else in-process."""
    if settings.redis_url:
        return RedisBus(settings.redis_url, prefix=settings.redis_key_prefix)
    return LocalBus()


# -- publishing a conversation's events -------------------------------------------------------------------------

_STARTED = "live.started"
_TOKENS = "live.tokens"


class LiveObserver(TurnObserver):
    """Publishes a conversation's events on a bus: turns as they run, and its end (`conversation_ended`).

    Only turns that started are published (their caller's message is stored): a refused turn stored nothing, and
    says so to its caller alone. The per-turn state lives in `turn.notes`, as observers are shared by turns in
    several threads at once.
    """

    def __init__(self, bus: EventBus) -> None:
        self.bus = bus

    def _wanted(self, turn: TurnContext) -> bool:
        return self.bus.wants(turn.conversation_id)

    def _publish(self, event: Event) -> None:
        try:
            self.bus.publish(event["conversation_id"], event)
        except Exception:  # a bus must not raise, but if one does the turn still goes on
            log.exception("Publishing a live event failed")

    def stage_started(self, turn: TurnContext, stage: StageTiming) -> None:
        # The observers' `turn_started` comes before validation, when the turn may still be refused and has no id;
        # the first stage after the caller's message is stored (generate) is when it has really started.
        if turn.user_message_id is None or turn.notes.get(_STARTED):
            return
        turn.notes[_STARTED] = True
        turn.notes[_TOKENS] = 0
        if not self._wanted(turn):
            return
        self._publish(
            make_event(
                "turn_started",
                turn.conversation_id,
                turn.user_message_id,
                text=turn.user_text,
                backend=turn.backend.name if turn.backend is not None else "",
                model=turn.model,
            )
        )

    def token(self, turn: TurnContext, stage: StageTiming, text: str) -> None:
        if not turn.notes.get(_STARTED):
            return
        index = turn.notes[_TOKENS]
        turn.notes[_TOKENS] = index + 1
        if not self._wanted(turn):  # nobody listens: no event built for every token of every turn
            return
        self._publish(make_event("token", turn.conversation_id, turn.user_message_id, text=text, index=index))

    def turn_finished(self, turn: TurnContext) -> None:
        result = turn.result
        if not turn.notes.get(_STARTED) or result is None or not self._wanted(turn):
            return
        self._publish(
            make_event(
                "turn_stored",
                turn.conversation_id,
                turn.user_message_id,
                assistant_message_id=result.assistant_message_id,
                text=result.text,
                backend=turn.backend.name if turn.backend is not None else "",
                model=turn.model,
                ttft_ms=result.ttft_ms,
                total_ms=result.total_ms,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
                tokens_per_s=result.tokens_per_s,
                trimmed_messages=result.trimmed_messages,
                cached=result.cached,
                stages={t.name: t.ms for t in turn.timings},
            )
        )

    def turn_failed(self, turn: TurnContext, error: str) -> None:
        if not turn.notes.get(_STARTED) or not self._wanted(turn):
            return
        self._publish(
            make_event(
                "turn_failed",
                turn.conversation_id,
                turn.user_message_id,
                error=error,
                # False when someone else stored the end (the conversation ended meanwhile) or storing it failed.
                stored=turn.result is not None,
                ttft_ms=turn.ttft_ms,
                total_ms=turn.total_ms,
            )
        )

    def conversation_ended(self, conversation_id: int) -> None:
        if self.bus.wants(conversation_id):
            self._publish(make_event("ended", conversation_id))


def live_observers(settings: Settings) -> list[TurnObserver]:
    """What a process that runs turns but serves no listeners adds to its service (the Streamlit app, a script):
    with Redis configured, a publisher, so listeners in the API see its turns; without, nothing (no one could
    listen in-process)."""
    if not settings.redis_url:
        return []
    return [LiveObserver(event_bus(settings))]
