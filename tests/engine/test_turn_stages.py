"""A turn as a list of stages with observers, on SQLite and PostgreSQL, with a fast backend registered through the
real registry: one `turn_stages` row per stage that ran, in order and timed by one clock; a stage added without
touching the others; the events an observer receives; failures that still record the stages that ran; nothing
half-stored; stage rows leaving with their conversation; and the analytics view over them."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.analytics import Analytics
from callbot_core.backends.llm import ChatMessage
from callbot_core.conversations.observers import TurnObserver
from callbot_core.conversations.service import ConversationService
from callbot_core.conversations.turn import TurnContext
from callbot_core.errors import BackendError, BackendUnavailable, InvalidInput, NotFound
from callbot_core.store.models import Conversation, Message, TurnMetrics, TurnStage

DEFAULT_STAGES = ["validate", "prompt", "generate", "persist"]
HOURS = "Opening hours: Monday to Friday, 8am to 6pm."


class Recorder(TurnObserver):
    """Every event as (event, stage name or None), and what it saw at the end."""

    def __init__(self) -> None:
        self.events: list[tuple[str, str | None]] = []
        self.tokens: list[str] = []
        self.failed: list[str] = []
        self.finished: list[TurnContext] = []

    def turn_started(self, turn: TurnContext) -> None:
        self.events.append(("turn_started", None))

    def stage_started(self, turn, stage) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("stage_started", stage.name))

    def stage_first_output(self, turn, stage) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("stage_first_output", stage.name))

    def token(self, turn, stage, text: str) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("token", stage.name))
        self.tokens.append(text)

    def stage_ended(self, turn, stage) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("stage_ended", stage.name))

    def persist(self, turn, session) -> None:  # type: ignore[no-untyped-def]
        self.events.append(("persist", None))

    def turn_finished(self, turn: TurnContext) -> None:
        self.events.append(("turn_finished", None))
        self.finished.append(turn)

    def turn_failed(self, turn: TurnContext, error: str) -> None:
        self.events.append(("turn_failed", None))
        self.failed.append(error)


class Lookup:
    """A retrieve-like stage: adds context for the prompt (and takes a measurable moment doing it)."""

    name = "lookup"
    streams = False
    after_failure = False

    def run(self, turn: TurnContext) -> None:
        time.sleep(0.01)
        turn.context.append(HOURS)
        turn.notes["retrieved"] = 1


class Brevity:
    """A stage after prompt: adds a note to the system message the prompt built."""

    name = "brevity"
    streams = False
    after_failure = False

    def run(self, turn: TurnContext) -> None:
        system = turn.messages[0]
        turn.messages[0] = ChatMessage("system", system.content + "\nAnswer in one sentence.")


def _stages(store, conversation_id: int) -> list[TurnStage]:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return list(
            session.scalars(
                select(TurnStage)
                .join(TurnMetrics, TurnMetrics.id == TurnStage.turn_metrics_id)
                .where(TurnMetrics.conversation_id == conversation_id)
                .order_by(TurnStage.turn_metrics_id, TurnStage.position)
            )
        )


def _metrics(store, conversation_id: int) -> TurnMetrics:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return session.scalars(select(TurnMetrics).where(TurnMetrics.conversation_id == conversation_id)).one()


def _count(store, model) -> int:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def _assert_one_clock(rows: list[TurnStage]) -> None:
    for row in rows:
        assert row.ms >= 0 and row.started_at <= row.ended_at, row.stage
        assert (row.ended_at - row.started_at).total_seconds() * 1000 == pytest.approx(row.ms, abs=0.01)
    for before, after in zip(rows, rows[1:], strict=False):
        assert before.ended_at <= after.started_at, (before.stage, after.stage)


def test_a_turn_writes_one_row_per_stage_in_order(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    t0 = time.perf_counter()
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    assert turn.text() == "We open at 8."
    wall_ms = (time.perf_counter() - t0) * 1000

    rows = _stages(store, info.id)
    assert [r.stage for r in rows] == DEFAULT_STAGES and [r.position for r in rows] == [0, 1, 2, 3]
    assert all(r.error is None for r in rows)
    _assert_one_clock(rows)
    assert sum(r.ms for r in rows) <= wall_ms
    assert [r.stage for r in rows if r.first_output_at is not None] == ["generate"]

    # TTFT and total are the generate stage's, as turn_metrics always measured them.
    generate = rows[2]
    tm = _metrics(store, info.id)
    ttft = (generate.first_output_at - generate.started_at).total_seconds() * 1000
    assert tm.ttft_ms == pytest.approx(ttft, abs=0.01) and tm.total_ms == pytest.approx(generate.ms)
    assert turn.result is not None and turn.result.ttft_ms == tm.ttft_ms and tm.completion_tokens == 4
    with store.session() as session:
        user = session.get(Message, tm.user_message_id)
        assert user is not None and user.created_at <= rows[0].started_at  # stamped when the caller spoke


def test_a_stage_is_added_without_touching_the_others(service, store, settings, backend) -> None:
    service.add_stage(Lookup(), before="prompt")
    service.add_stage(Brevity(), before="generate")
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    assert turn.turn.notes == {"retrieved": 1}
    turn.text()

    system = backend.requests[-1][0]
    assert system.role == "system" and system.content.startswith("You are")  # the persona's own prompt first
    assert HOURS in system.content and system.content.endswith("Answer in one sentence.")
    rows = _stages(store, info.id)
    assert [r.stage for r in rows] == ["validate", "lookup", "prompt", "brevity", "generate", "persist"]
    assert [r.position for r in rows] == list(range(6))
    _assert_one_clock(rows)
    assert rows[1].ms >= 10 and rows[1].first_output_at is None  # its own time, measured by the turn's clock

    # Other services keep the default list (retrieve runs only for personas with documents, so the turn above had
    # no row for it); a name is used once; an anchor must exist.
    assert [s.name for s in ConversationService(store, settings).stages] == [
        "validate", "retrieve", "prompt", "generate", "persist"
    ]  # fmt: skip
    with pytest.raises(InvalidInput, match="already has a stage named 'lookup'"):
        service.add_stage(Lookup(), after="persist")
    with pytest.raises(InvalidInput, match="No stage named 'tts'"):
        service.add_stage(type("Speak", (Brevity,), {"name": "speak"})(), before="tts")


def test_an_observer_receives_the_events_in_order(store, settings, backend) -> None:
    recorder = Recorder()
    service = ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}), observers=[recorder])
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    assert recorder.events[-1] == ("stage_ended", "prompt")  # send ran the stages before generation
    turn.text()
    assert recorder.events == [
        ("turn_started", None),
        ("stage_started", "validate"),
        ("stage_ended", "validate"),
        ("stage_started", "prompt"),
        ("stage_ended", "prompt"),
        ("stage_started", "generate"),
        ("stage_first_output", "generate"),
        *[("token", "generate")] * 4,
        ("stage_ended", "generate"),
        ("stage_started", "persist"),
        ("stage_ended", "persist"),
        ("persist", None),
        ("turn_finished", None),
    ]
    assert "".join(recorder.tokens) == "We open at 8."
    assert recorder.finished[0].result is turn.result and recorder.failed == []


def test_a_broken_observer_does_not_break_the_turn(store, settings, backend) -> None:
    class Broken(TurnObserver):
        def token(self, turn, stage, text: str) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("metrics server down")

    service = ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}), observers=[Broken()])
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    assert service.send(info.id, "hi", actor=LOCAL_OPERATOR).text() == "We open at 8."
    assert _metrics(store, info.id).error is None


def test_a_failing_backend_still_records_the_stages_that_ran(store, settings, backend) -> None:
    recorder = Recorder()
    service = ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}), observers=[recorder])
    backend.fail_after = 2
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    got: list[str] = []
    with pytest.raises(BackendUnavailable, match="went away"):
        for piece in turn:
            got.append(piece)
    assert got == ["We", " open"]

    rows = _stages(store, info.id)
    assert [r.stage for r in rows] == DEFAULT_STAGES
    assert [r.error for r in rows] == [None, None, "the scripted server went away", None]
    assert rows[2].first_output_at is not None  # the first token did arrive
    _assert_one_clock(rows)
    tm = _metrics(store, info.id)
    assert tm.error == "the scripted server went away" and tm.assistant_message_id is None
    assert tm.ttft_ms is not None and tm.total_ms == pytest.approx(rows[2].ms)
    assert turn.result is not None and turn.result.error == tm.error
    assert recorder.events[-1] == ("turn_failed", None) and recorder.failed == [tm.error]
    assert ("persist", None) in recorder.events


def test_an_empty_reply_fails_on_generate(service, store, backend) -> None:
    backend.pieces = ("  ", "\n")
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    with pytest.raises(BackendError, match="scripted model script-1 returned an empty reply"):
        service.send(info.id, "hello?", actor=LOCAL_OPERATOR).text()
    rows = _stages(store, info.id)
    assert [(r.stage, r.error) for r in rows] == [
        ("validate", None),
        ("prompt", None),
        ("generate", "the model returned an empty reply"),
        ("persist", None),
    ]
    assert _metrics(store, info.id).error == "the model returned an empty reply"


def test_an_abandoned_stream_marks_generate_interrupted(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    stream = iter(turn)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    rows = _stages(store, info.id)
    assert [r.stage for r in rows] == DEFAULT_STAGES
    assert rows[2].error is not None and rows[2].error.startswith("interrupted")
    assert turn.result is not None and turn.result.error == rows[2].error


@pytest.mark.parametrize(("conversation", "text", "error"), [("own", "  ", InvalidInput), (999, "hi", NotFound)])
def test_a_refusal_stores_no_stage_rows_and_tells_the_observers(store, settings, backend, conversation, text, error):  # type: ignore[no-untyped-def]
    recorder = Recorder()
    service = ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}), observers=[recorder])
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    before = (_count(store, Message), _count(store, TurnMetrics), _count(store, TurnStage))
    with pytest.raises(error):
        service.send(info.id if conversation == "own" else conversation, text, actor=LOCAL_OPERATOR)
    assert (_count(store, Message), _count(store, TurnMetrics), _count(store, TurnStage)) == before
    assert recorder.events == [
        ("turn_started", None),
        ("stage_started", "validate"),
        ("stage_ended", "validate"),
        ("turn_failed", None),
    ]
    assert backend.requests == []


def test_a_failure_while_storing_the_end_keeps_the_caller_and_stores_the_failure(store, settings, backend) -> None:
    class Refuses(TurnObserver):
        def persist(self, turn, session) -> None:  # type: ignore[no-untyped-def]
            raise RuntimeError("disk full")

    recorder = Recorder()
    service = ConversationService(
        store, settings.model_copy(update={"llm_backend": "scripted"}), observers=[recorder, Refuses()]
    )
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    before = _count(store, Message)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    with pytest.raises(RuntimeError, match="disk full"):
        turn.text()
    # The bot message, the metrics and the stage rows of the end were rolled back together; the caller's message,
    # stored when the turn started, stays, with a turn row saying what failed (no stage rows: their writer failed).
    assert (_count(store, Message), _count(store, TurnStage)) == (before + 1, 0)
    tm = _metrics(store, info.id)
    assert tm.error == "RuntimeError: disk full" and tm.assistant_message_id is None
    assert turn.result is None and recorder.events[-1] == ("turn_failed", None)


def test_deleting_a_conversation_removes_its_stage_rows(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR).text()
    other = service.start("support", actor=LOCAL_OPERATOR)
    service.send(other.id, "Where is my parcel?", actor=LOCAL_OPERATOR).text()
    assert _count(store, TurnStage) == 8
    with store.session() as session:
        session.delete(session.get(Conversation, info.id))
    assert _count(store, TurnStage) == 4 and len(_stages(store, other.id)) == 4


def test_the_turn_stages_view(service, store, backend, tmp_path: Path) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    t0 = time.perf_counter()
    service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR).text()
    wall_ms = (time.perf_counter() - t0) * 1000
    backend.fail_after = 1
    with pytest.raises(BackendUnavailable):
        service.send(info.id, "And on Sundays?", actor=LOCAL_OPERATOR).text()

    an = Analytics(store, tmp_path / "analytics.duckdb")
    view = an.df("select * from turn_stages order by turn_id, position")
    turns = an.df("select turn_id, ttft_ms from turns order by turn_id")
    ok, failed = turns["turn_id"].tolist()
    first = view[view["turn_id"] == ok]
    assert first["stage"].tolist() == DEFAULT_STAGES and first["position"].tolist() == [0, 1, 2, 3]
    assert set(view["persona"]) == {"receptionist"} and set(view["conversation_id"]) == {info.id}
    assert set(view["backend"]) == {"scripted"} and set(view["persona_version"]) == {1}
    assert (view["ms"] >= 0).all() and first["ms"].sum() <= wall_ms
    assert first["started_at"].is_monotonic_increasing
    generate = first[first["stage"] == "generate"].iloc[0]
    assert generate["first_output_ms"] == pytest.approx(turns["ttft_ms"].iloc[0], abs=0.01)
    assert first[first["stage"] != "generate"]["first_output_ms"].isna().all()
    second = view[view["turn_id"] == failed]
    assert second["stage"].tolist() == DEFAULT_STAGES
    assert second["error"].tolist()[2] == "the scripted server went away"

    # Stage rows leave the snapshot with their conversation.
    with store.session() as session:
        session.delete(session.get(Conversation, info.id))
    stats = an.refresh()
    assert stats.deleted.get("turn_stages") == 8
    assert an.df("select count(*) as n from turn_stages")["n"].tolist() == [0]
