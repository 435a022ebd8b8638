"""Analytics over the store, on SQLite and PostgreSQL: the views' numbers on a hand-built dataset, the
incremental snapshot (new, updated, deleted rows), timeouts, row limits, the audit trail, exports,
concurrent use, the dashboards' frames, and `callbot sql` as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import duckdb
import pytest
from sqlalchemy import select

from callbot_core.access import audit
from callbot_core.access.permissions import LOCAL_OPERATOR as OP
from callbot_core.access.permissions import OperatorActor
from callbot_core.analytics import (
    DASHBOARD_QUERIES,
    VIEW_DOCS,
    Analytics,
    DashboardFilters,
    ForbiddenSQL,
    QueryTimeout,
    dashboard_data,
)
from callbot_core.analytics import engine as engine_module
from callbot_core.analytics.dashboard import DASHBOARD_COLUMNS
from callbot_core.conversations.transcripts import delete_conversation
from callbot_core.errors import InvalidInput
from callbot_core.store.models import (
    Conversation,
    Message,
    Persona,
    PersonaVersion,
    SystemMetrics,
    TurnMetrics,
    User,
)

CALLBOT = str(Path(sys.executable).with_name("callbot"))
# An admin who is not the local operator, so the audit rows show whose query it was.
ADA = OperatorActor(username="ada", role="admin")


def at(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, second, tzinfo=UTC)


@dataclass
class Dataset:
    a: int  # receptionist v1, embedded, alice, ended, two turns
    b: int  # support v1, ollama, bob, active, one good and one failed turn
    c: int  # receptionist v2, embedded, no user, ended, two turns (one past the histogram's cap)


def add_conversation(session, version: PersonaVersion, *, backend: str, model: str, user: User | None,
                     started: datetime, turns: list[tuple], greeting: str | None = None, ended: datetime | None = None,
                     summaries: tuple[str, str] | None = None) -> Conversation:  # fmt: skip
    """turns: (user text, at, reply text or None for a failed turn, ttft, total, completion tokens, tokens/s)."""
    conv = Conversation(
        persona_version_id=version.id, backend=backend, model=model, user_id=user.id if user else None,
        channel="text", started_at=started, ended_at=ended, status="ended" if ended else "active",
        summary_short=summaries[0] if summaries else None, summary_full=summaries[1] if summaries else None,
    )  # fmt: skip
    session.add(conv)
    session.flush()
    if greeting:
        session.add(Message(conversation_id=conv.id, role="assistant", text=greeting, created_at=started))
    for text, when, reply, ttft, total, tokens, tps in turns:
        um = Message(conversation_id=conv.id, role="user", text=text, created_at=when)
        session.add(um)
        session.flush()
        am = None
        if reply is not None:
            am = Message(conversation_id=conv.id, role="assistant", text=reply, created_at=when + timedelta(seconds=1))
            session.add(am)
            session.flush()
        session.add(
            TurnMetrics(
                conversation_id=conv.id,
                user_message_id=um.id,
                assistant_message_id=am.id if am else None,
                backend=backend,
                model=model,
                ttft_ms=ttft,
                total_ms=total,
                prompt_tokens=50,
                completion_tokens=tokens,
                tokens_per_s=tps,
                error=None if reply is not None else "backend down",
                created_at=when + timedelta(seconds=1),
            )  # fmt: skip
        )
    session.flush()
    return conv


def version_of(session, key: str, version: int = 1) -> PersonaVersion:
    return session.scalar(
        select(PersonaVersion)
        .join(Persona, Persona.id == PersonaVersion.persona_id)
        .where(Persona.key == key, PersonaVersion.version == version)
    )


def build(store) -> Dataset:
    """The hand-built dataset; every expected number below is worked out from it by hand."""
    with store.session() as s:
        alice = User(username="alice", password_hash="x", role="researcher")
        bob = User(username="bob", password_hash="x", role="researcher")
        s.add_all([alice, bob])
        rec1 = version_of(s, "receptionist")
        s.add(PersonaVersion(persona_id=rec1.persona_id, version=2, system_prompt="Be brief."))
        s.flush()
        rec2, sup1 = version_of(s, "receptionist", 2), version_of(s, "support")
        a = add_conversation(
            s, rec1, backend="embedded", model="m1", user=alice, started=at(10, 9), greeting="Good morning, clinic.",
            turns=[("I need an appointment", at(10, 9, 0, 10), "Tuesday at nine works", 100.0, 500.0, 10, 20.0),
                   ("Great thanks", at(10, 9, 1), "You are booked", 200.0, 700.0, 14, 28.0)],
            ended=at(10, 9, 10), summaries=("Booked a visit.", "The caller booked a visit for Tuesday."),
        )  # fmt: skip
        b = add_conversation(
            s, sup1, backend="ollama", model="m2", user=bob, started=at(11, 15),
            turns=[("Where is my parcel", at(11, 15, 0, 5), "It ships today", 300.0, 900.0, 6, 10.0),
                   ("Hello?", at(11, 15, 1), None, None, 50.0, None, None)],
        )  # fmt: skip
        c = add_conversation(
            s, rec2, backend="embedded", model="m1", user=None, started=at(11, 20),
            turns=[("Opening hours please", at(11, 20, 0, 5), "Nine to five", 400.0, 1100.0, 3, 30.0),
                   ("And weekends", at(11, 20, 1), "Closed on weekends sorry", 120.0, 7000.0, 5, 40.0)],
            ended=at(11, 20, 5), summaries=("Asked hours.", "The caller asked about opening hours."),
        )  # fmt: skip
        s.add_all([
            SystemMetrics(taken_at=at(10, 12), host="h1", cpu_percent=10.0, memory_percent=40.0, memory_used_mb=800.0,
                          disk_percent=50.0, process_rss_mb=200.0),
            SystemMetrics(taken_at=at(11, 12), host="h1", cpu_percent=30.0, memory_percent=45.0, memory_used_mb=900.0,
                          disk_percent=51.0, process_rss_mb=210.0),
        ])  # fmt: skip
        return Dataset(a.id, b.id, c.id)


@pytest.fixture
def data(store) -> Dataset:
    return build(store)


@pytest.fixture
def an(store, tmp_path: Path) -> Analytics:
    return Analytics(store, tmp_path / "analytics.duckdb")


def rows(an: Analytics, sql: str) -> list[dict]:
    return an.query(sql, max_rows=10_000, actor=OP).to_df().to_dict("records")


def by(records: list[dict], key: str) -> dict:
    return {r[key]: r for r in records}


# -- the views ---------------------------------------------------------------------------------------


def test_turns_view(an: Analytics, data: Dataset) -> None:
    turns = rows(an, "select * from turns order by turn_id")
    assert len(turns) == 6
    assert [t["persona"] for t in turns] == ["receptionist", "receptionist", "support", "support", "receptionist",
                                             "receptionist"]  # fmt: skip
    first = turns[0]
    assert first["conversation_id"] == data.a and first["persona_version"] == 1 and first["username"] == "alice"
    assert (first["backend"], first["model"], first["channel"]) == ("embedded", "m1", "text")
    assert first["started_at"].to_pydatetime() == at(10, 9, 0, 10).replace(tzinfo=None)  # UTC, no zone
    assert first["conversation_started_at"].to_pydatetime() == datetime(2026, 1, 10, 9)
    assert (first["ttft_ms"], first["total_ms"], first["completion_tokens"], first["tokens_per_s"]) == (
        100,
        500,
        10,
        20,
    )
    assert (first["user_words"], first["bot_words"], first["failed"]) == (4, 4, False)
    failed = turns[3]
    assert failed["failed"] and failed["error"] == "backend down" and pd_isna(failed["assistant_message_id"])
    assert failed["user_words"] == 1 and pd_isna(failed["bot_words"]) and pd_isna(failed["ttft_ms"])
    assert pd_isna(turns[4]["username"]) and turns[4]["persona_version"] == 2
    per_persona = rows(an, "select persona, count(*) as n from turns group by 1 order by 1")
    assert per_persona == [{"persona": "receptionist", "n": 4}, {"persona": "support", "n": 2}]


def pd_isna(value: object) -> bool:
    import pandas as pd

    return bool(pd.isna(value))


def test_conversations_stats_view(an: Analytics, data: Dataset) -> None:
    stats = by(rows(an, "select * from conversations_stats"), "conversation_id")
    a, b, c = stats[data.a], stats[data.b], stats[data.c]
    assert (a["messages"], a["turns"], a["failed_turns"], a["status"]) == (5, 2, 0, "ended")
    assert a["duration_s"] == 600.0
    assert (a["user_words"], a["bot_words"]) == (6, 10)  # the greeting is bot talk
    assert a["talk_ratio"] == pytest.approx(0.6)
    assert a["ttft_mean_ms"] == 150 and a["ttft_p95_ms"] == pytest.approx(195)
    assert a["total_mean_ms"] == 600 and a["total_p95_ms"] == pytest.approx(690)
    assert a["tokens_per_s_mean"] == 24 and a["completion_tokens"] == 24
    assert (a["summary_short_words"], a["summary_full_words"]) == (3, 7)
    # Active: duration runs to the last message; the failed turn's latency is left out of the means.
    assert (b["status"], b["turns"], b["failed_turns"], b["messages"]) == ("active", 2, 1, 3)
    assert b["duration_s"] == 60.0 and pd_isna(b["ended_at"])
    assert (b["user_words"], b["bot_words"]) == (5, 3) and b["talk_ratio"] == pytest.approx(5 / 3)
    assert b["ttft_mean_ms"] == 300 and b["total_mean_ms"] == 900
    assert pd_isna(b["summary_short_words"])
    assert (c["user_words"], c["bot_words"]) == (5, 7) and pd_isna(c["username"])
    assert c["talk_ratio"] == pytest.approx(5 / 7)
    assert (c["summary_short_words"], c["summary_full_words"]) == (2, 6)


def test_persona_performance_view(an: Analytics, data: Dataset) -> None:
    perf = {(r["persona"], r["persona_version"]): r for r in rows(an, "select * from persona_performance")}
    r1 = perf[("receptionist", 1)]
    assert (r1["conversations"], r1["turns"], r1["failed_turns"], r1["error_rate"]) == (1, 2, 0, 0.0)
    assert r1["ttft_p50_ms"] == 150 and r1["ttft_p95_ms"] == pytest.approx(195)
    assert r1["total_p50_ms"] == 600 and r1["total_p95_ms"] == pytest.approx(690)
    assert r1["tokens_per_s_mean"] == 24 and r1["tokens_per_s_p50"] == 24 and r1["completion_tokens_mean"] == 12
    r2 = perf[("receptionist", 2)]
    assert (r2["conversations"], r2["turns"], r2["ttft_p50_ms"], r2["tokens_per_s_mean"]) == (1, 2, 260, 35)
    s1 = perf[("support", 1)]
    assert (s1["turns"], s1["failed_turns"], s1["error_rate"]) == (2, 1, 0.5)  # a float division in every store
    assert s1["ttft_p50_ms"] == 300 and s1["tokens_per_s_mean"] == 10
    unused = perf[("sales", 1)]
    assert (unused["conversations"], unused["turns"]) == (0, 0) and pd_isna(unused["error_rate"])


def test_daily_activity_and_system_metrics_views(an: Analytics, data: Dataset) -> None:
    days = {str(r["day"]): r for r in rows(an, "select * from daily_activity")}
    assert set(days) == {"2026-01-10", "2026-01-11"}
    d10, d11 = days["2026-01-10"], days["2026-01-11"]
    assert (d10["conversations"], d10["users"], d10["turns"], d10["failed_turns"], d10["error_rate"]) == (1, 1, 2, 0, 0)
    assert (d11["conversations"], d11["users"], d11["turns"], d11["failed_turns"]) == (2, 1, 4, 1)
    assert d11["error_rate"] == 0.25 and d10["ttft_p50_ms"] == 150
    assert d10["words"] == 4 + 4 + 2 + 3
    metrics = rows(an, "select * from system_metrics order by taken_at")
    assert [m["cpu_percent"] for m in metrics] == [10.0, 30.0] and metrics[0]["host"] == "h1"
    messages = rows(an, f"select role, words from messages where conversation_id = {data.a} order by id")
    assert [m["words"] for m in messages] == [3, 4, 4, 2, 3]


def test_every_documented_view_exists_with_exactly_its_documented_columns(an: Analytics, data: Dataset) -> None:
    for doc in VIEW_DOCS:
        actual = [name for name, _type in an.columns_of(doc.name)]
        assert actual == [name for name, _ in doc.columns], doc.name
        assert doc.description and all(meaning for _, meaning in doc.columns)


def test_analytics_open_uses_the_runtime_folder(settings, data: Dataset, tmp_path: Path) -> None:
    an = Analytics.open(settings)
    assert an.snapshot_path == settings.resolved_runtime_dir() / "analytics.duckdb"
    assert rows(an, "select count(*) as n from turns") == [{"n": 6}]
    # Another store gets a snapshot of its own beside it, so two stores never fight over one file.
    other = Analytics.open(settings, database_url=f"sqlite:///{tmp_path / 'other.db'}")
    assert other.snapshot_path.parent == an.snapshot_path.parent and other.snapshot_path != an.snapshot_path


# -- the incremental snapshot --------------------------------------------------------------------------


def test_refresh_is_incremental_and_reflects_new_updated_and_deleted_rows(an: Analytics, store, data: Dataset) -> None:
    first = an.refresh()
    assert first.changed and first.rebuilt and first.copied["turn_metrics"] == 6
    again = an.refresh()
    assert not again.changed and again.copied == {} and not again.deleted

    # New rows appear, and only they are copied.
    with store.session() as s:
        d = add_conversation(
            s, version_of(s, "tutor"), backend="embedded", model="m1", user=None, started=at(12, 8),
            turns=[("Teach me", at(12, 8, 0, 5), "Gladly let us start", 90.0, 400.0, 4, 50.0)],
        ).id  # fmt: skip
    stats = an.refresh()
    assert stats.changed and stats.copied == {"conversations": 1, "messages": 2, "turn_metrics": 1}
    assert rows(an, f"select persona, bot_words from turns where conversation_id = {d}") == [
        {"persona": "tutor", "bot_words": 4}
    ]

    # An updated conversation (ended, summarised) shows its new state.
    with store.session() as s:
        conv = s.get(Conversation, data.b)
        conv.status, conv.ended_at = "ended", at(11, 15, 30)
        conv.summary_short, conv.summary_full = "Parcel ships today.", "The customer asked where the parcel is."
    stats = an.refresh()
    assert stats.copied == {"conversations": 1}
    b = rows(
        an,
        f"select status, duration_s, summary_short_words from conversations_stats where conversation_id = {data.b}",
    )
    assert b == [{"status": "ended", "duration_s": 1800.0, "summary_short_words": 3}]

    # A deleted conversation disappears with its messages and turns.
    delete_conversation(store, data.a, actor=OP)
    stats = an.refresh()
    assert stats.deleted == {"conversations": 1, "messages": 5, "turn_metrics": 2}
    assert rows(an, f"select count(*) as n from turns where conversation_id = {data.a}") == [{"n": 0}]
    assert rows(an, f"select count(*) as n from messages where conversation_id = {data.a}") == [{"n": 0}]
    assert rows(an, "select count(*) as n from turns") == [{"n": 5}]

    # Users and personas are copied again when they change.
    with store.session() as s:
        s.scalar(select(Persona).where(Persona.key == "support")).name = "Support desk"
        s.scalar(select(User).where(User.username == "bob")).display_name = "Bob B."
    stats = an.refresh()
    assert stats.changed and {"personas", "users"} <= stats.copied.keys()
    assert rows(an, "select distinct persona_name from turns where persona = 'support'") == [
        {"persona_name": "Support desk"}
    ]
    assert not an.refresh().changed


def test_a_reused_id_shows_the_new_conversation_not_the_old(an: Analytics, store, data: Dataset) -> None:
    # SQLite hands the highest id out again once its row is deleted; the snapshot must not keep the old rows.
    an.refresh()
    delete_conversation(store, data.c, actor=OP)
    with store.session() as s:
        new = add_conversation(
            s, version_of(s, "sales"), backend="openai", model="m3", user=None, started=at(13, 10),
            turns=[("Sell me", at(13, 10, 0, 5), "Sure thing", 80.0, 300.0, 2, 25.0)],
        ).id  # fmt: skip
    if store.dialect == "sqlite":
        assert new == data.c  # the id really was handed out again
    an.refresh()
    got = rows(an, f"select conversation_id, persona, backend from turns where conversation_id >= {data.c} order by 1")
    assert got == [{"conversation_id": new, "persona": "sales", "backend": "openai"}]
    assert rows(an, "select count(*) as n from messages") == [{"n": 5 + 3 + 2}]


def test_a_replaced_summary_is_seen_by_the_periodic_full_check(
    an: Analytics, store, data: Dataset, monkeypatch: pytest.MonkeyPatch
) -> None:
    an.refresh()
    with store.session() as s:
        s.get(Conversation, data.a).summary_short = "Booked a consultation."  # same count of summaries
    monkeypatch.setattr(engine_module, "FULL_CHECK_S", 0.0)
    assert an.refresh().copied == {"conversations": 1}
    assert rows(an, f"select summary_short from conversations_stats where conversation_id = {data.a}") == [
        {"summary_short": "Booked a consultation."}
    ]


def test_bulk_and_row_by_row_copies_agree(
    store, data: Dataset, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On PostgreSQL a big range is copied through DuckDB's postgres scanner and a small one over the store's
    own connection: both must give the same snapshot (on SQLite both runs read natively)."""
    native = Analytics(store, tmp_path / "native.duckdb")
    monkeypatch.setattr(engine_module, "NATIVE_MAX_ROWS", -1)  # every range counts as big
    bulk = Analytics(store, tmp_path / "bulk.duckdb")
    bulk.refresh()
    monkeypatch.undo()
    for view in ("turns", "conversations_stats", "persona_performance", "daily_activity", "system_metrics"):
        ordered = f"select * from {view} order by all"
        assert native.query(ordered, actor=OP).rows == bulk.query(ordered, actor=OP).rows, view


