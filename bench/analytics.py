"""The dashboards' query set on a million messages: DuckDB snapshot against SQLite and PostgreSQL directly.

Generates 100,000 conversations with 1,000,000 messages and their turn metrics (numpy, seeded; written
through DuckDB's scanners, which bulk-load far faster than row inserts) into a fresh SQLite store and into
PostgreSQL (database `callbot_bench_analytics` on the server of `CALLBOT_TEST_DATABASE_URL`, default the
local server; created and dropped here). Every conversation has 10 messages: 95% are five good turns, 5%
have two failed turns (a caller message with no reply) among six. 90% are ended and summarised; backends,
models, personas (7 versions), users and channels are mixed.

Then, for each store:
- `initial_snapshot_s`: the first refresh (a full copy into the snapshot) and `refresh_nochange_ms`: the
  median refresh when nothing changed;
- the dashboards' query set (`callbot_core.analytics.dashboard.DASHBOARD_QUERIES`) through
  `dashboard_data`, end to end: refresh check, opening the snapshot, eight queries to DataFrames;
- the same eight queries written for SQLite and for PostgreSQL, run on the store directly;
- last (it changes the store), what a refresh costs after a turn, an ended conversation, a new one and a
  deleted one.

What is compared: the same results from the same rows. The direct queries read the store's own tables, so
they also do what the snapshot did once at copy time (join each turn to its caller message for the day,
count words). PostgreSQL's `percentile_cont` is DuckDB's `quantile_cont` (linear interpolation); SQLite has
no percentile function, so the same interpolation is written with window functions. Words are counted as
blanks + 1 directly (the generated texts are single-spaced, so this equals the snapshot's regex count).
The frames are checked against each other (`results_match`: every group and value equal within 1e-6).

Targets: `dashboard_total_s` <= 1.5 and `duckdb_vs_sqlite_ratio` >= 5.

    .venv/bin/python bench/analytics.py [--conversations 100000] [--runs 3] [--no-postgres]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import duckdb  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from sqlalchemy import create_engine, make_url, text  # noqa: E402

from bench._common import ANSWERS, QUESTIONS, SUMMARIES, emit, fresh_postgres_database, peak_rss_mb  # noqa: E402
from callbot_core.analytics import Analytics, DashboardFilters, dashboard_data  # noqa: E402
from callbot_core.analytics.dashboard import DASHBOARD_COLUMNS, DASHBOARD_QUERIES  # noqa: E402
from callbot_core.analytics.engine import libpq_conninfo, scanner_extension_path  # noqa: E402
from callbot_core.store import Store  # noqa: E402

BENCH_DB = "callbot_bench_analytics"
DAYS = 60
MESSAGES_PER_CONVERSATION = 10
FAILING_SHARE = 0.05
USERS = 20

# backend -> (share, models, ttft lognormal mu, tokens/s range)
BACKENDS = {
    "embedded": (0.6, ["SmolLM2-135M-Instruct.Q4_1"], 5.5, (50, 170)),
    "ollama": (0.25, ["llama3.2:1b", "qwen2.5:0.5b"], 6.0, (30, 80)),
    "openai": (0.15, ["gpt-4o-mini"], 6.3, (60, 120)),
}
ERRORS = ["Ollama at http://127.0.0.1:11434 is not reachable: connection refused", "stream stalled for 60 s"]


# -- data ------------------------------------------------------------------------------------------------


def generate(
    conversations: int, version_ids: list[int], user_ids: list[int], now: datetime, seed: int = 1234
) -> dict[str, pd.DataFrame]:
    """The three big tables as DataFrames (timestamps naive UTC, the last `DAYS` days before `now`), ids from 1."""
    rng = np.random.default_rng(seed)
    n = conversations
    now = np.datetime64(now.astimezone(UTC).replace(tzinfo=None, microsecond=0), "us")
    cid = np.arange(1, n + 1)
    started = now - (rng.uniform(0, DAYS * 86400, n) * 1e6).astype("timedelta64[us]")
    backend_names = list(BACKENDS)
    backend = rng.choice(backend_names, n, p=[b[0] for b in BACKENDS.values()])
    model = np.empty(n, dtype=object)
    for name, (_share, models, _mu, _tps) in BACKENDS.items():
        mask = backend == name
        model[mask] = rng.choice(models, mask.sum())
    weights = np.array([5, 2, 4, 2, 2, 1, 1][: len(version_ids)], dtype=float)
    version = rng.choice(version_ids, n, p=weights / weights.sum())
    user = rng.choice(np.array(user_ids + [0]), n)  # 0 -> NULL: a command-line conversation
    failing = rng.random(n) < FAILING_SHARE

    # Messages: 10 per conversation; a failing conversation has caller messages 0 and 7 unanswered.
    ok_roles = np.array(["user", "assistant"] * 5)
    fail_roles = np.array(["user", "user", "assistant", "user", "assistant", "user", "assistant", "user", "user",
                           "assistant"])  # fmt: skip
    m = MESSAGES_PER_CONVERSATION
    roles = np.where(np.repeat(failing, m), np.tile(fail_roles, n), np.tile(ok_roles, n))
    mid = np.arange(1, n * m + 1)
    mconv = np.repeat(cid, m)
    is_user = roles == "user"
    nxt_role = np.append(roles[1:], "user")
    last_slot = np.tile(np.arange(m) == m - 1, n)
    answered = is_user & (nxt_role == "assistant") & ~last_slot

    # Turns: one per caller message.
    t_msg = mid[is_user]
    t_conv = mconv[is_user]
    t_ok = answered[is_user]
    nt = len(t_msg)
    t_backend = np.repeat(backend, is_user.reshape(n, m).sum(axis=1))
    t_model = np.repeat(model, is_user.reshape(n, m).sum(axis=1))
    mu = np.select([t_backend == b for b in backend_names], [BACKENDS[b][2] for b in backend_names])
    lo = np.select([t_backend == b for b in backend_names], [BACKENDS[b][3][0] for b in backend_names])
    hi = np.select([t_backend == b for b in backend_names], [BACKENDS[b][3][1] for b in backend_names])
    ttft = rng.lognormal(mu, 0.35)
    tokens = rng.integers(30, 151, nt)
    tps = rng.uniform(lo, hi)
    total = ttft + tokens / tps * 1000
    fail_total = rng.choice([35.0, 60_000.0], nt)
    ttft = np.where(t_ok, ttft, np.nan)
    total = np.where(t_ok, total, fail_total)
    gap_s = rng.uniform(5, 40, nt)
    duration_s = gap_s + total / 1000
    # Each turn starts after the previous turns of its conversation (exclusive cumulative sum per group).
    turns_per_conv = is_user.reshape(n, m).sum(axis=1)
    ends = np.cumsum(duration_s)
    first = np.cumsum(turns_per_conv) - turns_per_conv
    before = ends - duration_s - np.repeat((ends - duration_s)[first], turns_per_conv)
    t_start = np.repeat(started, turns_per_conv) + ((before + gap_s) * 1e6).astype("timedelta64[us]")
    t_end = t_start + (total * 1000).astype("timedelta64[us]")

    created = np.empty(n * m, dtype="datetime64[us]")
    created[is_user] = t_start
    reply_at = np.full(n * m, np.datetime64("NaT", "us"))
    reply_at[np.flatnonzero(is_user)[t_ok] + 1] = t_end[t_ok]
    created[~is_user] = reply_at[~is_user]
    texts = np.where(is_user, rng.choice(QUESTIONS, n * m), rng.choice(ANSWERS, n * m))
    tokens_msg = np.where(is_user, np.char.str_len(texts.astype(str)) // 4, 0)
    tokens_msg[np.flatnonzero(is_user)[t_ok] + 1] = tokens[t_ok]

    ended = rng.random(n) < 0.9
    last_at = created.reshape(n, m).max(axis=1)
    summary_short = rng.choice(SUMMARIES, n).astype(object)
    summary_full = (summary_short + " " + rng.choice(SUMMARIES, n)).astype(object)
    summary_short[~ended] = None
    summary_full[~ended] = None
    conversations_df = pd.DataFrame(
        {
            "id": cid,
            "user_id": pd.array(np.where(user == 0, -1, user), dtype="Int64").astype("Int64"),
            "persona_version_id": version,
            "backend": backend,
            "model": model,
            "channel": rng.choice(["text", "voice"], n, p=[0.8, 0.2]),
            "started_at": started,
            "ended_at": np.where(ended, last_at + np.timedelta64(5, "s"), np.datetime64("NaT", "us")),
            "status": np.where(ended, "ended", "active"),
            "summary_short": summary_short,
            "summary_full": summary_full,
        }
    )
    conversations_df.loc[conversations_df["user_id"] == -1, "user_id"] = pd.NA
    messages_df = pd.DataFrame(
        {
            "id": mid,
            "conversation_id": mconv,
            "role": roles,
            "text": texts,
            "created_at": created,
            "token_count": tokens_msg,
        }
    )
    assistant = np.where(t_ok, t_msg + 1, -1)
    turns_df = pd.DataFrame(
        {
            "id": np.arange(1, nt + 1),
            "conversation_id": t_conv,
            "user_message_id": t_msg,
            "assistant_message_id": pd.array(assistant, dtype="Int64"),
            "backend": t_backend,
            "model": t_model,
            "ttft_ms": ttft,
            "total_ms": total,
            "prompt_tokens": rng.integers(60, 900, nt),
            "completion_tokens": pd.array(np.where(t_ok, tokens, -1), dtype="Int64"),
            "tokens_per_s": np.where(t_ok, tps, np.nan),
            "trimmed_messages": 0,
            "error": np.where(t_ok, None, rng.choice(ERRORS, nt)).astype(object),
            "created_at": t_end,
        }
    )
    turns_df.loc[turns_df["assistant_message_id"] == -1, "assistant_message_id"] = pd.NA
    turns_df.loc[turns_df["completion_tokens"] == -1, "completion_tokens"] = pd.NA
    return {"conversations": conversations_df, "messages": messages_df, "turn_metrics": turns_df}


def _ids(store: Store, sql: str) -> list[int]:
    with store.engine.connect() as c:
        return [int(r[0]) for r in c.execute(text(sql))]


def prepare(store: Store) -> tuple[list[int], list[int]]:
    """Users and two extra persona versions (rows the app would have), through the store's own engine."""
    now = datetime.now(UTC)
    with store.engine.begin() as c:
        c.execute(
            text(
                "INSERT INTO users (username, display_name, password_hash, role, created_at, failed_logins) "
                "VALUES (:u, :u, 'x', 'researcher', :now, 0)"
            ),
            [{"u": f"researcher{i:02d}", "now": now} for i in range(1, USERS + 1)],
        )
        for key in ("receptionist", "support"):
            c.execute(
                text(
                    "INSERT INTO persona_versions (persona_id, version, system_prompt, greeting, temperature, top_p, "
                    "max_tokens, created_at) SELECT persona_id, 2, system_prompt || ' Be brief.', greeting, "
                    "temperature, top_p, max_tokens, :now FROM persona_versions pv JOIN personas p "
                    "ON p.id = pv.persona_id WHERE p.key = :key AND pv.version = 1"
                ),
                {"key": key, "now": now},
            )
    return _ids(store, "SELECT id FROM persona_versions ORDER BY id"), _ids(store, "SELECT id FROM users ORDER BY id")


