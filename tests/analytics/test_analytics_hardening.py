"""Analytics hardening (issue 10): bounded results, capped DuckDB, no password in any message, a damaged snapshot
that rebuilds itself, and CSV downloads a spreadsheet will not run."""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import sys
import threading
from pathlib import Path

import pandas as pd
import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from callbot_core.access.permissions import LOCAL_OPERATOR as OP
from callbot_core.analytics import Analytics, DashboardFilters, QueryTimeout, dashboard_data
from callbot_core.analytics import engine as engine_module
from callbot_core.analytics.charts import dashboard_table, table_bytes
from callbot_core.conversations.transcripts import export_conversations
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.store import Store
from callbot_core.store.models import AuditLog
from tests.analytics.test_analytics import ADA, add_conversation, at, build, version_of
from tests.conftest import PG_URL


@pytest.fixture
def an(store: Store, tmp_path: Path) -> Analytics:
    build(store)
    return Analytics(store, tmp_path / "analytics.duckdb")


def audit_details(store: Store) -> list[str]:
    """Every analytics audit row, as the text a reader of the log would see."""
    with store.session() as s:
        rows = s.scalars(select(AuditLog).where(AuditLog.action.startswith("sql.")).order_by(AuditLog.id)).all()
        return [json.dumps(r.detail) for r in rows]


# -- 5. results bounded in bytes, DuckDB capped, queries bounded in length -------------------------------

MEMORY_SCRIPT = """
import json, resource, sys
from pathlib import Path
from callbot_core.access.permissions import LOCAL_OPERATOR as OP
from callbot_core.analytics import Analytics
from callbot_core.errors import CallbotError
from callbot_core.store import Store

def vm():
    return int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()

an = Analytics(Store(sys.argv[1]), Path(sys.argv[2]))
an.query("select count(*) from turns", actor=OP)  # the snapshot is built and everything is imported
# A safety net for the machine only: without a bound the first query would try to build 100 GB in this process.
resource.setrlimit(resource.RLIMIT_AS, (vm() + 4 * 2**30, resource.getrlimit(resource.RLIMIT_AS)[1]))
out = {}
for name, sql in (("bomb", "select repeat('x', 100000000) from range(1000)"),
                  ("wide", "select repeat('x', 1000000) from range(1000)")):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    try:
        an.query(sql, actor=OP)
        error = None
    except CallbotError as exc:
        error = str(exc)
    out[name] = {"grew_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024, "error": error}
print(json.dumps(out))
"""


