"""The SQL guard: every form of writing or reaching outside is refused with a message naming it; reads pass.

A second table checks the defence in depth: statements the guard would refuse also fail on the connection
that runs user SQL (read-only, no external access, configuration locked).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from callbot_core.analytics import Analytics, ForbiddenSQL, check_sql
from callbot_core.errors import CallbotError, InvalidInput

FORBIDDEN = [
    # (sql, words the message must contain)
    ("INSERT INTO messages VALUES (1)", "INSERT"),
    ("update conversations set status = 'ended'", "UPDATE"),
    ("DELETE FROM messages", "DELETE"),
    ("create table t as select 1", "CREATE"),
    ("CREATE VIEW v AS SELECT 1", "CREATE"),
    ("create macro m() as 1", "CREATE"),
    ("drop table messages", "DROP"),
    ("ALTER TABLE messages ADD COLUMN x INT", "ALTER"),
    ("ATTACH 'other.db' AS o", "ATTACH"),
    ("DETACH src", "DETACH"),
    ("COPY messages TO 'out.csv'", "COPY"),
    ("copy (select * from turns) to '/tmp/x.parquet' (format parquet)", "COPY"),
    ("COPY messages FROM 'in.csv'", "COPY"),
    ("EXPORT DATABASE 'dump'", "EXPORT"),
    ("INSTALL httpfs", "INSTALL"),
    ("FORCE INSTALL httpfs", "INSTALL"),
    ("LOAD httpfs", "LOAD"),
    ("PRAGMA version", "PRAGMA"),
    ("pragma table_info('turns')", "PRAGMA"),
    ("SET enable_external_access = true", "SET"),
    ("RESET threads", "RESET"),
    ("USE memory", "USE"),
    ("CALL pragma_version()", "CALL"),
    ("CHECKPOINT", "CHECKPOINT"),
    ("VACUUM", "VACUUM"),
    ("BEGIN TRANSACTION", "BEGIN"),
    ("EXPLAIN SELECT 1", "EXPLAIN"),
    ("select 1; select 2", "one statement at a time"),
    ("select * from turns; drop table messages", "found 2 statements (SELECT, DROP)"),
    ("SELECT * FROM read_csv('/etc/passwd')", "read_csv()"),
    ("select * from read_csv_auto('data.csv')", "read_csv_auto()"),
    ("select * from read_parquet('s3://bucket/x.parquet')", "read_parquet()"),
    ("select * from read_json_auto('x.json')", "read_json_auto()"),
    ("select * from read_text('/etc/hostname')", "read_text()"),
    ("select content from read_blob('/etc/hostname')", "read_blob()"),
    ("select * from glob('/home/*')", "glob()"),
    ("select * from sqlite_scan('data/runtime/callbot.db', 'users')", "sqlite_scan()"),
    ("select * from postgres_scan('host=x', 'public', 'users')", "postgres_scan()"),
    ("select * from query('select 1')", "query()"),
    ("select * from duckdb_settings()", "duckdb_settings()"),
    ("SELECT * FROM '/etc/passwd.csv'", "'/etc/passwd.csv'"),
    ('select * from "data/export.parquet"', "'data/export.parquet'"),
    ("select * from 'https://example.org/x.csv'", "'https://example.org/x.csv'"),
    ("with x as (select * from read_csv('a.csv')) select * from x", "read_csv()"),
    ("select (select count(*) from glob('*')) as n", "glob()"),
    ("select * from turns where persona in (select * from read_csv('p.csv'))", "read_csv()"),
    ("select * from turns, lateral read_csv('a.csv')", "read_csv()"),
    ("describe select * from read_parquet('x.parquet')", "read_parquet()"),
    ("select getenv('HOME')", "getenv()"),
    ("select nextval('seq')", "nextval()"),
]

ALLOWED = [
    "select persona, count(*) from turns group by 1",
    "SELECT * FROM persona_performance ORDER BY ttft_p95_ms DESC NULLS LAST;",
    "with t as (select * from turns where error is null) select persona, avg(ttft_ms) from t group by 1",
    "-- latest turns\nselect * from turns order by started_at desc limit 5",
    "/* block comment */ select 1",
    "values (1, 'a'), (2, 'b')",
    "from daily_activity select day, turns",
    "describe turns",
    "show tables",
    "summarize conversations_stats",
    "(select 1) union all (select 2)",
    "select * from range(10)",
    "select * from generate_series(1, 3)",
    "select * from raw.messages where words > 3",
    "select * from pragma_table_info('turns')",
    "select word_count('two words')",
    "select 'read_csv(''x'')' as looks_like_a_call",  # a string, not a call
]


@pytest.mark.parametrize(("sql", "named"), FORBIDDEN, ids=[s[:40] for s, _ in FORBIDDEN])
def test_forbidden_sql_is_refused_naming_what_was_found(sql: str, named: str) -> None:
    with pytest.raises(ForbiddenSQL) as info:
        check_sql(sql)
    assert named in str(info.value)
    assert isinstance(info.value, InvalidInput)  # front ends show it like any refused input


@pytest.mark.parametrize("sql", ALLOWED, ids=[s[:40] for s in ALLOWED])
def test_read_only_queries_are_allowed(sql: str) -> None:
    cleaned = check_sql(sql)
    assert cleaned and not cleaned.endswith(";")


@pytest.mark.parametrize("sql", ["", "   ", ";"])
def test_empty_sql_is_invalid(sql: str) -> None:
    with pytest.raises(InvalidInput, match="empty"):
        check_sql(sql)


def test_syntax_errors_are_invalid_input_not_refusals() -> None:
    with pytest.raises(InvalidInput, match="not valid SQL") as info:
        check_sql("selec persona from turns")
    assert not isinstance(info.value, ForbiddenSQL)


# The second line of defence: run through `Analytics.df` (trusted SQL, no guard) on the user connection.
UNGUARDED = [
    "CREATE TABLE x AS SELECT 1",
    "DROP VIEW turns",
    "INSERT INTO raw.messages (id) VALUES (1)",
    "SELECT * FROM read_csv('/etc/passwd')",
    "SELECT * FROM read_text('/etc/hostname')",
    "COPY (SELECT 1) TO '{tmp}/leak.csv'",
    "ATTACH '{tmp}/other.duckdb' AS o",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "INSTALL httpfs",
]


@pytest.fixture
def sqlite_analytics(tmp_path: Path) -> Analytics:
    from callbot_core.store import Store

    store = Store(f"sqlite:///{tmp_path / 'guard.db'}")
    store.upgrade()
    an = Analytics(store, tmp_path / "guard.duckdb")
    an.refresh()
    yield an
    store.dispose()


@pytest.mark.parametrize("sql", UNGUARDED)
def test_the_user_connection_itself_cannot_write_or_reach_outside(
    sqlite_analytics: Analytics, tmp_path: Path, sql: str
) -> None:
    with pytest.raises(CallbotError):
        sqlite_analytics.df(sql.format(tmp=tmp_path), refresh=False)
    assert not (tmp_path / "leak.csv").exists()
    assert sqlite_analytics.df("select count(*) as n from turns", refresh=False)["n"][0] == 0