def test_a_lost_sidecar_or_snapshot_is_recovered(an: Analytics, data: Dataset) -> None:
    an.refresh()
    an._state_path.unlink()
    assert not an.refresh().changed  # the state kept inside the snapshot says it is in step
    an.snapshot_path.write_bytes(b"not a duckdb file")
    an._state_path.unlink()
    stats = an.refresh()
    assert stats.rebuilt and rows(an, "select count(*) as n from turns") == [{"n": 6}]


def test_the_store_must_be_migrated(tmp_path: Path) -> None:
    from callbot_core.errors import ConfigError
    from callbot_core.store import Store

    empty = Store(f"sqlite:///{tmp_path / 'empty.db'}")
    with pytest.raises(ConfigError, match="callbot db upgrade"):
        Analytics(empty, tmp_path / "a.duckdb").refresh()
    empty.dispose()


# -- user queries: limits, timeouts, audit, export ------------------------------------------------------


def test_row_limit_marks_the_result_truncated(an: Analytics, data: Dataset) -> None:
    r = an.query("select * from range(50)", max_rows=10, actor=OP)
    assert len(r.rows) == 10 and r.truncated and r.columns == ["range"]
    r = an.query("select * from range(50)", max_rows=50, actor=OP)
    assert len(r.rows) == 50 and not r.truncated
    assert an.query("select 1 as x", max_rows=0, actor=OP).truncated