def load(store: Store, frames: dict[str, pd.DataFrame]) -> None:
    """Bulk-load the frames through DuckDB's scanner (read-write here: this is the bench's own store).

    DuckDB carries its own copy of SQLite; two copies in one process must never have the same file open at
    once (POSIX locks are per process, so neither would see the other's: see sqlite.org/howtocorrupt.html),
    hence the store's connections are closed first.
    """
    store.dispose()
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    con.execute("SET TimeZone = 'UTC'")
    postgres = store.dialect == "postgresql"
    kind = "postgres" if postgres else "sqlite"
    con.execute(f"LOAD '{scanner_extension_path(kind)}'")
    target = libpq_conninfo(store.url) if postgres else make_url(store.url).database
    quoted = target.replace("'", "''")
    con.execute(f"ATTACH '{quoted}' AS db (TYPE {kind})")

    def ts(col: str) -> str:
        # SQLite: the text the store writes; PostgreSQL: timestamptz from UTC.
        if postgres:
            return f"CAST({col} AS TIMESTAMPTZ)"
        return f"strftime({col}, '%Y-%m-%d %H:%M:%S.') || lpad(CAST(epoch_us({col}) % 1000000 AS VARCHAR), 6, '0')"

    for table, df in frames.items():
        con.register("frame", df)
        cols = list(df.columns)
        exprs = [ts(c) if str(df[c].dtype).startswith("datetime64") else c for c in cols]
        con.execute(f"INSERT INTO db.{table} ({', '.join(cols)}) SELECT {', '.join(exprs)} FROM frame")
        con.unregister("frame")
    con.execute("DETACH db")
    con.close()
    if postgres:
        with store.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
            for table in frames:
                # The store's sequences must continue after the ids written here, and the planner needs stats.
                c.execute(
                    text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))")
                )
                c.execute(text(f"ANALYZE {table}"))
    else:
        with store.engine.begin() as c:
            c.execute(text("ANALYZE"))