@pytest.mark.slow
def test_a_huge_result_never_reaches_the_process(tmp_path: Path) -> None:
    store = Store(f"sqlite:///{tmp_path / 'store.db'}")
    store.upgrade()
    build(store)
    store.dispose()
    proc = subprocess.run(
        [sys.executable, "-c", MEMORY_SCRIPT, f"sqlite:///{tmp_path / 'store.db'}", str(tmp_path / "a.duckdb")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    # 100 MB a row, 1000 rows: the query runs out of its own memory, outside this process.
    limit = f"{engine_module.QUERY_MEMORY_BYTES // 2**30} GB"
    assert out["bomb"]["error"] and "out of memory" in out["bomb"]["error"] and limit in out["bomb"]["error"]
    # 1 MB a row: DuckDB copes, and the result stops at the console's byte limit.
    assert out["wide"]["error"] and f"{engine_module.MAX_RESULT_BYTES // 2**20} MB" in out["wide"]["error"]
    for name in ("bomb", "wide"):
        assert out[name]["grew_mb"] < 150, out  # relative: the process's peak did not jump


def test_a_result_over_the_byte_limit_is_an_error_naming_it(an: Analytics, store: Store) -> None:
    sql = "select repeat('x', 10000) as t from range(1000)"  # ~10 MB, far under the row limit
    with pytest.raises(InvalidInput, match=r"over the SQL console's limit of 1 MB"):
        an.query(sql, max_rows=1000, max_bytes=2**20, actor=ADA)
    assert '"status": "failed"' in audit_details(store)[-1]
    # Under the limit the same kind of query is fine.
    assert len(an.query("select repeat('x', 10000) as t from range(50)", max_bytes=2**20, actor=OP).rows) == 50


def _bytes(text: str) -> float:
    number, unit = re.fullmatch(r"([\d.]+)\s*(\w+)", text.strip()).groups()  # type: ignore[union-attr]
    scale = {"bytes": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40, "KB": 1e3, "MB": 1e6, "GB": 1e9}
    return float(number) * scale[unit]


def test_duckdb_memory_and_temp_space_are_capped(an: Analytics) -> None:
    sql = "select current_setting('memory_limit') as m, current_setting('max_temp_directory_size') as t"
    memory, temp = an.query(sql, actor=OP).rows[0]
    assert _bytes(memory) <= 2 * 2**30, memory  # not 80% of the machine
    assert "%" not in temp and _bytes(temp) <= 16 * 2**30, temp  # not 90% of the free disk
    writer = an._connect_writer()  # the refresh's connection is capped too
    try:
        memory, temp = writer.execute(sql).fetchone()
    finally:
        writer.close()
    assert _bytes(memory) <= 4 * 2**30 and "%" not in temp and _bytes(temp) <= 32 * 2**30, (memory, temp)


def test_an_overlong_query_is_refused_before_it_is_audited_in_full(an: Analytics, store: Store) -> None:
    sql = "select 1 -- " + "x" * 5_000_000
    with pytest.raises(InvalidInput, match=r"5,000,012 characters.*limit is 100,000"):
        an.query(sql, actor=ADA)
    last = audit_details(store)[-1]
    assert len(last) < 5_000 and "5000012" in last  # the length is kept, not the text
    with pytest.raises(InvalidInput, match="limit is 100,000"):
        an.export(sql, "csv", Path("never.csv"), actor=ADA)
    assert len(audit_details(store)[-1]) < 5_000


# -- 6. no password in any message --------------------------------------------------------------------


@pytest.mark.postgres
def test_a_failed_attach_shows_no_password(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    if not PG_URL:
        pytest.skip("PostgreSQL tests need CALLBOT_TEST_DATABASE_URL")
    # Trust authentication takes any password: the store works with this one, so only the ATTACH fails.
    url = make_url(PG_URL).set(password="s3cretpw")
    store = Store(url.render_as_string(hide_password=False))
    store.upgrade()
    bad = url.set(database="no_such_db").render_as_string(hide_password=False)
    real = engine_module.libpq_conninfo
    monkeypatch.setattr(engine_module, "libpq_conninfo", lambda _url: real(bad))
    monkeypatch.setattr(engine_module, "NATIVE_MAX_ROWS", -1)  # every copy goes through the scanner's ATTACH
    try:
        an = Analytics(store, tmp_path / "a.duckdb")
        with pytest.raises(CallbotError) as info:
            an.query("select count(*) from turns", actor=ADA)
        assert "no_such_db" in str(info.value) and "s3cretpw" not in str(info.value)
        with pytest.raises(CallbotError) as info:
            dashboard_data(an, DashboardFilters())
        assert "s3cretpw" not in str(info.value)
        details = audit_details(store)
        assert details and not [d for d in details if "s3cretpw" in d]
    finally:
        store.dispose()


@pytest.mark.postgres
def test_a_store_that_cannot_be_reached_shows_no_password(tmp_path: Path) -> None:
    if not PG_URL:
        pytest.skip("PostgreSQL tests need CALLBOT_TEST_DATABASE_URL")
    bad = make_url(PG_URL).set(password="s3cretpw", database="no_such_db").render_as_string(hide_password=False)
    store = Store(bad)
    try:
        with pytest.raises(CallbotError) as info:  # the store's own error, not a failure to audit it
            Analytics(store, tmp_path / "a.duckdb").query("select count(*) from turns", actor=ADA)
        assert "no_such_db" in str(info.value) and "s3cretpw" not in str(info.value)
    finally:
        store.dispose()


def test_a_password_in_a_query_error_or_the_sql_is_not_shown_or_audited(an: Analytics, store: Store) -> None:
    sql = "select cast('postgresql://ada:hunter22@db.example/prod' as integer)"
    with pytest.raises(InvalidInput, match="The query failed") as info:
        an.query(sql, actor=ADA)
    assert "hunter22" not in str(info.value) and "db.example" in str(info.value)
    assert not [d for d in audit_details(store) if "hunter22" in d]


# -- 7. a damaged snapshot rebuilds itself ----------------------------------------------------------------


def _expect_the_right_data(an: Analytics) -> None:
    assert an.query("select count(*) from turns", actor=OP).rows == [(6,)]
    assert an.query("select count(*), sum(words) from messages", actor=OP).rows == [(12, 36)]
    frames = dashboard_data(an, DashboardFilters())
    assert frames["conversations_daily"]["conversations"].sum() == 3


def test_a_snapshot_full_of_garbage_rebuilds_itself(an: Analytics) -> None:
    _expect_the_right_data(an)
    size = an.snapshot_path.stat().st_size
    an.snapshot_path.write_bytes(b"\x5a" * size)  # the sidecar still says "in step": no refresh will happen
    _expect_the_right_data(an)
    an.snapshot_path.write_bytes(b"garbage")
    frames = dashboard_data(an, DashboardFilters())  # the dashboards' path recovers as well
    assert frames["conversations_daily"]["conversations"].sum() == 3


@pytest.mark.parametrize("keep", [0.1, 0.5, 0.6, 0.75, 0.9])
def test_a_truncated_snapshot_rebuilds_itself(an: Analytics, keep: float) -> None:
    _expect_the_right_data(an)
    data = an.snapshot_path.read_bytes()
    an.snapshot_path.write_bytes(data[: int(len(data) * keep)])
    _expect_the_right_data(an)


@pytest.mark.parametrize("keep", [0.5, 0.9])
def test_a_damaged_snapshot_is_rebuilt_when_the_store_changed_too(an: Analytics, store: Store, keep: float) -> None:
    _expect_the_right_data(an)
    data = an.snapshot_path.read_bytes()
    an.snapshot_path.write_bytes(data[: int(len(data) * keep)])
    with store.session() as s:
        add_conversation(
            s, version_of(s, "tutor"), backend="embedded", model="m1", user=None, started=at(12, 8),
            turns=[("Teach me", at(12, 8, 0, 5), "Gladly", 90.0, 400.0, 4, 50.0)],
        )  # fmt: skip
    assert an.query("select count(*) from turns", actor=OP).rows == [(7,)]


def test_threads_that_find_the_snapshot_damaged_rebuild_it_once(an: Analytics, monkeypatch: pytest.MonkeyPatch) -> None:
    _expect_the_right_data(an)
    an.snapshot_path.write_bytes(b"garbage")
    builds: list[int] = []
    build_locked = Analytics._refresh_locked
    monkeypatch.setattr(Analytics, "_refresh_locked", lambda self: (builds.append(1), build_locked(self))[1])
    results: list[object] = []

    def count() -> None:
        try:
            results.append(an.query("select count(*) from turns", actor=OP).rows)
        except BaseException as exc:  # noqa: BLE001 - asserted below
            results.append(exc)

    threads = [threading.Thread(target=count) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [[(6,)]] * 3 and len(builds) == 1  # the others found it rebuilt


# -- 9. CSV downloads a spreadsheet will not run ------------------------------------------------------------

FORMULAS = ["=1+1", "+1", "-1", "@SUM(A1)", "\tx", "\ry", "plain", None]


def test_table_bytes_neutralises_text_cells_and_keeps_numbers() -> None:
    frame = pd.DataFrame({"text": FORMULAS, "n": [-3, 2, -1, 0, 5, 6, 7, 8], "x": [-1.5] * 8})
    back = pd.read_csv(pd.io.common.BytesIO(table_bytes(frame, "csv")), keep_default_na=False)
    assert back["text"].tolist() == ["'=1+1", "'+1", "'-1", "'@SUM(A1)", "'\tx", "'\ry", "plain", ""]
    assert back["n"].tolist() == [-3, 2, -1, 0, 5, 6, 7, 8] and back["x"].tolist() == [-1.5] * 8
    # The dashboards' data download goes through the same function.
    table = dashboard_table({"talk_ratio": pd.DataFrame({"persona": ["=cmd|' /C calc'!A0"], "talk_ratio": [-0.5]})})
    assert table_bytes(table, "csv").decode().splitlines()[1] == "talk_ratio,'=cmd|' /C calc'!A0,-0.5"


def test_transcript_csv_exports_apply_the_same_rule(store: Store) -> None:
    with store.session() as s:
        add_conversation(
            s, version_of(s, "tutor"), backend="embedded", model="m1", user=None, started=at(12, 8),
            turns=[("=1+1", at(12, 8, 0, 5), "-3 is the answer", 90.0, 400.0, 4, 50.0)],
        )  # fmt: skip
    out = io.StringIO()
    export_conversations(store, "csv", out)
    rows = list(csv.DictReader(io.StringIO(out.getvalue())))
    assert [r["text"] for r in rows] == ["'=1+1", "'-3 is the answer"]
    assert rows[1]["ttft_ms"] == "90.0"  # numbers are left alone


def test_a_csv_export_neutralises_text_cells(an: Analytics, tmp_path: Path) -> None:
    sql = "select * from (values ('=1+1', -3), ('@x', 4), ('ok', -5)) t(text, n)"
    assert an.export(sql, "csv", tmp_path / "out.csv", actor=OP) == 3
    assert (tmp_path / "out.csv").read_text().splitlines() == ["text,n", "'=1+1,-3", "'@x,4", "ok,-5"]
    an.export(sql, "parquet", tmp_path / "out.parquet", actor=OP)  # typed data is left as it is
    assert pd.read_parquet(tmp_path / "out.parquet")["text"].tolist() == ["=1+1", "@x", "ok"]


def test_an_export_stopped_by_its_timeout_leaves_no_file(an: Analytics, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    sql = "select a.range, hash(a.range * b.range) from range(100000) a, range(100000) b"
    with pytest.raises(QueryTimeout):
        an.export(sql, "csv", out / "big.csv", actor=OP, timeout_s=0.5)
    assert list(out.iterdir()) == []


def test_callbot_sql_csv_neutralises_text_cells(cli, tmp_path: Path) -> None:
    cli("db", "upgrade")
    sql = "select * from (values ('=HYPERLINK(1)', -3), ('+1', 2)) t(text, n)"
    printed = cli("sql", sql, "--format", "csv").stdout.splitlines()
    assert printed == ["text,n", "'=HYPERLINK(1),-3", "'+1,2"]
    cli("sql", sql, "--format", "csv", "--out", str(tmp_path / "q.csv"))
    assert (tmp_path / "q.csv").read_text().splitlines() == printed
