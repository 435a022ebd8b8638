"""Turns are never lost, on SQLite and PostgreSQL: the caller's message is stored when the turn starts; a turn that
ends any other way than by finishing (the conversation ended, the stream closed or dropped, a script stopped, the
process killed) is stored as interrupted, deterministically, not when the garbage collector happens to run."""

from __future__ import annotations

import gc
import os
import select as select_fd
import signal
import socket
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, text, update

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.conversations.service import ConversationService, mark_ended
from callbot_core.errors import Conflict, InvalidInput
from callbot_core.jobs.runs import worker_id
from callbot_core.store import models
from callbot_core.store.models import Message, TurnMetrics, TurnStage, utcnow
from tests.fake_ollama import FakeOllama

CALLBOT = str(Path(sys.executable).with_name("callbot"))
NOT_READ = "interrupted: the reply was not read to the end"
ENDED = "interrupted: the conversation ended while the reply streamed"


def _turns(store, conversation_id: int) -> list[tuple[str, int | None, str | None]]:  # type: ignore[no-untyped-def]
    """Each caller message of the conversation, with its turn's reply id and error (both None while it runs)."""
    with store.session() as s:
        rows = s.execute(
            select(Message.text, TurnMetrics.assistant_message_id, TurnMetrics.error)
            .outerjoin(TurnMetrics, TurnMetrics.user_message_id == Message.id)
            .where(Message.conversation_id == conversation_id, Message.role == "user")
            .order_by(Message.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _running(store) -> list[tuple[str, str]]:  # type: ignore[no-untyped-def]
    """The turns the store holds as running: (caller's message, "host:pid" of the process running it)."""
    running = models.RunningTurn  # looked up here: the table is what this module tests
    with store.session() as s:
        rows = s.execute(
            select(Message.text, running.worker)
            .join(running, running.user_message_id == Message.id)
            .order_by(Message.id)
        ).all()
    return [tuple(r) for r in rows]  # type: ignore[misc]


def _count(store, model) -> int:  # type: ignore[no-untyped-def]
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model))


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_the_callers_message_is_stored_when_the_turn_starts(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    # Before a token is read: the message is in, with its turn marked as running in this process.
    assert _turns(store, info.id) == [("When do you open?", None, None)]
    assert _running(store) == [("When do you open?", worker_id())]
    assert _count(store, TurnMetrics) == 0 and _count(store, TurnStage) == 0

    # A running turn is no part of another turn's history: its reply may never come.
    other = service.send(info.id, "And on Sundays?", actor=LOCAL_OPERATOR)
    assert [m.content for m in other.turn.messages if m.role == "user"] == ["And on Sundays?"]
    other.text()

    assert turn.text() == "We open at 8."
    assert _running(store) == []
    rows = _turns(store, info.id)
    assert [(text, error) for text, _, error in rows] == [("When do you open?", None), ("And on Sundays?", None)]
    assert all(reply is not None for _, reply, _ in rows)
    assert _count(store, TurnStage) == 8  # the end writes the stage rows as before


def test_ending_the_conversation_while_its_reply_streams_keeps_the_turn(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)
    stream = iter(turn)
    assert next(stream) == "We"
    service.end(info.id, actor=LOCAL_OPERATOR)
    # At once, whether or not the stream is ever read again.
    assert _turns(store, info.id) == [("When do you open?", None, ENDED)]
    assert _running(store) == []

    with pytest.raises(Conflict, match=f"Conversation {info.id} ended while the reply streamed"):
        list(stream)
    assert _turns(store, info.id) == [("When do you open?", None, ENDED)]
    with store.session() as s:
        roles = s.scalars(select(Message.role).where(Message.conversation_id == info.id).order_by(Message.id)).all()
    assert roles == ["assistant", "user"]  # the greeting and the caller: no half reply


def test_a_turn_cannot_start_in_a_conversation_being_ended(service, store) -> None:
    """A turn starting while `end` is being written waits for it, then is refused: it never lands, running, in an
    ended conversation that nobody would interrupt."""
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    outcome: list[BaseException | None] = []

    def send() -> None:
        try:
            service.send(info.id, "Too late", actor=LOCAL_OPERATOR)
            outcome.append(None)
        except BaseException as exc:
            outcome.append(exc)

    with store.session() as s:
        assert mark_ended(s, info.id)
        caller = threading.Thread(target=send)
        caller.start()
        caller.join(timeout=0.5)  # long enough to validate and reach the start's write
        assert caller.is_alive(), outcome  # waiting on the end's transaction, not started beside it
    caller.join(timeout=30)
    assert len(outcome) == 1 and isinstance(outcome[0], Conflict), outcome
    assert _turns(store, info.id) == [] and _running(store) == []


def test_closing_a_stream_stores_the_interruption(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "Never read", actor=LOCAL_OPERATOR)
    turn.close()
    turn.close()  # twice is harmless
    assert _turns(store, info.id) == [("Never read", None, NOT_READ)]

    class ScriptStopped(BaseException):
        """What Streamlit raises into a script it stops or reruns (StopException, RerunException): no Exception."""

    with pytest.raises(ScriptStopped), service.send(info.id, "Stopped mid-reply", actor=LOCAL_OPERATOR) as turn:
        for _ in turn:
            raise ScriptStopped
    assert _turns(store, info.id)[1] == ("Stopped mid-reply", None, NOT_READ)
    with store.session() as s:
        generate = s.scalars(
            select(TurnStage)
            .join(TurnMetrics, TurnMetrics.id == TurnStage.turn_metrics_id)
            .where(TurnMetrics.user_message_id == turn.turn.user_message_id, TurnStage.stage == "generate")
        ).one()
    assert generate.error == NOT_READ and generate.first_output_at is not None

    with service.send(info.id, "Read to the end", actor=LOCAL_OPERATOR) as turn:
        assert turn.text() == "We open at 8."
    assert _turns(store, info.id)[2][2] is None and _running(store) == []


@pytest.mark.parametrize("read", [0, 1], ids=["unread", "mid-reply"])
def test_a_dropped_stream_is_stored_at_once_not_by_the_garbage_collector(service, store, read: int) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    gc.disable()  # what happens must not depend on when the collector runs
    try:
        turn = service.send(info.id, "Dropped", actor=LOCAL_OPERATOR)
        if read:
            stream = iter(turn)
            next(stream)
            del stream
        del turn
        assert _turns(store, info.id) == [("Dropped", None, NOT_READ)]
    finally:
        gc.enable()
    assert _running(store) == []


def test_a_stream_read_without_keeping_it_runs_to_the_end(service, store) -> None:
    """`for piece in service.send(...)` keeps only the generator: dropping the stream must not cut the turn."""
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    gc.disable()
    try:
        pieces = [piece for piece in service.send(info.id, "When do you open?", actor=LOCAL_OPERATOR)]
    finally:
        gc.enable()
    assert "".join(pieces) == "We open at 8."
    ((text_, reply, error),) = _turns(store, info.id)
    assert (text_, error) == ("When do you open?", None) and reply is not None


def test_turns_whose_process_died_are_reconciled_as_interrupted(service, store, settings) -> None:
    texts = ["alive here", "dead here", "far and old", "far and recent"]
    streams = {}
    for text_ in texts:
        info = service.start("receptionist", actor=LOCAL_OPERATOR)
        streams[text_] = (info.id, service.send(info.id, text_, actor=LOCAL_OPERATOR))
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    running = models.RunningTurn
    with store.session() as s:
        for text_, worker, age in [
            ("dead here", dead, 0),
            ("far and old", "pod-7:13", 2),
            ("far and recent", "pod-7:12", 0),
        ]:
            uid = s.scalar(select(Message.id).where(Message.text == text_))
            s.execute(
                update(running)
                .where(running.user_message_id == uid)
                .values(worker=worker, started_at=utcnow() - timedelta(hours=age))
            )

    ConversationService(store, settings)  # every front end builds one when it starts: that reconciles
    got = {text_: _turns(store, cid)[0][2] for text_, (cid, _) in streams.items()}
    assert got == {
        "alive here": None,
        "dead here": f"interrupted: its process ({dead}) ended before the turn did",
        "far and old": "interrupted: no end recorded 1 h after it started (process pod-7:13)",
        "far and recent": None,
    }
    assert sorted(_running(store)) == sorted([("alive here", worker_id()), ("far and recent", "pod-7:12")])

    # The live turn goes on as if nothing happened; the reconciled one cannot overwrite what was stored.
    assert streams["alive here"][1].text() == "We open at 8."
    cid, dead_stream = streams["dead here"]
    with pytest.raises(Conflict, match="already stored as interrupted"):
        dead_stream.text()
    assert _turns(store, cid) == [("dead here", None, f"interrupted: its process ({dead}) ended before the turn did")]


def test_reading_a_conversation_reconciles_a_turn_whose_process_died(service, store) -> None:
    from callbot_core.conversations.transcripts import get_conversation, list_conversations

    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    stream = service.send(info.id, "Anyone there?", actor=LOCAL_OPERATOR)
    dead = f"{socket.gethostname()}:{_dead_pid()}"
    with store.session() as s:
        s.execute(update(models.RunningTurn).values(worker=dead))
    # The Conversations page lists, then opens: both show the turn as interrupted without a restart in between.
    (row,) = [r for r in list_conversations(store) if r.id == info.id]
    assert _turns(store, info.id) == [
        ("Anyone there?", None, f"interrupted: its process ({dead}) ended before the turn did")
    ]
    detail = get_conversation(store, info.id)
    assert [m.text for m in detail.messages if m.role == "user"] == ["Anyone there?"]
    with pytest.raises(Conflict):
        stream.text()


@pytest.mark.parametrize("bad", ["\udcff", "caf\udce9", "\ud800 half a pair"], ids=["0xff", "latin-1", "half-pair"])
def test_text_that_is_not_unicode_is_refused_in_one_line(service, store, bad: str) -> None:
    """A non-UTF-8 byte in argv becomes a lone surrogate in Python (as does a JSON "\\ud800" escape)."""
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match=r"^The message is not valid text: it holds bytes that are not UTF-8"):
        service.send(info.id, bad, actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match=r"^Prompt variable 'caller_name' is not valid text"):
        service.start("receptionist", actor=LOCAL_OPERATOR, variables={"caller_name": bad})
    assert _turns(store, info.id) == []