def fresh_postgres(url: str) -> Store:
    return fresh_postgres_database(url, BENCH_DB)


def drop_postgres(url: str) -> None:
    server = make_url(url)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
    admin.dispose()


# -- the same queries, straight on the store ------------------------------------------------------------

# Filters as the dashboard takes them; NULL means no filter (the bench runs unfiltered: everything counts).
_SQLITE_CONV = """
    SELECT c.id, c.started_at, c.backend, c.summary_short, c.summary_full, p.key AS persona, pv.version
    FROM conversations c
    JOIN persona_versions pv ON pv.id = c.persona_version_id
    JOIN personas p ON p.id = pv.persona_id
    WHERE (:since IS NULL OR c.started_at >= :since) AND (:until IS NULL OR c.started_at < :until)
      AND (:persona IS NULL OR p.key = :persona)
"""
_SQLITE_TURNS = f"""
    SELECT conv.persona, conv.persona || '@' || conv.version AS version, tm.backend, tm.model, tm.ttft_ms,
           tm.total_ms, tm.tokens_per_s, tm.error, date(um.created_at) AS day
    FROM turn_metrics tm
    JOIN ({_SQLITE_CONV}) conv ON conv.id = tm.conversation_id
    JOIN messages um ON um.id = tm.user_message_id
    WHERE (:backend IS NULL OR tm.backend = :backend)
"""
_SQLITE_CONV_B = _SQLITE_CONV + " AND (:backend IS NULL OR c.backend = :backend)"