def test_a_slow_query_times_out_with_a_clear_error(an: Analytics, store, data: Dataset) -> None:
    with pytest.raises(QueryTimeout, match=r"timed out after 0.3 s"):
        an.query("select sum(hash(a.range * b.range)) from range(100000) a, range(100000) b", timeout_s=0.3,
                 actor=ADA)  # fmt: skip
    entry = audit.recent(store, limit=1, action_prefix="sql.", actor=OP)[0]
    assert entry.action == "sql.query" and entry.actor == "ada" and entry.detail["status"] == "timeout"
    assert an.query("select 1 as ok", actor=OP).rows == [(1,)]  # the connection is usable again


def test_every_user_query_is_audited(an: Analytics, store, data: Dataset) -> None:
    an.query("select persona from turns", actor=ADA, client_addr="10.0.0.7")
    with pytest.raises(ForbiddenSQL):
        an.query("drop table messages", actor=ADA)
    with pytest.raises(InvalidInput, match="The query failed"):
        an.query("select nope from turns", actor=ADA)
    entries = audit.recent(store, limit=3, action_prefix="sql.", actor=OP)[::-1]
    ok, refused, failed = entries
    assert ok.action == "sql.query" and ok.client_addr == "10.0.0.7" and ok.actor == "ada"
    assert ok.detail["sql"] == "select persona from turns" and ok.detail["rows"] == 6 and ok.detail["status"] == "ok"
    assert ok.detail["elapsed_ms"] >= 0 and ok.detail["truncated"] is False
    assert refused.action == "sql.refused" and "DROP" in refused.detail["error"]
    assert refused.detail["sql"] == "drop table messages"
    assert failed.action == "sql.query" and failed.detail["status"] == "failed" and "nope" in failed.detail["error"]


