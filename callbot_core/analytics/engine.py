"""DuckDB over the store: an analytics snapshot kept in step with the store, and guarded user SQL.

The store (SQLite or PostgreSQL) is attached READ_ONLY through DuckDB's scanner extensions, loaded from
the `duckdb-extension-*-scanner` packages (never INSTALLed: that would need the internet). Queries do not
run over the attachment: the scanners read row by row and were measured ~3x slower than DuckDB's own
tables on a dashboard-like query set. Instead the store's tables are copied into a snapshot in DuckDB's
own format (`<runtime>/analytics.duckdb`) and kept in step incrementally before every query:

- a probe on the store (one cheap native query: counts, maximum ids, a few aggregates over conversations,
  a hash of the small tables) is compared with what the snapshot holds; equal means nothing to do, and
  the snapshot is not even opened for writing;
- messages, turn metrics and system metrics are append-only: rows above the snapshot's highest id are
  copied (on PostgreSQL also a margin below it, since ids are handed out before commit and a slower
  transaction can commit a lower id later);
- conversations are copied by id, and when their aggregates (status, ended_at, summaries, user) no longer
  match, they are compared row by row: updated rows are updated, deleted ones are removed with their
  messages and turns. A conversation replaced under a reused id (SQLite hands out the highest id again
  after it was deleted) has a different start time and is treated as deleted and new;
- users, personas and persona versions are small and copied whole when their hash changes.

Several processes use the snapshot (the app, the CLI, report kernels, pipelines) and DuckDB lets only one
process open a file for writing. So no connection is held between calls: each call takes
`<snapshot>.lock` with `fcntl.flock` (exclusive to refresh, shared to read), opens the snapshot, works and
closes it. Threads of one process are serialised by a lock per snapshot file on top, because DuckDB
refuses two connections to one file with different settings within one process.

User SQL runs on a connection opened read-only with external access disabled and its configuration
locked, after `check_sql` (guard.py) has accepted it: a statement the guard missed still cannot write,
read files or reach the network. Every user query is written to the audit log.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import make_url

from .. import audit
from ..errors import CallbotError, ConfigError, InvalidInput
from ..settings import Settings, get_settings
from ..store import Store, open_store
from .guard import ForbiddenSQL, check_sql
from .views import MACROS, SNAPSHOT_FORMAT, TABLES, VIEWS

__all__ = ["Analytics", "QueryResult", "QueryTimeout", "RefreshStats", "scanner_extension_path", "libpq_conninfo"]

SNAPSHOT_NAME = "analytics.duckdb"
SOURCE = "src"  # the attached store's catalog name inside the refresh connection
APPEND_ONLY = ("messages", "turn_metrics")
SMALL_TABLES = ("users", "personas", "persona_versions")
# Ids a PostgreSQL transaction may still commit below the highest id already copied (see the docstring).
PG_ID_MARGIN = 1000
STAGE_CHUNK = 100_000  # rows per batch when staging SQLite rows: bounded memory on the first copy
LOCK_WAIT_S = 120.0
READER_MEMORY_LIMIT = "2GB"
EXPORT_FORMATS = ("csv", "json", "parquet")

_EXTENSION_PACKAGES = {"sqlite": "duckdb_extension_sqlite_scanner", "postgres": "duckdb_extension_postgres_scanner"}
_process_locks: dict[str, threading.RLock] = {}
_process_locks_guard = threading.Lock()


class QueryTimeout(InvalidInput):
    """A user query ran longer than its timeout and was interrupted."""


@dataclass(slots=True)
class RefreshStats:
    """What a refresh did: rows written per table (inserted or updated), rows removed, and how long it took."""

    copied: dict[str, int]
    elapsed_ms: float
    changed: bool
    deleted: dict[str, int] = field(default_factory=dict)
    rebuilt: bool = False


@dataclass(slots=True)
class QueryResult:
    columns: list[str]
    rows: list[tuple]
    truncated: bool
    elapsed_ms: float

    def to_df(self) -> pd.DataFrame:
        return pd.DataFrame.from_records(self.rows, columns=self.columns)


# -- extensions and the store's address ----------------------------------------------------------------


def scanner_extension_path(kind: str) -> Path:
    """The scanner extension file shipped in its PyPI package, for `LOAD '<path>'` without the internet."""
    package = _EXTENSION_PACKAGES[kind]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.origin:
        raise ConfigError(f"The DuckDB {kind} scanner is missing: install {package.replace('_', '-')}=={duckdb.__version__}")
    base = Path(spec.origin).parent / "extensions"
    found = sorted(base.glob(f"v{duckdb.__version__}/*.duckdb_extension"))
    if not found:
        raise ConfigError(
            f"{package} has no extension for DuckDB {duckdb.__version__} under {base}: "
            f"pin {package.replace('_', '-')}=={duckdb.__version__}"
        )
    return found[0]


def _conninfo_value(value: str) -> str:
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def libpq_conninfo(url: str) -> str:
    """A libpq connection string (`host=… dbname=…`) for a SQLAlchemy PostgreSQL URL."""
    u = make_url(url)
    parts: dict[str, str] = {}
    if u.host:
        parts["host"] = u.host
    if u.port:
        parts["port"] = str(u.port)
    if u.username:
        parts["user"] = u.username
    if u.password:
        parts["password"] = str(u.password)
    if u.database:
        parts["dbname"] = u.database
    for key, value in u.query.items():  # sslmode, host=/socket/dir, application_name, …
        parts[key] = value if isinstance(value, str) else value[-1]
    return " ".join(f"{k}={_conninfo_value(v)}" for k, v in parts.items())


def _sqlite_path(url: str) -> str:
    database = make_url(url).database
    if not database or database == ":memory:":
        raise ConfigError("Analytics needs a SQLite store in a file, not an in-memory database")
    return database


def _quote(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


def _naive_utc(value: Any) -> str | None:
    """A timestamp as the snapshot writes it: ISO, UTC, no zone, microseconds."""
    if value is None:
        return None
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value.isoformat(sep=" ", timespec="microseconds")


def _error_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


# -- the snapshot ---------------------------------------------------------------------------------------


class Analytics:
    """The analytics handle: one per process is enough, and it is safe to share between threads."""

    def __init__(self, store: Store, snapshot_path: Path) -> None:
        self.store = store
        self.dialect = store.dialect
        if self.dialect not in ("sqlite", "postgresql"):
            raise ConfigError(f"Analytics supports SQLite and PostgreSQL stores, not {self.dialect}")
        self.snapshot_path = Path(snapshot_path)
        self.snapshot_path.parent.mkdir(parents=True, exist_ok=True)
        self._lock_path = self.snapshot_path.with_name(self.snapshot_path.name + ".lock")
        self._state_path = self.snapshot_path.with_name(self.snapshot_path.name + ".state.json")
        key = str(self.snapshot_path.resolve())
        with _process_locks_guard:
            self._thread_lock = _process_locks.setdefault(key, threading.RLock())
        # The snapshot is tied to one store: a different URL (password left out) means a rebuild.
        self._source_id = hashlib.sha256(
            make_url(store.url).render_as_string(hide_password=True).encode()
        ).hexdigest()[:16]
        self._closed = False

    @classmethod
    def open(
        cls, settings: Settings | None = None, *, database_url: str | None = None, snapshot_path: Path | None = None
    ) -> Analytics:
        """Analytics over the configured store (or `database_url`).

        The default snapshot is `<runtime_dir>/analytics.duckdb`; for a `database_url` other than the
        configured one it is `analytics-<hash>.duckdb` beside it, so two stores never fight over one file.
        """
        settings = settings or get_settings()
        configured = settings.resolved_database_url()
        url = database_url or configured
        store = open_store(settings, url=url)
        if snapshot_path is None:
            name = SNAPSHOT_NAME
            if url != configured:
                name = f"analytics-{hashlib.sha256(url.encode()).hexdigest()[:10]}.duckdb"
            snapshot_path = settings.resolved_runtime_dir() / name
        return cls(store, snapshot_path)

    def close(self) -> None:
        """Nothing is held between calls; this only marks the handle closed."""
        self._closed = True

    def __enter__(self) -> Analytics:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- locking --------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _locked(self, exclusive: bool) -> Iterator[int]:
        if self._closed:
            raise CallbotError("This analytics handle is closed")
        with self._thread_lock:
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield fd
            finally:
                os.close(fd)  # closing the descriptor releases the flock

    def _flock(self, fd: int, mode: int) -> None:
        deadline = time.monotonic() + LOCK_WAIT_S
        while True:
            try:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CallbotError(
                        f"The analytics snapshot {self.snapshot_path} stayed busy for {LOCK_WAIT_S:.0f} s "
                        "(another process is refreshing it); try again"
                    ) from None
                time.sleep(0.02)

    @contextlib.contextmanager
    def _reading(self, refresh: bool) -> Iterator[tuple[duckdb.DuckDBPyConnection, RefreshStats | None]]:
        """Refresh under the exclusive lock, then read under a shared one: readers in other processes may
        run at the same time, but never while one of them writes."""
        with self._locked(exclusive=True) as fd:
            stats = self._refresh_locked() if refresh or not self.snapshot_path.exists() else None
            self._flock(fd, fcntl.LOCK_SH)  # downgrade: other readers may come in now
            conn = self._connect_reader()
            try:
                yield conn, stats
            finally:
                conn.close()

    # -- connections ----------------------------------------------------------------------------------

    def _connect_writer(self) -> duckdb.DuckDBPyConnection:
        config = {"autoinstall_known_extensions": False, "autoload_known_extensions": False}
        conn = duckdb.connect(str(self.snapshot_path), config=config)
        # PostgreSQL timestamptz values are cast to the snapshot's zone-less UTC timestamps in this zone.
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    def _connect_reader(self) -> duckdb.DuckDBPyConnection:
        config = {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "memory_limit": READER_MEMORY_LIMIT,
            # Defence in depth behind the guard: no files, no network, no ATTACH/INSTALL/LOAD.
            "enable_external_access": False,
        }
        conn = duckdb.connect(str(self.snapshot_path), read_only=True, config=config)
        try:
            conn.execute("SET TimeZone = 'UTC'")
            conn.execute("SET lock_configuration = true")  # and from here on, no SET either
        except BaseException:
            conn.close()
            raise
        return conn

    # -- refresh --------------------------------------------------------------------------------------

    def refresh(self) -> RefreshStats:
        """Bring the snapshot in step with the store; cheap (one probe query) when nothing changed."""
        with self._locked(exclusive=True):
            return self._refresh_locked()

    def _read_sidecar(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self._state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if state.get("format") != SNAPSHOT_FORMAT or state.get("source") != self._source_id:
            return None
        return state

    def _write_sidecar(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_name(f"{self._state_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self._state_path)

    def _refresh_locked(self) -> RefreshStats:
        start = time.perf_counter()
        if not self.store.is_migrated():
            raise ConfigError(
                f"The store at {make_url(self.store.url).render_as_string(hide_password=True)} has no tables "
                "yet: run `callbot db upgrade` first"
            )
        sidecar = self._read_sidecar() if self.snapshot_path.exists() else None
        if sidecar is not None:
            # The fast path: the store looks exactly as it did after the last refresh.
            if self._probe(sidecar["params"]) == sidecar["expected"]:
                return RefreshStats(copied={}, elapsed_ms=_ms(start), changed=False)
        with contextlib.suppress(FileNotFoundError):
            self._state_path.unlink()
        sync = _Sync(self)
        try:
            stats, state = sync.run()
        finally:
            sync.conn.close()
        self._write_sidecar(state)
        stats.elapsed_ms = _ms(start)
        return stats

    def _remove_snapshot(self) -> None:
        for path in (self.snapshot_path, self.snapshot_path.with_name(self.snapshot_path.name + ".wal")):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _probe(self, params: dict[str, int]) -> dict[str, Any]:
        """One native query on the store describing it: equal probes mean equal data, as far as we copy it."""
        sql = """
            SELECT
              (SELECT count(*) FROM conversations),
              (SELECT max(id) FROM conversations),
              (SELECT max(started_at) FROM conversations),
              (SELECT max(id) FROM messages),
              (SELECT count(*) FROM messages WHERE id > :messages_from),
              (SELECT max(id) FROM turn_metrics),
              (SELECT count(*) FROM turn_metrics WHERE id > :turn_metrics_from),
              (SELECT count(*) FROM system_metrics),
              (SELECT max(id) FROM system_metrics)
        """
        agg_sql = """
            SELECT count(ended_at), count(summary_short), count(summary_full), sum(length(summary_short)),
                   sum(length(summary_full)), count(user_id), count(CASE WHEN status = 'ended' THEN 1 END)
            FROM conversations
        """
        with self.store.engine.connect() as c:
            # One read transaction, so the figures describe one moment of the store.
            with c.begin():
                row = c.execute(text(sql), params).one()
                agg = c.execute(text(agg_sql)).one()
                small = {
                    name: hashlib.sha256(
                        repr(c.execute(text(f"SELECT {_cols(name)} FROM {name} ORDER BY id")).all()).encode()
                    ).hexdigest()
                    for name in SMALL_TABLES
                }
        return {
            "conversations": [int(row[0]), row[1] and int(row[1]), _naive_utc(row[2])],
            "conversations_agg": [int(v or 0) for v in agg],
            "messages": [row[3] and int(row[3]), int(row[4])],
            "turn_metrics": [row[5] and int(row[5]), int(row[6])],
            "system_metrics": [int(row[7]), row[8] and int(row[8])],
            "small": small,
        }

    # -- user SQL -------------------------------------------------------------------------------------

    def query(
        self,
        sql: str,
        *,
        max_rows: int = 1000,
        timeout_s: float = 30.0,
        actor: str | None = None,
        client_addr: str | None = None,
    ) -> QueryResult:
        """Run one user query (guarded) on a fresh snapshot; the first `max_rows` rows are kept."""
        if max_rows < 0:
            raise InvalidInput("max_rows must be zero or more")
        cleaned = self._checked(sql, actor=actor, client_addr=client_addr)
        detail: dict[str, Any] = {"sql": sql, "max_rows": max_rows}
        start = time.perf_counter()
        try:
            with self._reading(refresh=True) as (conn, stats):
                detail["refresh_ms"] = round(stats.elapsed_ms, 1) if stats else None
                start = time.perf_counter()
                with _timeout(conn, timeout_s):
                    try:
                        cursor = conn.execute(cleaned)
                        columns = [d[0] for d in cursor.description or []]
                        rows = cursor.fetchmany(max_rows + 1) if cursor.description else []
                    except duckdb.InterruptException as exc:
                        raise QueryTimeout(f"The query timed out after {_fmt_s(timeout_s)} s") from exc
                    except duckdb.Error as exc:
                        raise InvalidInput(f"The query failed: {_error_line(exc)}") from exc
        except CallbotError as exc:
            detail |= {"status": "timeout" if isinstance(exc, QueryTimeout) else "failed", "error": str(exc)}
            detail["elapsed_ms"] = round(_ms(start), 1)
            audit.log(self.store, "sql.query", actor=actor, target="analytics", detail=detail, client_addr=client_addr)
            raise
        truncated = len(rows) > max_rows
        rows = rows[:max_rows]
        elapsed = _ms(start)
        detail |= {"status": "ok", "rows": len(rows), "truncated": truncated, "elapsed_ms": round(elapsed, 1)}
        audit.log(self.store, "sql.query", actor=actor, target="analytics", detail=detail, client_addr=client_addr)
        return QueryResult(columns=columns, rows=rows, truncated=truncated, elapsed_ms=elapsed)

    def _checked(self, sql: str, *, actor: str | None, client_addr: str | None) -> str:
        try:
            return check_sql(sql)
        except InvalidInput as exc:  # refused or unparsable: recorded either way
            action = "sql.refused" if isinstance(exc, ForbiddenSQL) else "sql.query"
            detail = {"sql": sql, "error": str(exc)}
            if action == "sql.query":
                detail["status"] = "failed"
            audit.log(self.store, action, actor=actor, target="analytics", detail=detail, client_addr=client_addr)
            raise

    def df(self, sql: str, params: list | dict | None = None, *, refresh: bool = True) -> pd.DataFrame:
        """Trusted internal SQL (dashboards, reports) as a DataFrame; `params` positional (`?`) or named (`$x`)."""
        with self._reading(refresh=refresh) as (conn, _stats):
            try:
                return conn.execute(sql, params).df() if params is not None else conn.execute(sql).df()
            except duckdb.Error as exc:
                raise CallbotError(f"Analytics query failed: {_error_line(exc)}") from exc

    def frames(
        self,
        queries: dict[str, str],
        params: dict[str, Any] | None = None,
        *,
        refresh: bool = True,
        timings: dict[str, float] | None = None,
    ) -> dict[str, pd.DataFrame]:
        """Several trusted queries on one refresh and one connection (the dashboards' set).

        Each query gets the named parameters (`$name`) it mentions; `timings`, if given, receives each
        query's milliseconds (and `refresh` for the refresh).
        """
        params = params or {}
        out: dict[str, pd.DataFrame] = {}
        with self._reading(refresh=refresh) as (conn, stats):
            if timings is not None:
                timings["refresh"] = stats.elapsed_ms if stats else 0.0
            for name, sql in queries.items():
                used = {k: v for k, v in params.items() if f"${k}" in sql}
                start = time.perf_counter()
                try:
                    out[name] = conn.execute(sql, used).df() if used else conn.execute(sql).df()
                except duckdb.Error as exc:
                    raise CallbotError(f"Analytics query {name!r} failed: {_error_line(exc)}") from exc
                if timings is not None:
                    timings[name] = _ms(start)
        return out

    def export(
        self,
        sql: str,
        fmt: str,
        path: Path,
        *,
        actor: str | None = None,
        client_addr: str | None = None,
        timeout_s: float = 300.0,
    ) -> int:
        """Write the whole result of one user query (guarded) to `path` as csv, json or parquet; returns rows.

        The file appears complete or not at all: it is written beside `path` and renamed into place.
        """
        fmt = fmt.lower()
        if fmt not in EXPORT_FORMATS:
            raise InvalidInput(f"Unknown export format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")
        cleaned = self._checked(sql, actor=actor, client_addr=client_addr)
        path = Path(path)
        detail: dict[str, Any] = {"sql": sql, "format": fmt, "path": str(path)}
        start = time.perf_counter()
        try:
            with self._reading(refresh=True) as (conn, _stats):
                with _timeout(conn, timeout_s):
                    try:
                        table = conn.execute(cleaned).fetch_arrow_table()
                    except duckdb.InterruptException as exc:
                        raise QueryTimeout(f"The query timed out after {_fmt_s(timeout_s)} s") from exc
                    except duckdb.Error as exc:
                        raise InvalidInput(f"The query failed: {_error_line(exc)}") from exc
            rows = _write_table(table, fmt, path)
        except CallbotError as exc:
            detail |= {"status": "failed", "error": str(exc), "elapsed_ms": round(_ms(start), 1)}
            audit.log(self.store, "sql.export", actor=actor, target="analytics", detail=detail, client_addr=client_addr)
            raise
        detail |= {"status": "ok", "rows": rows, "elapsed_ms": round(_ms(start), 1)}
        audit.log(self.store, "sql.export", actor=actor, target="analytics", detail=detail, client_addr=client_addr)
        return rows

    def columns_of(self, name: str) -> list[tuple[str, str]]:
        """(column, DuckDB type) of a view or table in the snapshot, in order."""
        sql = (
            "SELECT column_name, data_type FROM information_schema.columns "
            "WHERE table_name = ? AND table_schema = ? ORDER BY ordinal_position"
        )
        schema, _, table = name.rpartition(".")
        frame = self.df(sql, [table, schema or "main"])
        return list(frame.itertuples(index=False, name=None))


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}"


@contextlib.contextmanager
def _timeout(conn: duckdb.DuckDBPyConnection, seconds: float) -> Iterator[None]:
    """Interrupt the connection's running query after `seconds` (DuckDB checks between vectors)."""
    timer = threading.Timer(seconds, conn.interrupt)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def _write_table(table: Any, fmt: str, path: Path) -> int:
    """Write an Arrow table with an in-memory DuckDB (the query's own connection may not touch files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json, ARRAY true", "parquet": "FORMAT parquet"}[fmt]
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False})
    try:
        con.register("result", table)
        con.execute(f"COPY (SELECT * FROM result) TO {_quote(str(tmp))} ({options})")
        os.replace(tmp, path)
    except (duckdb.Error, OSError) as exc:
        raise CallbotError(f"Could not write {path}: {_error_line(exc)}") from exc
    finally:
        con.close()
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return int(table.num_rows)


def _cols(table: str) -> str:
    """The store columns of a small table, as the probe hashes them (they have no computed columns)."""
    return ", ".join(c.name for c in TABLES[table])


# -- the incremental copy -------------------------------------------------------------------------------


class _Sync:
    """One refresh, inside one DuckDB transaction on the snapshot: all of it lands, or none of it.

    Rows are read from the store in id ranges through `source()`: on PostgreSQL the scanner's attachment
    (the range is pushed down to the server); on SQLite Python's own sqlite3, staged into a DuckDB temp
    table. DuckDB's sqlite scanner is deliberately not used in-process: it carries a second copy of the
    SQLite library, and two copies in one process break each other's POSIX locks (closing either's file
    descriptor drops the other's locks), which can corrupt a store the app is writing
    (sqlite.org/howtocorrupt.html, "multiple copies of SQLite linked into the same application").
    """

    def __init__(self, an: Analytics) -> None:
        self.an = an
        self.postgres = an.dialect == "postgresql"
        self.copied: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self.attached = False
        try:
            self.conn = an._connect_writer()
        except (duckdb.IOException, duckdb.SerializationException, duckdb.InternalException) as exc:
            if "lock" in str(exc).lower():
                raise CallbotError(f"The analytics snapshot is open elsewhere: {_error_line(exc)}") from exc
            # The snapshot is a cache: one DuckDB cannot open (another version's, a torn file) is rebuilt.
            an._remove_snapshot()
            self.conn = an._connect_writer()

    # -- helpers

    def one(self, sql: str, params: list | None = None) -> Any:
        row = self.conn.execute(sql, params or []).fetchone()
        return row[0] if row else None

    def count(self, sql: str, params: list | None = None) -> int:
        """Run a statement and read its single number (rows changed, for INSERT/UPDATE/DELETE)."""
        row = self.conn.execute(sql, params or []).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def add(self, counter: dict[str, int], table: str, n: int) -> None:
        if n:
            counter[table] = counter.get(table, 0) + n

    def select_list(self, table: str) -> str:
        return ", ".join(f"CAST({c.source or 's.' + c.name} AS {c.type}) AS {c.name}" for c in TABLES[table])

    def source(self, table: str, low: int, high: int) -> str:
        """A relation holding the store's rows of `table` with low < id <= high (callers filter again)."""
        if self.postgres:
            if not self.attached:
                self.conn.execute(f"LOAD {_quote(str(scanner_extension_path('postgres')))}")
                try:
                    self.conn.execute(
                        f"ATTACH {_quote(libpq_conninfo(self.an.store.url))} AS {SOURCE} (TYPE postgres, READ_ONLY)"
                    )
                except duckdb.Error as exc:
                    raise ConfigError(f"Analytics could not read the store: {_error_line(exc)}") from exc
                self.attached = True
            return f"{SOURCE}.{table}"
        return self.stage_sqlite(table, low, high)

    def stage_sqlite(self, table: str, low: int, high: int) -> str:
        """Read the rows with Python's sqlite3 (the store's own library) into a DuckDB temp table."""
        import pyarrow as pa

        # Stored columns only, typed as SQLite hands them out: timestamps are text, booleans integers.
        stored = [c for c in TABLES[table] if c.source is None or c.source.startswith("CAST(s.")]
        types = {c.name: ("VARCHAR" if c.type == "TIMESTAMP" else "BIGINT" if c.type == "BOOLEAN" else c.type)
                 for c in stored}  # fmt: skip
        names = list(types)
        stage = f"stage_{table}"
        self.conn.execute(f"CREATE OR REPLACE TEMP TABLE {stage} ({', '.join(f'{n} {t}' for n, t in types.items())})")
        sql = f"SELECT {', '.join(names)} FROM {table} WHERE id > ? AND id <= ? ORDER BY id"
        with self.an.store.engine.connect() as sa_conn:
            cursor = sa_conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql, (low, high))
                while rows := cursor.fetchmany(STAGE_CHUNK):
                    columns = zip(*rows, strict=True)
                    chunk = pa.table({n: pa.array(list(v)) for n, v in zip(names, columns, strict=True)})
                    self.conn.register("stage_chunk", chunk)
                    self.conn.execute(f"INSERT INTO {stage} SELECT * FROM stage_chunk")
                    self.conn.unregister("stage_chunk")
            finally:
                cursor.close()
        return stage

    def create_schema(self) -> None:
        self.conn.execute("CREATE SCHEMA IF NOT EXISTS raw")
        self.conn.execute(MACROS)
        for table, columns in TABLES.items():
            cols = ", ".join(f"{c.name} {c.type}" for c in columns)
            self.conn.execute(f"CREATE TABLE raw.{table} ({cols})")
        self.conn.execute("CREATE TABLE raw._state (key VARCHAR, value VARCHAR)")
        for name, body in VIEWS.items():
            self.conn.execute(f"CREATE OR REPLACE VIEW main.{name} AS {body}")

    def read_state(self) -> dict[str, str] | None:
        try:
            rows = self.conn.execute("SELECT key, value FROM raw._state").fetchall()
        except duckdb.CatalogException:
            return None
        return dict(rows)

    # -- the whole refresh

    def run(self) -> tuple[RefreshStats, dict[str, Any]]:
        state = self.read_state()
        rebuilt = (
            state is None
            or state.get("format") != str(SNAPSHOT_FORMAT)
            or state.get("source") != self.an._source_id
        )
        if rebuilt:
            self.conn.close()
            self.an._remove_snapshot()
            self.conn = self.an._connect_writer()
            state = {}
        assert state is not None
        params = json.loads(state["params"]) if state.get("params") else None
        expected = json.loads(state["expected"]) if state.get("expected") else None
        if params is not None and expected is not None:
            probe = self.an._probe(params)
            if probe == expected:  # the sidecar was missing or stale, but the snapshot is in step
                return self._finish(params, probe, changed=False, rebuilt=False)
        # The window counts are not used by the copy; reusing the old windows keeps them cheap.
        probe = self.an._probe(params or {f"{t}_from": 2**62 for t in APPEND_ONLY})
        try:
            self.conn.execute("BEGIN TRANSACTION")
            if rebuilt:
                self.create_schema()
            self.sync_small(probe, json.loads(state.get("small", "{}")))
            self.sync_conversations(probe)
            for table in APPEND_ONLY:
                self.sync_append_only(table, probe[table][0] or 0)
            self.sync_system_metrics(probe)
            new_params = self.next_params()
            expected = self.expected(new_params, probe)
            self.conn.execute("DELETE FROM raw._state")
            self.conn.executemany(
                "INSERT INTO raw._state VALUES (?, ?)",
                [
                    ["format", str(SNAPSHOT_FORMAT)],
                    ["source", self.an._source_id],
                    ["small", json.dumps(probe["small"])],
                    ["params", json.dumps(new_params)],
                    ["expected", json.dumps(expected)],
                    ["refreshed_at", datetime.now(UTC).isoformat()],
                ],
            )
            self.conn.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(duckdb.Error):
                self.conn.execute("ROLLBACK")
            raise
        finally:
            if self.attached:
                with contextlib.suppress(duckdb.Error):
                    self.conn.execute(f"DETACH {SOURCE}")
        changed = bool(self.copied or self.deleted or rebuilt)
        return self._finish(new_params, expected, changed=changed, rebuilt=rebuilt)

    def _finish(
        self, params: dict[str, int], expected: dict[str, Any], *, changed: bool, rebuilt: bool
    ) -> tuple[RefreshStats, dict[str, Any]]:
        state = {"format": SNAPSHOT_FORMAT, "source": self.an._source_id, "params": params, "expected": expected}
        stats = RefreshStats(copied=dict(self.copied), elapsed_ms=0.0, changed=changed, deleted=dict(self.deleted))
        stats.rebuilt = rebuilt
        return stats, state

    # -- the parts

    def sync_small(self, probe: dict[str, Any], previous: dict[str, str]) -> None:
        for table in SMALL_TABLES:
            if previous.get(table) == probe["small"][table]:
                continue
            before = self.count(f"SELECT count(*) FROM raw.{table}")
            self.conn.execute(f"DELETE FROM raw.{table}")
            rel = self.source(table, 0, 2**62)
            n = self.count(f"INSERT INTO raw.{table} SELECT {self.select_list(table)} FROM {rel} s ORDER BY s.id")
            self.add(self.copied, table, n)
            self.add(self.deleted, table, max(before - n, 0))

    def snapshot_conversation_agg(self) -> list[int]:
        row = self.conn.execute(
            """SELECT count(ended_at), count(summary_short), count(summary_full), sum(length(summary_short)),
                      sum(length(summary_full)), count(user_id), count(CASE WHEN status = 'ended' THEN 1 END)
               FROM raw.conversations"""
        ).fetchone()
        return [int(v or 0) for v in row]

    def snapshot_conversation_key(self) -> list[Any]:
        count, max_id, max_started = self.conn.execute(
            "SELECT count(*), max(id), max(started_at) FROM raw.conversations"
        ).fetchone()
        return [int(count), max_id and int(max_id), _naive_utc(max_started)]

    def sync_conversations(self, probe: dict[str, Any]) -> None:
        top = probe["conversations"][1] or 0
        have = self.one("SELECT coalesce(max(id), 0) FROM raw.conversations")
        if top > have:
            rel = self.source("conversations", have, top)
            n = self.count(
                f"INSERT INTO raw.conversations SELECT {self.select_list('conversations')} "
                f"FROM {rel} s WHERE s.id > ? AND s.id <= ? ORDER BY s.id",
                [have, top],
            )
            self.add(self.copied, "conversations", n)
        in_step = (
            self.snapshot_conversation_key() == probe["conversations"]
            and self.snapshot_conversation_agg() == probe["conversations_agg"]
        )
        if not in_step:
            self.reconcile_conversations(top)

    def reconcile_conversations(self, top: int) -> None:
        """Row-by-row comparison of the conversations: updates, deletions, and ids reused for new rows."""
        rel = self.source("conversations", 0, top)
        self.conn.execute(
            f"CREATE OR REPLACE TEMP TABLE src_conversations AS SELECT {self.select_list('conversations')} "
            f"FROM {rel} s WHERE s.id <= ?",
            [top],
        )
        # Gone, or replaced under the same id (a different start): their rows leave the snapshot.
        self.conn.execute(
            """CREATE OR REPLACE TEMP TABLE gone AS
               SELECT r.id FROM raw.conversations r LEFT JOIN src_conversations s ON s.id = r.id
               WHERE s.id IS NULL OR s.started_at IS DISTINCT FROM r.started_at"""
        )
        if self.one("SELECT count(*) FROM gone"):
            for table in ("turn_metrics", "messages", "conversations"):
                key = "id" if table == "conversations" else "conversation_id"
                n = self.count(f"DELETE FROM raw.{table} WHERE {key} IN (SELECT id FROM gone)")
                self.add(self.deleted, table, n)
        mutable = ("user_id", "ended_at", "status", "summary_short", "summary_full", "summary_short_words",
                   "summary_full_words")  # fmt: skip
        differs = " OR ".join(f"r.{c} IS DISTINCT FROM s.{c}" for c in mutable)
        n = self.count(
            f"UPDATE raw.conversations r SET {', '.join(f'{c} = s.{c}' for c in mutable)} "
            f"FROM src_conversations s WHERE s.id = r.id AND ({differs})"
        )
        self.add(self.copied, "conversations", n)
        n = self.count(
            "INSERT INTO raw.conversations SELECT * FROM src_conversations s "
            "WHERE NOT EXISTS (SELECT 1 FROM raw.conversations r WHERE r.id = s.id) ORDER BY s.id"
        )
        self.add(self.copied, "conversations", n)
        self.conn.execute("DROP TABLE src_conversations")
        self.conn.execute("DROP TABLE gone")

    def sync_append_only(self, table: str, top: int) -> None:
        have = self.one(f"SELECT coalesce(max(id), 0) FROM raw.{table}")
        low = max(have - PG_ID_MARGIN, 0) if self.postgres else have
        if top <= low:
            return
        # Conversations were copied first and only rows up to the probe's highest id are read, so a row's
        # conversation is in the snapshot already, or was deleted with it (the next probe sees that), or on
        # PostgreSQL commits late and arrives with the next refresh.
        rel = self.source(table, low, top)
        rows = (
            f"SELECT {self.select_list(table)} FROM {rel} s WHERE s.id > ? AND s.id <= ? "
            f"AND NOT EXISTS (SELECT 1 FROM raw.{table} r WHERE r.id > ? AND r.id = s.id)"
        )
        if table == "turn_metrics":
            # A turn's start and word counts come from its messages, copied just before.
            rows = f"""SELECT t.* REPLACE (um.created_at AS started_at, um.words AS user_words, am.words AS bot_words)
                FROM ({rows}) t
                LEFT JOIN raw.messages um ON um.id = t.user_message_id
                LEFT JOIN raw.messages am ON am.id = t.assistant_message_id"""
        n = self.count(f"INSERT INTO raw.{table} SELECT * FROM ({rows}) ORDER BY id", [low, top, low])
        self.add(self.copied, table, n)

    def sync_system_metrics(self, probe: dict[str, Any]) -> None:
        count, top = probe["system_metrics"]
        top = top or 0
        have_count, have_top = self.conn.execute("SELECT count(*), coalesce(max(id), 0) FROM raw.system_metrics").fetchone()
        if (have_count, have_top) == (count, top):
            return
        insert = (
            f"INSERT INTO raw.system_metrics SELECT {self.select_list('system_metrics')} "
            "FROM {rel} s WHERE s.id > ? AND s.id <= ? ORDER BY s.id"
        )
        if top > have_top:
            n = self.count(insert.replace("{rel}", self.source("system_metrics", have_top, top)), [have_top, top])
            self.add(self.copied, "system_metrics", n)
        if self.count("SELECT count(*) FROM raw.system_metrics") != count:
            # Rows were pruned (or committed out of order): small enough to copy again whole.
            self.add(self.deleted, "system_metrics", self.count("DELETE FROM raw.system_metrics"))
            n = self.count(insert.replace("{rel}", self.source("system_metrics", 0, top)), [0, top])
            self.add(self.copied, "system_metrics", n)

    def next_params(self) -> dict[str, int]:
        params = {}
        for table in APPEND_ONLY:
            top = self.one(f"SELECT coalesce(max(id), 0) FROM raw.{table}")
            params[f"{table}_from"] = max(top - PG_ID_MARGIN, 0) if self.postgres else top
        return params

    def expected(self, params: dict[str, int], probe: dict[str, Any]) -> dict[str, Any]:
        """What the store's probe reads while it still matches the snapshot: computed from the snapshot, so
        anything committed during the copy shows up as a difference next time."""
        out: dict[str, Any] = {
            "conversations": self.snapshot_conversation_key(),
            "conversations_agg": self.snapshot_conversation_agg(),
        }
        for table in APPEND_ONLY:
            top, window = self.conn.execute(
                f"SELECT max(id), count(*) FILTER (WHERE id > ?) FROM raw.{table}", [params[f"{table}_from"]]
            ).fetchone()
            out[table] = [top and int(top), int(window)]
        count, top = self.conn.execute("SELECT count(*), max(id) FROM raw.system_metrics").fetchone()
        out["system_metrics"] = [int(count), top and int(top)]
        out["small"] = probe["small"]
        return out