def _words(col: str) -> str:
    return f"(CASE WHEN {col} IS NULL THEN NULL ELSE length({col}) - length(replace({col}, ' ', '')) + 1 END)"


def _sqlite_pct(value: str, q: float, rank: str) -> str:
    """`quantile_cont` by hand (SQLite has no percentile function): linear interpolation between the two
    ranks around q * (n - 1), over rows numbered by `rank` within their group of `n`."""
    lo = f"(1 + CAST({q} * (n - 1) AS INTEGER))"  # per row: n is the same on every row of a group
    low = f"max(CASE WHEN {rank} = {lo} THEN {value} END)"
    high = f"coalesce(max(CASE WHEN {rank} = {lo} + 1 THEN {value} END), {low})"
    pos = f"({q} * (max(n) - 1))"
    return f"({low} + ({pos} - CAST({pos} AS INTEGER)) * ({high} - {low}))"


SQLITE_QUERIES: dict[str, str] = {
    "latency_by_group": f"""
WITH t AS MATERIALIZED (SELECT * FROM ({_SQLITE_TURNS}) WHERE error IS NULL),
g AS (
    SELECT 'persona' AS group_kind, persona AS group_name, ttft_ms, total_ms FROM t
    UNION ALL SELECT 'version', version, ttft_ms, total_ms FROM t
    UNION ALL SELECT 'backend', backend, ttft_ms, total_ms FROM t
    UNION ALL SELECT 'model', model, ttft_ms, total_ms FROM t
),
r AS (
    SELECT group_kind, group_name, ttft_ms, total_ms,
           row_number() OVER (PARTITION BY group_kind, group_name ORDER BY ttft_ms) AS rt,
           row_number() OVER (PARTITION BY group_kind, group_name ORDER BY total_ms) AS rtot,
           count(*) OVER (PARTITION BY group_kind, group_name) AS n
    FROM g
)
SELECT group_kind, group_name, max(n) AS turns,
       {_sqlite_pct("ttft_ms", 0.5, "rt")} AS ttft_p50_ms, {_sqlite_pct("ttft_ms", 0.95, "rt")} AS ttft_p95_ms,
       {_sqlite_pct("total_ms", 0.5, "rtot")} AS total_p50_ms, {_sqlite_pct("total_ms", 0.95, "rtot")} AS total_p95_ms
FROM r GROUP BY group_kind, group_name ORDER BY group_kind, group_name
""",
    "latency_hist": f"""
WITH t AS MATERIALIZED (SELECT persona, ttft_ms, total_ms FROM ({_SQLITE_TURNS}) WHERE error IS NULL),
b AS (
    SELECT 'ttft_ms' AS metric, persona, ttft_ms AS ms FROM t WHERE ttft_ms IS NOT NULL
    UNION ALL SELECT 'total_ms', persona, total_ms FROM t WHERE total_ms IS NOT NULL
)
SELECT metric, persona, CAST(ms / 50 AS INTEGER) * 50 AS bucket_ms, count(*) AS turns
FROM b GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
""",
    "tokens_per_s_daily": f"""
WITH t AS (SELECT day, persona, tokens_per_s FROM ({_SQLITE_TURNS}) WHERE error IS NULL AND tokens_per_s IS NOT NULL),
r AS (SELECT day, persona, tokens_per_s, row_number() OVER (PARTITION BY day, persona ORDER BY tokens_per_s) AS rk,
             count(*) OVER (PARTITION BY day, persona) AS n FROM t)
SELECT day, persona, avg(tokens_per_s) AS mean_tokens_per_s,
       {_sqlite_pct("tokens_per_s", 0.5, "rk")} AS p50_tokens_per_s
FROM r GROUP BY day, persona ORDER BY day, persona
""",
    "conversations_daily": f"""
SELECT date(started_at) AS day, persona, count(*) AS conversations FROM ({_SQLITE_CONV_B}) GROUP BY 1, 2 ORDER BY 1, 2
""",
    "error_rate_daily": f"""
SELECT day, backend, count(*) AS turns, count(error) AS failed, CAST(count(error) AS REAL) / count(*) AS error_rate
FROM ({_SQLITE_TURNS}) GROUP BY day, backend ORDER BY day, backend
""",
    "talk_ratio": f"""
WITH c AS ({_SQLITE_CONV_B}),
w AS (
    SELECT conversation_id,
           sum(CASE WHEN role = 'user' THEN {_words("text")} END) AS user_words,
           sum(CASE WHEN role = 'assistant' THEN {_words("text")} END) AS bot_words
    FROM messages WHERE conversation_id IN (SELECT id FROM c) GROUP BY conversation_id
)
SELECT c.persona, count(*) AS conversations, avg(coalesce(w.user_words, 0)) AS mean_user_words,
       avg(coalesce(w.bot_words, 0)) AS mean_bot_words,
       CAST(sum(coalesce(w.user_words, 0)) AS REAL) / nullif(sum(coalesce(w.bot_words, 0)), 0) AS talk_ratio
FROM c LEFT JOIN w ON w.conversation_id = c.id GROUP BY c.persona ORDER BY c.persona
""",
    "summary_lengths": f"""
SELECT persona, count(*) AS summaries, avg({_words("summary_short")}) AS mean_short_words,
       avg({_words("summary_full")}) AS mean_full_words
FROM ({_SQLITE_CONV_B}) WHERE summary_short IS NOT NULL GROUP BY persona ORDER BY persona
""",
    "system_metrics": """
SELECT taken_at, host, cpu_percent, memory_percent, disk_percent, process_rss_mb FROM system_metrics
WHERE (:since IS NULL OR taken_at >= :since) AND (:until IS NULL OR taken_at < :until) ORDER BY taken_at, host
""",
}