def test_export_writes_the_whole_result_atomically(an: Analytics, store, data: Dataset, tmp_path: Path) -> None:
    sql = "select turn_id, persona, ttft_ms from turns order by turn_id"
    for fmt in ("csv", "json", "parquet"):
        out = tmp_path / "out" / f"turns.{fmt}"
        assert an.export(sql, fmt, out, actor=ADA) == 6
        back = duckdb.sql(f"select * from '{out}'").fetchall()
        assert len(back) == 6 and back[0][1] == "receptionist"
    assert json.loads((tmp_path / "out" / "turns.json").read_text())[0]["persona"] == "receptionist"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["turns.csv", "turns.json", "turns.parquet"]
    with pytest.raises(ForbiddenSQL):
        an.export("copy turns to 'x.csv'", "csv", tmp_path / "x.csv", actor=OP)
    with pytest.raises(InvalidInput, match="Unknown export format"):
        an.export(sql, "xlsx", tmp_path / "x.xlsx", actor=OP)
    assert not (tmp_path / "x.csv").exists()
    assert audit.recent(store, limit=1, action_prefix="sql.export", actor=OP)[0].detail["rows"] == 6


def test_threads_and_processes_share_the_snapshot(an: Analytics, store, data: Dataset, tmp_path: Path) -> None:
    """Queries from threads and from another process interleave with writes to the store without errors."""
    errors: list[BaseException] = []
    script = (
        "import sys; from pathlib import Path; from callbot_core.store import Store; "
        "from callbot_core.analytics import Analytics; "
        "from callbot_core.access.permissions import LOCAL_OPERATOR as OP; "
        f"an = Analytics(Store({store.url!r}), Path({str(an.snapshot_path)!r})); "
        "[an.query('select count(*) from turns', actor=OP) for _ in range(15)]"
    )
    child = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)

    def work() -> None:
        try:
            for _ in range(8):
                an.query("select persona, count(*) from turns group by 1", actor=OP)
        except BaseException as exc:  # noqa: BLE001 - collected and asserted below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    with store.session() as s:
        add_conversation(
            s, version_of(s, "tutor"), backend="embedded", model="m1", user=None, started=at(12, 8),
            turns=[("Teach me", at(12, 8, 0, 5), "Gladly", 90.0, 400.0, 4, 50.0)],
        )  # fmt: skip
    for t in threads:
        t.join()
    _out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert not errors, errors
    assert rows(an, "select count(*) as n from turns") == [{"n": 7}]


