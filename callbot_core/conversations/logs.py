"""Structured logs: one JSON object per line, through structlog, for the engine's and the libraries' loggers alike.

The engine logs with the standard `logging` module (a process that never calls `configure_logging`, such as a
test or the Streamlit app, keeps Python's defaults); `configure_logging` renders every record as JSON with
structlog's `ProcessorFormatter`, adding the context bound with `structlog.contextvars`: the API binds
`request_id` for each request, `TurnLogObserver` binds `turn_id` and `conversation_id` for each turn. Fields
passed as `extra={...}` become keys of the line.

Message text stays out of the logs unless `CALLBOT_LOG_CONTENT=true`: the turn lines carry it only then, and any
key in `CONTENT_KEYS` that someone else logs is replaced by its length.
"""

from __future__ import annotations

import logging
import sys
import uuid
from typing import IO, TYPE_CHECKING, Any

import structlog
from structlog.contextvars import bind_contextvars, unbind_contextvars
from structlog.types import EventDict, Processor

from callbot_core.conversations.metrics import error_kind, turn_labels
from callbot_core.conversations.observers import TurnObserver

if TYPE_CHECKING:
    from callbot_core.conversations.timing import StageTiming
    from callbot_core.conversations.turn import TurnContext
    from callbot_core.settings import Settings

# Keys whose values are what people said or were told.
CONTENT_KEYS = frozenset({"text", "reply", "user_text", "reply_text", "content", "prompt", "system_prompt", "messages"})
TURN_KEYS = ("turn_id", "conversation_id", "user_message_id")

_log_content = False


def _hide_content(logger: object, method: str, event: EventDict) -> EventDict:
    if not _log_content:
        for key in CONTENT_KEYS.intersection(event):
            value = event[key]
            event[key] = f"<{len(value)} chars hidden>" if isinstance(value, str) else "<hidden>"
    return event


def _processors() -> list[Processor]:
    return [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _hide_content,
    ]


class _JsonHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Ours, so configuring again replaces it instead of adding a second one."""


def configure_logging(settings: Settings, *, level: int | str = logging.INFO, stream: IO[str] | None = None) -> None:
    """Send every log record of the process to `stream` (stderr) as one JSON line. Call it once, at start."""
    global _log_content
    _log_content = settings.log_content
    shared = _processors()
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Records from `logging` (ours, uvicorn's, SQLAlchemy's) get the same context and keys as structlog's own.
        foreign_pre_chain=[structlog.stdlib.ExtraAdder(), *shared],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(default=str),
        ],
    )
    handler = _JsonHandler(stream or sys.stderr)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _JsonHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    # uvicorn's loggers go through ours; its access log is off (the API writes its own, with route and user).
    for name in ("uvicorn", "uvicorn.error"):
        logging.getLogger(name).handlers.clear()
        logging.getLogger(name).propagate = True
    access = logging.getLogger("uvicorn.access")
    access.handlers.clear()
    access.propagate = False
    access.disabled = True


turn_log = logging.getLogger("callbot.turns")


class TurnLogObserver(TurnObserver):
    """Binds `turn_id` and `conversation_id` to the log context for the length of a turn, and logs one line when a
    turn ends (`turn.finished` / `turn.failed`) with its figures; the texts only when `log_content` is true.

    A turn's parts may run in different threads, each with its own copy of the request's context (the API reads a
    streamed reply piece by piece from a thread pool), so the ids are bound again as each stage starts and with
    each piece of the reply: a line logged in a fresh thread before its first piece comes goes without them.
    """

    def __init__(self, *, log_content: bool = False) -> None:
        self.log_content = log_content

    def _bind(self, turn: TurnContext) -> None:
        ids = {"turn_id": turn.notes["turn_id"], "conversation_id": turn.conversation_id}
        if turn.user_message_id is not None:
            ids["user_message_id"] = turn.user_message_id
        bind_contextvars(**ids)

    def turn_started(self, turn: TurnContext) -> None:
        turn.notes.setdefault("turn_id", uuid.uuid4().hex[:16])
        self._bind(turn)

    def stage_started(self, turn: TurnContext, stage: StageTiming) -> None:
        if "turn_id" in turn.notes:
            self._bind(turn)

    def token(self, turn: TurnContext, stage: StageTiming, text: str) -> None:
        if "turn_id" in turn.notes:
            self._bind(turn)

    def _fields(self, turn: TurnContext) -> dict[str, Any]:
        backend, model, persona = turn_labels(turn)
        fields: dict[str, Any] = {
            "turn_id": turn.notes.get("turn_id"),
            "conversation_id": turn.conversation_id,
            "user_message_id": turn.user_message_id,
            "backend": backend,
            "model": model,
            "persona": persona,
            "ttft_ms": _round(turn.ttft_ms),
            "total_ms": _round(turn.total_ms),
            "completion_tokens": turn.completion_tokens,
        }
        if self.log_content:
            fields["text"] = turn.user_text
            fields["reply"] = turn.reply_text
        return fields

    def turn_finished(self, turn: TurnContext) -> None:
        turn_log.info("turn.finished", extra=self._fields(turn))
        unbind_contextvars(*TURN_KEYS)

    def turn_failed(self, turn: TurnContext, error: str) -> None:
        fields = {**self._fields(turn), "kind": error_kind(turn, error), "error": error.splitlines()[0][:500]}
        turn_log.warning("turn.failed", extra=fields)
        unbind_contextvars(*TURN_KEYS)


def _round(ms: float | None) -> float | None:
    return None if ms is None else round(ms, 2)