_PG_CONV = """
    SELECT c.id, c.started_at, c.backend, c.summary_short, c.summary_full, p.key AS persona, pv.version
    FROM conversations c
    JOIN persona_versions pv ON pv.id = c.persona_version_id
    JOIN personas p ON p.id = pv.persona_id
    WHERE (CAST(:since AS timestamptz) IS NULL OR c.started_at >= CAST(:since AS timestamptz))
      AND (CAST(:until AS timestamptz) IS NULL OR c.started_at < CAST(:until AS timestamptz))
      AND (CAST(:persona AS text) IS NULL OR p.key = CAST(:persona AS text))
"""
_PG_TURNS = f"""
    SELECT conv.persona, conv.persona || '@' || conv.version AS version, tm.backend, tm.model, tm.ttft_ms,
           tm.total_ms, tm.tokens_per_s, tm.error, (um.created_at AT TIME ZONE 'UTC')::date AS day
    FROM turn_metrics tm
    JOIN ({_PG_CONV}) conv ON conv.id = tm.conversation_id
    JOIN messages um ON um.id = tm.user_message_id
    WHERE (CAST(:backend AS text) IS NULL OR tm.backend = CAST(:backend AS text))
"""
_PG_CONV_B = _PG_CONV + " AND (CAST(:backend AS text) IS NULL OR c.backend = CAST(:backend AS text))"


def _pg_pct(value: str, q: float) -> str:
    return f"percentile_cont({q}) WITHIN GROUP (ORDER BY {value})"


POSTGRES_QUERIES: dict[str, str] = {
    "latency_by_group": f"""
WITH t AS (SELECT * FROM ({_PG_TURNS}) x WHERE error IS NULL)
SELECT CASE WHEN GROUPING(persona) = 0 THEN 'persona' WHEN GROUPING(version) = 0 THEN 'version'
            WHEN GROUPING(backend) = 0 THEN 'backend' ELSE 'model' END AS group_kind,
       coalesce(persona, version, backend, model) AS group_name, count(*) AS turns,
       {_pg_pct("ttft_ms", 0.5)} AS ttft_p50_ms, {_pg_pct("ttft_ms", 0.95)} AS ttft_p95_ms,
       {_pg_pct("total_ms", 0.5)} AS total_p50_ms, {_pg_pct("total_ms", 0.95)} AS total_p95_ms
FROM t GROUP BY GROUPING SETS ((persona), (version), (backend), (model)) ORDER BY 1, 2
""",
    "latency_hist": f"""
WITH t AS (SELECT persona, ttft_ms, total_ms FROM ({_PG_TURNS}) x WHERE error IS NULL),
b AS (
    SELECT 'ttft_ms' AS metric, persona, ttft_ms AS ms FROM t WHERE ttft_ms IS NOT NULL
    UNION ALL SELECT 'total_ms', persona, total_ms FROM t WHERE total_ms IS NOT NULL
)
SELECT metric, persona, (floor(ms / 50) * 50)::bigint AS bucket_ms, count(*) AS turns
FROM b GROUP BY 1, 2, 3 ORDER BY 1, 2, 3
""",
    "tokens_per_s_daily": f"""
SELECT day, persona, avg(tokens_per_s) AS mean_tokens_per_s, {_pg_pct("tokens_per_s", 0.5)} AS p50_tokens_per_s
FROM ({_PG_TURNS}) x WHERE error IS NULL AND tokens_per_s IS NOT NULL GROUP BY day, persona ORDER BY day, persona
""",
    "conversations_daily": f"""
SELECT (started_at AT TIME ZONE 'UTC')::date AS day, persona, count(*) AS conversations
FROM ({_PG_CONV_B}) x GROUP BY 1, 2 ORDER BY 1, 2
""",
    "error_rate_daily": f"""
SELECT day, backend, count(*) AS turns, count(error) AS failed, count(error)::float / count(*) AS error_rate
FROM ({_PG_TURNS}) x GROUP BY day, backend ORDER BY day, backend
""",
    "talk_ratio": f"""
WITH c AS ({_PG_CONV_B}),
w AS (
    SELECT conversation_id,
           sum({_words("text")}) FILTER (WHERE role = 'user') AS user_words,
           sum({_words("text")}) FILTER (WHERE role = 'assistant') AS bot_words
    FROM messages WHERE conversation_id IN (SELECT id FROM c) GROUP BY conversation_id
)
SELECT c.persona, count(*) AS conversations, avg(coalesce(w.user_words, 0)) AS mean_user_words,
       avg(coalesce(w.bot_words, 0)) AS mean_bot_words,
       sum(coalesce(w.user_words, 0))::float / nullif(sum(coalesce(w.bot_words, 0)), 0) AS talk_ratio
FROM c LEFT JOIN w ON w.conversation_id = c.id GROUP BY c.persona ORDER BY c.persona
""",
    "summary_lengths": f"""
SELECT persona, count(*) AS summaries, avg({_words("summary_short")}) AS mean_short_words,
       avg({_words("summary_full")}) AS mean_full_words
FROM ({_PG_CONV_B}) x WHERE summary_short IS NOT NULL GROUP BY persona ORDER BY persona
""",
    "system_metrics": """
SELECT taken_at, host, cpu_percent, memory_percent, disk_percent, process_rss_mb FROM system_metrics
WHERE (CAST(:since AS timestamptz) IS NULL OR taken_at >= CAST(:since AS timestamptz))
  AND (CAST(:until AS timestamptz) IS NULL OR taken_at < CAST(:until AS timestamptz)) ORDER BY taken_at, host
""",
}

