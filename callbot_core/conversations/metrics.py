"""Prometheus metrics of turns, the same for every front end: one registry per process (prometheus_client's
default `REGISTRY`, which also carries the process's own CPU, memory and file metrics).

`PrometheusObserver` turns a turn's events into numbers: time to first token, the whole turn's time and each
stage's time (histograms), tokens generated, turns by outcome and failures by kind (counters), all labelled by
backend, model and persona. Active conversations are counted from the store when scraped
(`ActiveConversations`). The API serves the registry at `/metrics`; the Streamlit app on
127.0.0.1:`CALLBOT_METRICS_PORT` (`serve_metrics`).

Label values must stay few, or Prometheus drowns: backends and stages come from code, models and persona keys
from the store, error kinds from our error classes; every value is clipped to `MAX_LABEL_CHARS`.
"""

from __future__ import annotations

import logging
import re
import sys
import threading
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import REGISTRY, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import func, select
from sqlalchemy.exc import SQLAlchemyError

from callbot_core.conversations.observers import TurnObserver
from callbot_core.errors import CallbotError
from callbot_core.store.models import CHANNELS, Conversation

if TYPE_CHECKING:
    from callbot_core.conversations.timing import StageTiming
    from callbot_core.conversations.turn import TurnContext
    from callbot_core.store import Store

log = logging.getLogger(__name__)

MAX_LABEL_CHARS = 64
UNKNOWN = "unknown"  # a turn refused before validate found its conversation has no backend, model or persona yet
TURN_LABELS = ("backend", "model", "persona")

# Seconds. TTFT and stages run from milliseconds (a cached reply, validate) to a cold model's tens of seconds;
# a whole turn up to the minutes a long reply on a slow backend takes.
FAST_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 0.75, 1.0, 1.5, 2.5, 5.0, 10.0, 30.0, 60.0)
TURN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)

TTFT = Histogram(
    "callbot_turn_ttft_seconds",
    "Time to first token: from the start of generation to the first piece of the reply",
    TURN_LABELS,
    buckets=FAST_BUCKETS,
)
TURN_SECONDS = Histogram(
    "callbot_turn_duration_seconds",
    "A successful turn from its first stage's start to its last stage's end (validate to persist)",
    TURN_LABELS,
    buckets=TURN_BUCKETS,
)
STAGE_SECONDS = Histogram(
    "callbot_turn_stage_seconds",
    "Time of each stage of a turn that ended without error (validate, prompt, generate, persist, ...)",
    ("stage", *TURN_LABELS),
    buckets=FAST_BUCKETS,
)
TOKENS = Counter(
    "callbot_tokens_generated",
    "Tokens the backends generated: the backend's count when it gives one, else the pieces streamed",
    TURN_LABELS,
)
TURNS = Counter("callbot_turns", "Turns that ended, by outcome (ok or failed)", (*TURN_LABELS, "outcome"))
TURN_ERRORS = Counter(
    "callbot_turn_errors",
    "Turns refused or failed, by kind: the engine's error class in snake case (backend_unavailable, "
    "invalid_input, empty_reply...), interrupted, or unexpected",
    ("kind", *TURN_LABELS),
)


def clip(value: object) -> str:
    """A label value: text, at most `MAX_LABEL_CHARS`, `unknown` when empty."""
    text = str(value) if value is not None else ""
    return text[:MAX_LABEL_CHARS] or UNKNOWN


def turn_labels(turn: TurnContext) -> tuple[str, str, str]:
    """backend, model, persona key: known once validate has read the conversation."""
    backend = turn.backend.name if turn.backend is not None else ""
    version = turn.persona_version
    persona = version.persona.key if version is not None else ""
    return clip(backend), clip(turn.model), clip(persona)


def _snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def error_kind(turn: TurnContext, error: str | None = None) -> str:
    """What failed a turn, as a label value from a closed set: our error classes (`backend_timeout`,
    `invalid_input`, `empty_reply`...), `interrupted` (the reply was not read to the end), `unexpected`.

    Read from the exception: `turn_failed` is notified while it is being handled, or, once a failed turn's end is
    stored, with it in `turn.notes["failure"]` (turn.py).
    """
    exc = turn.notes.get("failure")
    if exc is None:
        exc = sys.exc_info()[1]
    if exc is None:
        return "interrupted" if (error or "").startswith("interrupted") else UNKNOWN
    if isinstance(exc, GeneratorExit | KeyboardInterrupt):
        return "interrupted"
    if isinstance(exc, CallbotError):
        return clip(_snake(type(exc).__name__))
    return "unexpected"