@pytest.mark.slow
def test_callbot_chat_with_a_non_utf8_message_says_so_in_one_line(run) -> None:
    run("db", "upgrade")
    hint = "is not valid text: it holds bytes that are not UTF-8 (check the terminal's encoding)"
    # subprocess hands "\udcff" to argv as the byte 0xff; any command refuses it before it starts
    cases = [
        (["chat", "--message", "\udcff"], "\\xff"),
        (["chat", "--persona", "caf\udce9", "-m", "hi"], "caf\\xe9"),
        (["sql", "select '\udcff'"], "select '\\xff'"),
    ]
    for argv, shown in cases:
        proc = run(*argv, ok=False)
        assert proc.returncode == 1
        assert proc.stderr.splitlines() == [f'Error: argument "{shown}" {hint}']
        assert "Conversation" not in proc.stdout  # refused before a conversation was opened


def _read_until(proc: subprocess.Popen[bytes], wanted: bytes, timeout_s: float) -> bytes:
    assert proc.stdout is not None
    seen = b""
    deadline = time.monotonic() + timeout_s
    while wanted not in seen:
        left = deadline - time.monotonic()
        if left <= 0 or proc.poll() is not None:
            err = proc.stderr.read().decode() if proc.stderr and proc.poll() is not None else ""
            raise AssertionError(f"never saw {wanted!r} on stdout: {seen!r} {err}")
        ready, _, _ = select_fd.select([proc.stdout], [], [], left)
        if ready:
            seen += os.read(proc.stdout.fileno(), 4096)
    return seen


