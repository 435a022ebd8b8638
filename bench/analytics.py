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
- the same eight queries written for SQLite and for PostgreSQL, run on the store directly.

What is compared: the same results from the same rows. The direct queries read the store's own tables, so
they also do what the snapshot did once at copy time (join each turn to its caller message for the day,
count words). PostgreSQL's `percentile_cont` is DuckDB's `quantile_cont` (linear interpolation); SQLite has
no percentile function, so its percentiles are the lower nearest rank by window functions. Words are counted
as blanks + 1 directly (the generated texts are single-spaced, so this equals the snapshot's regex count).
The results are checked against each other (`results_match`): exactly for counts and means, percentiles
within 2% for SQLite.

Targets: `dashboard_total_s` <= 1.5 and `duckdb_vs_sqlite_ratio` >= 5.

    .venv/bin/python bench/analytics.py [--conversations 100000] [--runs 3] [--no-postgres]
"""

from __future__ import annotations

import argparse
import math
import os
import sqlite3
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

from bench._common import emit, peak_rss_mb  # noqa: E402
from callbot_core.analytics import Analytics, DashboardFilters, dashboard_data  # noqa: E402
from callbot_core.analytics.dashboard import DASHBOARD_COLUMNS, DASHBOARD_QUERIES  # noqa: E402
from callbot_core.analytics.engine import libpq_conninfo, scanner_extension_path  # noqa: E402
from callbot_core.store import Store  # noqa: E402

BENCH_DB = "callbot_bench_analytics"
DAYS = 60
MESSAGES_PER_CONVERSATION = 10
FAILING_SHARE = 0.05
USERS = 20

QUESTIONS = [
    "What are your opening hours?",
    "Can I book an appointment for Tuesday morning?",
    "My order hasn't arrived yet, can you check it?",
    "How much does the premium plan cost?",
    "Could you explain the past perfect tense?",
    "Is there parking near the clinic?",
    "I'd like to cancel my subscription.",
    "Do you offer a discount for students?",
    "How do I reset my password?",
    "Can you remind me what we discussed last week?",
    "What documents should I bring?",
    "Is the doctor available on Saturday?",
]
ANSWERS = [
    "We're open Monday to Friday from 8am to 6pm, and on Saturday mornings from 9am to noon.",
    "Certainly. I have 9:30 or 11:00 available on Tuesday; which would suit you better?",
    "I'm sorry about the delay. Let me look that up: your parcel left our warehouse yesterday.",
    "The premium plan is 29 euros a month, billed monthly, and you can cancel at any time.",
    "We use the past perfect for an action that happened before another past action.",
    "Yes, there's a public car park right behind the building, free for the first two hours.",
    "I can help with that. Before I cancel, may I ask what made you decide to leave?",
    "We do: students get 20 percent off with a valid student card.",
    "Of course. Is there anything else I can help you with today?",
]
SUMMARIES = [
    "The caller asked about opening hours and booked an appointment.",
    "The customer reported a late order; the agent tracked the parcel and promised an update.",
    "The prospect asked about pricing and agreed to a follow-up call.",
    "The learner practised tenses and asked for more examples.",
    "The user asked general questions and was satisfied with the answers.",
]
# backend -> (share, models, ttft lognormal mu, tokens/s range)
BACKENDS = {
    "embedded": (0.6, ["SmolLM2-135M-Instruct.Q4_1"], 5.5, (50, 170)),
    "ollama": (0.25, ["llama3.2:1b", "qwen2.5:0.5b"], 6.0, (30, 80)),
    "openai": (0.15, ["gpt-4o-mini"], 6.3, (60, 120)),
}
ERRORS = ["Ollama at http://127.0.0.1:11434 is not reachable: connection refused", "stream stalled for 60 s"]


# -- data ------------------------------------------------------------------------------------------------


def generate(conversations: int, version_ids: list[int], user_ids: list[int], seed: int = 1234) -> dict[str, pd.DataFrame]:
    """The three big tables as DataFrames (timestamps naive UTC), with ids from 1."""
    rng = np.random.default_rng(seed)
    n = conversations
    now = np.datetime64(datetime.now(UTC).replace(tzinfo=None, microsecond=0), "us")
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
        return f"CAST({col} AS TIMESTAMPTZ)" if postgres else f"strftime({col}, '%Y-%m-%d %H:%M:%S.%f')"

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
                c.execute(text(f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), (SELECT max(id) FROM {table}))"))
                c.execute(text(f"ANALYZE {table}"))
    else:
        with store.engine.begin() as c:
            c.execute(text("ANALYZE"))


def fresh_postgres(url: str) -> Store:
    server = make_url(url)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
        conn.execute(text(f'CREATE DATABASE "{BENCH_DB}"'))
    admin.dispose()
    return Store(server.set(database=BENCH_DB).render_as_string(hide_password=False))


def drop_postgres(url: str) -> None:
    server = make_url(url)
    admin = create_engine(server.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(text(f'DROP DATABASE IF EXISTS "{BENCH_DB}" WITH (FORCE)'))
    admin.dispose()