class PrometheusObserver(TurnObserver):
    """Updates the turn metrics above from a turn's events. Stateless: turns of every thread share it."""

    def stage_ended(self, turn: TurnContext, stage: StageTiming) -> None:
        if stage.error is None and stage.ms is not None:
            STAGE_SECONDS.labels(clip(stage.name), *turn_labels(turn)).observe(stage.ms / 1000)

    def turn_finished(self, turn: TurnContext) -> None:
        labels = turn_labels(turn)
        ttft = turn.ttft_ms
        if ttft is not None:
            TTFT.labels(*labels).observe(ttft / 1000)
        if turn.timings and turn.timings[-1].ended is not None:
            TURN_SECONDS.labels(*labels).observe(turn.timings[-1].ended - turn.timings[0].started)
        TOKENS.labels(*labels).inc(turn.completion_tokens)
        TURNS.labels(*labels, "ok").inc()

    def turn_failed(self, turn: TurnContext, error: str) -> None:
        labels = turn_labels(turn)
        # Tokens a failed turn streamed were generated all the same (the backend's work, the caller saw them).
        if turn.pieces:
            TOKENS.labels(*labels).inc(len(turn.pieces))
        TURNS.labels(*labels, "failed").inc()
        TURN_ERRORS.labels(error_kind(turn, error), *labels).inc()


class ActiveConversations(Collector):
    """`callbot_active_conversations{channel}`, counted in the store at scrape time.

    Counted rather than tracked: conversations start and end in every process that shares the store (the API's
    replicas, the app, `callbot chat`, a killed process reconciled later), so a gauge kept in one process would
    count only its own starts and miss the others' ends. One grouped count per scrape is cheap. Every process
    reports the same number: aggregate with `max`, not `sum`.
    """

    NAME = "callbot_active_conversations"
    HELP = "Conversations whose status is active in the store, by channel (the same in every process: use max)"

    def __init__(self) -> None:
        self._stores: list[Store] = []
        self._lock = threading.Lock()

    def watch(self, store: Store) -> Callable[[], None]:
        """Count in `store` from now on (the latest watched store wins); returns a function that stops it."""
        with self._lock:
            self._stores.append(store)

        def unwatch() -> None:
            with self._lock:
                if store in self._stores:
                    self._stores.remove(store)

        return unwatch

    def describe(self) -> list[Metric]:
        # Given so registering does not run `collect` (a query) at import time.
        return [GaugeMetricFamily(self.NAME, self.HELP, labels=["channel"])]

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            store = self._stores[-1] if self._stores else None
        if store is None:
            return
        query = (
            select(Conversation.channel, func.count())
            .where(Conversation.status == "active")
            .group_by(Conversation.channel)
        )
        try:
            with store.engine.connect() as conn:
                counts = {channel: n for channel, n in conn.execute(query)}
        except SQLAlchemyError as exc:  # a scrape must not fail because the store is down: leave the gauge out
            log.warning("Could not count active conversations: %s", str(exc).splitlines()[0])
            return
        gauge = GaugeMetricFamily(self.NAME, self.HELP, labels=["channel"])
        for channel in sorted({*CHANNELS, *counts}):
            gauge.add_metric([clip(channel)], counts.get(channel, 0))
        yield gauge


active_conversations = ActiveConversations()
REGISTRY.register(active_conversations)
watch_store = active_conversations.watch

_served: int | None = None
_serve_lock = threading.Lock()


def serve_metrics(port: int | None, store: Store | None = None, *, host: str = "127.0.0.1") -> bool:
    """Serve the registry over HTTP on `host:port` (loopback by default: this port asks for no credential), once
    per process: Streamlit reruns the code that calls this, and a second server on the port would fail. Counts
    `store`'s active conversations. True when this call started the server; False when `port` is None or the
    process serves its metrics already."""
    global _served
    if port is None:
        return False
    with _serve_lock:
        if _served is not None:
            if _served != port:
                log.warning("Metrics are served on port %s already; not on %s as well", _served, port)
            return False
        start_http_server(port, addr=host, registry=REGISTRY)
        _served = port
    if store is not None:
        watch_store(store)
    log.info("Prometheus metrics on http://%s:%s/metrics", host, port)
    return True