@pytest.mark.slow
def test_a_callbot_chat_killed_mid_reply_keeps_the_callers_message(store, store_url, settings, tmp_path) -> None:
    """For real: `callbot chat` on a slow Ollama-protocol server, killed with SIGKILL while the reply streams."""
    question = "What are your opening hours?"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    with FakeOllama(mode="stall", reply=("We", " open", " at 8."), chunks_before_trouble=2, stall_s=60) as fake:
        env.update(
            CALLBOT_DATABASE_URL=store_url,
            CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"),
            CALLBOT_OLLAMA_URL=fake.url,
        )
        argv = ["chat", "--persona", "receptionist", "--backend", "ollama", "--model", "smollm2:135m", "-m", question]
        proc = subprocess.Popen(
            [CALLBOT, *argv],
            env=env,
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
        )
        try:
            _read_until(proc, b"bot> We open", timeout_s=60)  # mid-reply: the server now stalls
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=30)
    worker = f"{socket.gethostname()}:{proc.pid}"
    with store.session() as s:
        cid = s.scalar(select(Message.conversation_id).where(Message.role == "user"))
    assert cid is not None, "the caller's message was lost"
    assert _turns(store, cid) == [(question, None, None)]  # nobody wrote the turn's end
    assert _running(store) == [(question, worker)]

    # A deploy's `callbot db upgrade` (as any front end that starts) reconciles it.
    upgrade = subprocess.run([CALLBOT, "db", "upgrade"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert upgrade.returncode == 0, upgrade.stderr
    assert "1 turn(s) whose process had died stored as interrupted." in upgrade.stdout
    assert _turns(store, cid) == [(question, None, f"interrupted: its process ({worker}) ended before the turn did")]
    assert _running(store) == []

    with store.engine.connect() as conn:
        if store_url.startswith("sqlite"):
            assert conn.execute(text("PRAGMA integrity_check")).scalars().all() == ["ok"]
            assert conn.execute(text("PRAGMA foreign_key_check")).all() == []
        orphans = conn.execute(
            text(
                "SELECT count(*) FROM turn_metrics tm LEFT JOIN messages m ON m.id = tm.user_message_id "
                "LEFT JOIN conversations c ON c.id = tm.conversation_id WHERE m.id IS NULL OR c.id IS NULL"
            )
        ).scalar()
        assert orphans == 0