NO_FILTER = {"since": None, "until": None, "persona": None, "backend": None}


def run_direct(store: Store, queries: dict[str, str]) -> tuple[dict[str, pd.DataFrame], dict[str, float]]:
    """Each query on the store itself, timed; results as DataFrames for the cross-check."""
    frames: dict[str, pd.DataFrame] = {}
    times: dict[str, float] = {}
    with store.engine.connect() as conn:
        for name, sql in queries.items():
            start = time.perf_counter()
            result = conn.execute(text(sql), NO_FILTER)
            frames[name] = pd.DataFrame(result.fetchall(), columns=list(result.keys()))
            times[name] = (time.perf_counter() - start) * 1000
    return frames, times


# -- the cross-check -------------------------------------------------------------------------------------

_KEYS = {
    "latency_by_group": ["group_kind", "group_name"],
    "latency_hist": ["metric", "persona", "bucket_ms"],
    "tokens_per_s_daily": ["day", "persona"],
    "conversations_daily": ["day", "persona"],
    "error_rate_daily": ["day", "backend"],
    "talk_ratio": ["persona"],
    "summary_lengths": ["persona"],
    "system_metrics": ["taken_at", "host"],
}


def compare(duck: dict[str, pd.DataFrame], other: dict[str, pd.DataFrame]) -> list[str]:
    """Differences between DuckDB's frames and a direct run's (empty: the same results)."""
    problems = []
    for name, keys in _KEYS.items():
        a, b = duck[name].copy(), other[name].copy()
        if len(a) != len(b):
            problems.append(f"{name}: {len(a)} rows against {len(b)}")
            continue
        for df in (a, b):
            for k in keys:
                df[k] = df[k].astype(str).str[:10] if k == "day" else df[k].astype(str)
        a, b = a.sort_values(keys).reset_index(drop=True), b.sort_values(keys).reset_index(drop=True)
        if not a[keys].equals(b[keys]):
            problems.append(f"{name}: different groups")
            continue
        for col in DASHBOARD_COLUMNS[name]:
            if col in keys or a[col].dtype == object:
                continue
            x, y = a[col].astype(float).to_numpy(), b[col].astype(float).to_numpy()
            tol = 1e-6
            if not np.allclose(x, y, rtol=tol, atol=1e-9, equal_nan=True):
                worst = float(np.nanmax(np.abs(x - y) / np.maximum(np.abs(y), 1e-9)))
                problems.append(f"{name}.{col}: differs (worst relative {worst:.2e})")
    return problems


# -- the run ---------------------------------------------------------------------------------------------


def measure_duckdb(store: Store, snapshot: Path, runs: int) -> dict[str, Any]:
    an = Analytics(store, snapshot)
    start = time.perf_counter()
    first = an.refresh()
    initial_s = time.perf_counter() - start
    nochange = []
    for _ in range(max(5, runs)):
        stats = an.refresh()
        assert not stats.changed, stats
        nochange.append(stats.elapsed_ms)
    totals, per_query = [], []
    frames: dict[str, pd.DataFrame] = {}
    for _ in range(runs + 1):  # the first run warms the OS cache and is not counted
        timings: dict[str, float] = {}
        start = time.perf_counter()
        frames = an.frames(DASHBOARD_QUERIES, DashboardFilters().params(), timings=timings)
        totals.append(time.perf_counter() - start)
        per_query.append(timings)
    totals, per_query = totals[1:], per_query[1:]
    # dashboard_data itself, once, to show the frames the app gets are these.
    assert set(dashboard_data(an, DashboardFilters())) == set(frames)
    return {
        "initial_s": initial_s,
        "copied": first.copied,
        "nochange_ms": statistics.median(nochange),
        "total_s": statistics.median(totals),
        "per_query_ms": {k: statistics.median(t[k] for t in per_query) for k in per_query[0]},
        "frames": frames,
        "snapshot_mb": snapshot.stat().st_size / 1e6,
    }


