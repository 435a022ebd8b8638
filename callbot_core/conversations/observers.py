"""Observers of a turn: they receive its events and turn them into numbers (pipecat's observers).

Stages do the work of a turn; observers watch it. The store observer writes `turn_metrics` and one `turn_stages`
row per stage; a Prometheus observer would update histograms, a live-update observer publish events. A new
observer subclasses `TurnObserver` and overrides only the events it needs.

Events, in order: `turn_started`; per stage `stage_started`, `stage_first_output` (once, at its first output),
`token` (each piece a streaming stage yields), `stage_ended` (with the error when it failed); then `persist`
inside the transaction that stores the turn's end (only for a turn that started: its caller's message is stored
as running once the stages before generation have passed); then `turn_finished` or `turn_failed`.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING

from sqlalchemy import insert

from callbot_core.store.models import TurnMetrics, TurnStage

if TYPE_CHECKING:
    from sqlalchemy.orm import Session

    from callbot_core.conversations.timing import StageTiming
    from callbot_core.conversations.turn import TurnContext

log = logging.getLogger(__name__)

# Error text kept in a row: enough for any real message, bounded against a backend that returns a whole page.
MAX_ERROR_CHARS = 4000


class TurnObserver:
    """Receives one turn's events. Every method does nothing here: override the ones you need.

    Observers are shared by every turn of a service, and turns run in several threads at once (comparisons), so
    keep per-turn state on the turn (`turn.notes`), not on the observer.
    """

    def turn_started(self, turn: TurnContext) -> None:
        """`send` was called and the actor may chat; nothing is validated yet."""

    def stage_started(self, turn: TurnContext, stage: StageTiming) -> None:
        pass

    def stage_first_output(self, turn: TurnContext, stage: StageTiming) -> None:
        """The stage's first output (for generate: the first token, so `stage.first_output_ms` is TTFT)."""

    def token(self, turn: TurnContext, stage: StageTiming, text: str) -> None:
        """One piece of text a streaming stage passed on to the caller."""

    def stage_ended(self, turn: TurnContext, stage: StageTiming) -> None:
        """The stage is done; `stage.error` says why when it failed."""

    def persist(self, turn: TurnContext, session: Session) -> None:
        """Inside the transaction that stores the turn's end, after its last stage: add rows here and they are
        stored with the bot's message, or not at all. An exception here rolls that transaction back; the turn is
        then stored as failed (the caller's message, which was stored when the turn started, stays)."""

    def turn_finished(self, turn: TurnContext) -> None:
        """The turn succeeded and is stored; `turn.result` holds it."""

    def turn_failed(self, turn: TurnContext, error: str) -> None:
        """The turn was refused or failed. `turn.result` is set when its stream stored the failure (a backend error,
        an interrupted stream); None when nothing was stored (a refusal), when the end was stored by someone else
        (the conversation ended, the turn was reconciled), or when storing the end failed."""

    def conversation_ended(self, conversation_id: int) -> None:
        """`ConversationService.end` ended the conversation (stored; its summaries are written after this)."""


class ObserverList:
    """Hands each event to every observer in order.

    A notification that raises is logged and skipped: a broken metrics observer must not fail a call. `persist`
    is the exception, since it writes in the transaction that stores the turn's end: its failure fails the turn.
    """

    def __init__(self, observers: Iterable[TurnObserver]) -> None:
        self._observers = tuple(observers)

    def notify(self, event: str, *args: object) -> None:
        for observer in self._observers:
            try:
                getattr(observer, event)(*args)
            except Exception:
                log.exception("Turn observer %s failed on %s", type(observer).__name__, event)

    def persist(self, turn: TurnContext, session: Session) -> None:
        for observer in self._observers:
            observer.persist(turn, session)


class StoreObserver(TurnObserver):
    """Writes the turn's `turn_metrics` row and one `turn_stages` row per stage that ran, in the transaction that
    stores the turn's end (rows there are written once, whole: the analytics snapshot copies them as append-only).

    TTFT and total time are the generate stage's, measured from the start of generation: the figures a backend is
    compared on. The other stages' time is in their own rows.
    """

    def persist(self, turn: TurnContext, session: Session) -> None:
        if turn.user_message_id is None:  # the turn never started: nothing to hang metrics on
            return
        ok = turn.error is None
        usage = turn.usage if ok else None
        metrics = TurnMetrics(
            conversation_id=turn.conversation_id,
            user_message_id=turn.user_message_id,
            assistant_message_id=turn.assistant_message_id,
            backend=turn.backend.name if turn.backend is not None else "",
            model=turn.model,
            ttft_ms=turn.ttft_ms,
            total_ms=turn.total_ms,
            # A failed turn keeps its timings but no token figures: they would describe a reply nobody got.
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=turn.completion_tokens if ok else None,
            tokens_per_s=turn.tokens_per_s if ok else None,
            backend_prompt_eval_ms=usage.backend_prompt_eval_ms if usage else None,
            backend_eval_ms=usage.backend_eval_ms if usage else None,
            backend_load_ms=usage.backend_load_ms if usage else None,
            backend_total_ms=usage.backend_total_ms if usage else None,
            trimmed_messages=turn.trimmed,
            cached=turn.cached and ok,
            error=turn.error[:MAX_ERROR_CHARS] if turn.error is not None else None,
        )
        session.add(metrics)
        session.flush()
        turn.notes["turn_metrics_id"] = metrics.id  # for observers after this one that hang rows off the turn
        wall = turn.clock.wall
        # One executemany of plain rows: building ORM objects for them was measurable per turn
        # (bench/turn_overhead.py), and nothing reads them back in this session.
        rows = [
            dict(
                turn_metrics_id=metrics.id,
                stage=timing.name,
                position=timing.position,
                started_at=wall(timing.started),
                first_output_at=None if timing.first_output is None else wall(timing.first_output),
                ended_at=wall(timing.ended if timing.ended is not None else timing.started),
                ms=timing.ms or 0.0,
                error=timing.error[:MAX_ERROR_CHARS] if timing.error is not None else None,
            )
            for timing in turn.timings
        ]
        if rows:
            session.execute(insert(TurnStage), rows)