def test_a_long_query_does_not_hold_up_other_readers(an: Analytics, data: Dataset) -> None:
    an.refresh()
    slow_error: list[BaseException] = []

    def slow() -> None:
        try:
            an.query(
                # Long enough for five short queries, each in a worker process of its own (~0.2 s to start), even
                # on a loaded machine; the test waits for this timeout, so it is not larger than it must be.
                "select sum(hash(a.range * b.range)) from range(100000) a, range(100000) b",
                timeout_s=12,
                actor=OP,
            )
        except QueryTimeout as exc:
            slow_error.append(exc)

    worker = threading.Thread(target=slow)
    worker.start()
    try:
        for _ in range(5):  # readers share the snapshot: these finish while the slow one still runs
            assert an.query("select count(*) from turns", actor=OP).rows == [(6,)]
        assert worker.is_alive()
    finally:
        worker.join()
    assert slow_error  # it ran into its own timeout, undisturbed


# -- dashboards ----------------------------------------------------------------------------------------


def test_dashboard_data_has_every_frame_with_the_right_numbers(an: Analytics, data: Dataset) -> None:
    frames = dashboard_data(an, DashboardFilters())
    assert set(frames) == set(DASHBOARD_QUERIES) == set(DASHBOARD_COLUMNS)
    for name, columns in DASHBOARD_COLUMNS.items():
        assert list(frames[name].columns) == columns, name

    groups = {(r["group_kind"], r["group_name"]): r for r in frames["latency_by_group"].to_dict("records")}
    assert set(groups) == {("persona", "receptionist"), ("persona", "support"), ("version", "receptionist@1"),
                           ("version", "receptionist@2"), ("version", "support@1"), ("backend", "embedded"),
                           ("backend", "ollama"), ("model", "m1"), ("model", "m2")}  # fmt: skip
    rec = groups[("persona", "receptionist")]
    assert rec["turns"] == 4 and rec["ttft_p50_ms"] == 160 and rec["ttft_p95_ms"] == pytest.approx(370)
    assert rec["total_p50_ms"] == 900 and rec["total_p95_ms"] == pytest.approx(6115)
    assert groups[("version", "receptionist@2")]["ttft_p50_ms"] == 260
    assert groups[("backend", "ollama")]["turns"] == 1  # the failed turn is not in the latencies
    assert groups[("model", "m1")]["total_p50_ms"] == 900

    hist = {(r["metric"], r["persona"], r["bucket_ms"]): r["turns"] for r in frames["latency_hist"].to_dict("records")}
    assert hist == {
        ("ttft_ms", "receptionist", 100): 2, ("ttft_ms", "receptionist", 200): 1, ("ttft_ms", "receptionist", 400): 1,
        ("ttft_ms", "support", 300): 1,
        ("total_ms", "receptionist", 500): 1, ("total_ms", "receptionist", 700): 1,
        ("total_ms", "receptionist", 1100): 1, ("total_ms", "receptionist", 7000): 1,  # 7000 ms: its own bucket
        ("total_ms", "support", 900): 1,
    }  # fmt: skip

    tps = {(str(r["day"])[:10], r["persona"]): r for r in frames["tokens_per_s_daily"].to_dict("records")}
    assert tps[("2026-01-10", "receptionist")]["mean_tokens_per_s"] == 24
    assert tps[("2026-01-11", "receptionist")]["p50_tokens_per_s"] == 35
    assert tps[("2026-01-11", "support")]["mean_tokens_per_s"] == 10

    conv = {
        (str(r["day"])[:10], r["persona"]): r["conversations"] for r in frames["conversations_daily"].to_dict("records")
    }
    assert conv == {("2026-01-10", "receptionist"): 1, ("2026-01-11", "receptionist"): 1, ("2026-01-11", "support"): 1}

    err = {(str(r["day"])[:10], r["backend"]): r for r in frames["error_rate_daily"].to_dict("records")}
    assert (err[("2026-01-11", "ollama")]["turns"], err[("2026-01-11", "ollama")]["failed"]) == (2, 1)
    assert err[("2026-01-11", "ollama")]["error_rate"] == 0.5 and err[("2026-01-10", "embedded")]["error_rate"] == 0

    talk = by(frames["talk_ratio"].to_dict("records"), "persona")
    assert talk["receptionist"]["conversations"] == 2
    assert (talk["receptionist"]["mean_user_words"], talk["receptionist"]["mean_bot_words"]) == (5.5, 8.5)
    assert talk["receptionist"]["talk_ratio"] == pytest.approx(11 / 17)
    assert talk["support"]["talk_ratio"] == pytest.approx(5 / 3)

    summaries = frames["summary_lengths"].to_dict("records")
    assert summaries == [{"persona": "receptionist", "summaries": 2, "mean_short_words": 2.5, "mean_full_words": 6.5}]
    assert frames["system_metrics"]["cpu_percent"].tolist() == [10.0, 30.0]