def measure_direct(store: Store, queries: dict[str, str], runs: int) -> dict[str, Any]:
    totals, per_query = [], []
    frames: dict[str, pd.DataFrame] = {}
    for _ in range(runs + 1):  # the first run warms the caches and is not counted
        start = time.perf_counter()
        frames, times = run_direct(store, queries)
        totals.append(time.perf_counter() - start)
        per_query.append(times)
    totals, per_query = totals[1:], per_query[1:]
    return {
        "total_s": statistics.median(totals),
        "per_query_ms": {k: statistics.median(t[k] for t in per_query) for k in per_query[0]},
        "frames": frames,
    }


def measure_changes(store: Store, snapshot: Path) -> dict[str, float]:
    """What a refresh costs after what the app does (run last: it changes the store): a turn stored, a
    conversation ended and summarised, a new conversation, a conversation deleted. Median of 3 each."""
    from callbot_core.access.permissions import LOCAL_OPERATOR
    from callbot_core.conversations.transcripts import delete_conversation
    from callbot_core.store.models import Conversation, Message, TurnMetrics

    an = Analytics(store, snapshot)
    an.refresh()
    now = datetime.now(UTC)

    def turn(s: Any) -> None:
        cid = s.scalar(text("SELECT max(id) FROM conversations"))
        user = Message(conversation_id=cid, role="user", text="One more question", created_at=now)
        reply = Message(conversation_id=cid, role="assistant", text="One more answer", created_at=now)
        s.add_all([user, reply])
        s.flush()
        s.add(TurnMetrics(conversation_id=cid, user_message_id=user.id, assistant_message_id=reply.id,
                          backend="embedded", model="m", ttft_ms=200.0, total_ms=900.0, created_at=now))  # fmt: skip

    def end(s: Any) -> None:
        cid = s.scalar(text("SELECT min(id) FROM conversations WHERE status = 'active'")) or s.scalar(
            text("SELECT min(id) FROM conversations")
        )
        conv = s.get(Conversation, cid)
        conv.status, conv.ended_at, conv.summary_short, conv.summary_full = "ended", now, "Short.", "Full summary."

    def start(s: Any) -> None:
        version = s.scalar(text("SELECT min(id) FROM persona_versions"))
        s.add(Conversation(persona_version_id=version, backend="embedded", model="m", started_at=now))

    out: dict[str, float] = {}
    for name, change in (("turn", turn), ("end", end), ("new", start)):
        times = []
        for _ in range(3):
            with store.session() as s:
                change(s)
            times.append(an.refresh().elapsed_ms)
        out[f"refresh_after_{name}_ms"] = statistics.median(times)
    times = []
    for _ in range(3):
        with store.engine.connect() as c:
            cid = c.execute(text("SELECT min(id) FROM conversations")).scalar()
        delete_conversation(store, cid, actor=LOCAL_OPERATOR)
        times.append(an.refresh().elapsed_ms)
    out["refresh_after_delete_ms"] = statistics.median(times)
    return out


def seed_store(store: Store, conversations: int, now: datetime) -> tuple[dict[str, int], float]:
    """The same rows in every store (same seed, same `now`), so the engines' results can be compared."""
    store.upgrade()
    start = time.perf_counter()
    versions, users = prepare(store)
    frames = generate(conversations, versions, users, now)
    load(store, frames)
    return {k: len(v) for k, v in frames.items()}, time.perf_counter() - start