def test_dashboard_filters(an: Analytics, data: Dataset) -> None:
    support = dashboard_data(an, DashboardFilters(persona="support"))
    assert set(support["latency_by_group"]["group_name"]) == {"support", "support@1", "ollama", "m2"}
    assert support["talk_ratio"]["persona"].tolist() == ["support"] and support["summary_lengths"].empty

    since = dashboard_data(an, DashboardFilters(since=at(11, 0), until=at(12, 0)))
    assert since["conversations_daily"]["conversations"].sum() == 2
    assert since["latency_by_group"].query("group_kind == 'persona'")["turns"].sum() == 3
    assert since["system_metrics"]["cpu_percent"].tolist() == [30.0]  # taken_at in the range

    ollama = dashboard_data(an, DashboardFilters(backend="ollama"))
    assert ollama["error_rate_daily"]["backend"].tolist() == ["ollama"]
    assert ollama["conversations_daily"]["persona"].tolist() == ["support"]

    nothing = dashboard_data(an, DashboardFilters(since=at(20, 0)))
    for name, columns in DASHBOARD_COLUMNS.items():
        if name != "system_metrics":
            assert nothing[name].empty and list(nothing[name].columns) == columns


# -- the command line ----------------------------------------------------------------------------------


def test_callbot_sql_as_a_user_runs_it(cli, tmp_path: Path) -> None:
    from callbot_core.store import Store

    before = cli("sql", "select 1", ok=False)
    assert before.returncode == 1 and "callbot db upgrade" in before.stderr
    cli("db", "upgrade")
    store = Store(cli.url)
    build(store)
    store.dispose()

    table = cli("sql", "select persona, count(*) from turns group by 1 order by 1").stdout.splitlines()
    assert table[0].split() == ["persona", "count_star()"] and set(table[1]) <= {"-", " "}
    assert table[2].split() == ["receptionist", "4"] and table[3].split() == ["support", "2"]

    refused = cli("sql", "drop table messages", ok=False)
    assert refused.returncode == 1 and "DROP is refused" in refused.stderr and "Traceback" not in refused.stderr

    listing = cli("sql", "--list").stdout
    for doc in VIEW_DOCS:
        assert doc.name in listing
    assert "talk_ratio" in listing and "raw.messages" in listing

    as_csv = cli("sql", "select turn_id, persona from turns order by 1", "--format", "csv", "--max-rows", "2")
    assert as_csv.stdout.splitlines() == ["turn_id,persona", "1,receptionist", "2,receptionist"]
    assert "first 2" in as_csv.stderr
    as_json = json.loads(cli("sql", "select day, turns from daily_activity order by 1", "--format", "json").stdout)
    assert as_json == [{"day": "2026-01-10", "turns": 2}, {"day": "2026-01-11", "turns": 4}]

    out = tmp_path / "perf.parquet"
    assert (
        "Wrote 6 row(s)"
        in cli("sql", "select * from persona_performance", "--format", "parquet", "--out", str(out)).stdout
    )
    assert duckdb.sql(f"select count(*) from '{out}'").fetchone() == (6,)
    no_out = cli("sql", "select 1", "--format", "parquet", ok=False)
    assert no_out.returncode == 1 and "--out" in no_out.stderr
    slow = cli("sql", "select sum(hash(a.range * b.range)) from range(100000) a, range(100000) b", "--timeout", "0.2",
               ok=False)  # fmt: skip
    assert slow.returncode == 1 and "timed out after 0.2 s" in slow.stderr