def _per_query_table(columns: dict[str, dict[str, float]]) -> str:
    names = list(DASHBOARD_QUERIES)
    head = f"{'query':20s}" + "".join(f"{c:>14s}" for c in columns)
    lines = [head]
    for name in [*names, "refresh"]:
        cells = []
        for col in columns.values():
            value = col.get(name)
            cells.append(f"{'-':>14s}" if value is None else f"{value:>11.1f} ms")
        lines.append(f"{name:20s}" + "".join(cells))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--conversations", type=int, default=100_000)
    parser.add_argument("--runs", type=int, default=3, help="measured runs of each query set (median)")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only")
    args = parser.parse_args()
    pg_url = os.environ.get("CALLBOT_TEST_DATABASE_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")

    with tempfile.TemporaryDirectory(prefix="callbot-bench-analytics-") as tmp:
        workdir = Path(tmp)
        sqlite_store = Store(f"sqlite:///{workdir / 'store.db'}")
        now = datetime.now(UTC)
        counts, seed_s = seed_store(sqlite_store, args.conversations, now)
        print(
            f"seeded SQLite: {counts['conversations']:,} conversations, {counts['messages']:,} messages, "
            f"{counts['turn_metrics']:,} turns in {seed_s:.1f} s", flush=True,
        )  # fmt: skip
        duck = measure_duckdb(sqlite_store, workdir / "snapshot-sqlite.duckdb", args.runs)
        print(
            f"snapshot from SQLite: initial {duck['initial_s']:.2f} s ({duck['snapshot_mb']:.0f} MB), "
            f"no-change refresh {duck['nochange_ms']:.1f} ms", flush=True,
        )  # fmt: skip
        sqlite_direct = measure_direct(sqlite_store, SQLITE_QUERIES, args.runs)
        problems = [f"sqlite {p}" for p in compare(duck["frames"], sqlite_direct["frames"])]
        changes = measure_changes(sqlite_store, workdir / "snapshot-sqlite.duckdb")
        print("refresh after a change (SQLite): " + ", ".join(f"{k} {v:.0f}" for k, v in changes.items()), flush=True)
        sqlite_store.dispose()

        pg: dict[str, Any] | None = None
        pg_duck: dict[str, Any] | None = None
        pg_changes: dict[str, float] = {}
        if not args.no_postgres:
            try:
                pg_store = fresh_postgres(pg_url)
                _counts, pg_seed_s = seed_store(pg_store, args.conversations, now)
            except Exception as exc:  # PostgreSQL down: say so, report -1, keep the SQLite figures
                print(f"postgres: not measured ({type(exc).__name__}: {str(exc).splitlines()[0]})")
            else:
                print(f"seeded PostgreSQL ({BENCH_DB}) in {pg_seed_s:.1f} s", flush=True)
                pg_duck = measure_duckdb(pg_store, workdir / "snapshot-postgres.duckdb", args.runs)
                print(
                    f"snapshot from PostgreSQL: initial {pg_duck['initial_s']:.2f} s, "
                    f"no-change refresh {pg_duck['nochange_ms']:.1f} ms", flush=True,
                )  # fmt: skip
                pg = measure_direct(pg_store, POSTGRES_QUERIES, args.runs)
                problems += [f"postgres {p}" for p in compare(pg_duck["frames"], pg["frames"])]
                problems += [f"snapshots {p}" for p in compare(duck["frames"], pg_duck["frames"])]
                pg_changes = measure_changes(pg_store, workdir / "snapshot-postgres.duckdb")
                print(
                    "refresh after a change (PostgreSQL): " + ", ".join(f"{k} {v:.0f}" for k, v in pg_changes.items()),
                    flush=True,
                )
                pg_store.dispose()
                drop_postgres(pg_url)

    columns = {"duckdb": duck["per_query_ms"] | {"refresh": duck["nochange_ms"]}}
    totals = [duck["total_s"]]
    if pg_duck is not None:
        columns["duckdb(pg)"] = pg_duck["per_query_ms"] | {"refresh": pg_duck["nochange_ms"]}
        totals.append(pg_duck["total_s"])
    columns["sqlite"] = sqlite_direct["per_query_ms"]
    totals.append(sqlite_direct["total_s"])
    if pg is not None:
        columns["postgres"] = pg["per_query_ms"]
        totals.append(pg["total_s"])
    print(f"\nmedian of {args.runs} runs per query set (DuckDB: snapshot after a no-change refresh)")
    print(_per_query_table(columns))
    print(f"{'total':20s}" + "".join(f"{v:>12.3f} s" for v in totals))
    print("results match across engines" if not problems else "RESULTS DIFFER:\n  " + "\n  ".join(problems))
    emit(
        dashboard_total_s=duck["total_s"],
        duckdb_vs_sqlite_ratio=sqlite_direct["total_s"] / duck["total_s"],
        duckdb_vs_postgres_ratio=(pg["total_s"] / duck["total_s"]) if pg else -1.0,
        refresh_nochange_ms=duck["nochange_ms"],
        initial_snapshot_s=duck["initial_s"],
        dashboard_total_s_pg_snapshot=pg_duck["total_s"] if pg_duck else -1.0,
        refresh_nochange_ms_pg=pg_duck["nochange_ms"] if pg_duck else -1.0,
        **changes,
        **{f"{k}_pg": v for k, v in pg_changes.items()},
        initial_snapshot_s_pg=pg_duck["initial_s"] if pg_duck else -1.0,
        sqlite_total_s=sqlite_direct["total_s"],
        postgres_total_s=pg["total_s"] if pg else -1.0,
        results_match=int(not problems),
        conversations=counts["conversations"],
        messages=counts["messages"],
        peak_rss_mb=peak_rss_mb(),
    )


if __name__ == "__main__":
    main()
