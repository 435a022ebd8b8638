"""DuckDB over the store: an analytics snapshot kept in step with the store, and guarded user SQL.

Queries never run over the live store: scanning it through DuckDB's attachment was measured ~3x slower
than DuckDB's own tables on a dashboard-like query set. The store's tables are copied into a snapshot in
DuckDB's own format (`<runtime>/analytics.duckdb`) and kept in step incrementally before every query:

- a probe on the store (a few native queries answered from indexes, one scan of `conversations`, a hash of
  the small tables) is compared with what the snapshot holds; equal means nothing to do, and the
  snapshot is not even opened for writing;
- messages, turn metrics, turn stages and turn retrievals are append-only: rows above the snapshot's highest id
  are copied (on PostgreSQL also a margin below it, since ids are handed out before commit and a slower
  transaction can commit a lower id later); system metrics likewise, copied whole again if rows were pruned.
  The one later change to them: a turn retrieval's chunk_id is set to NULL when its chunk is deleted (a
  document re-ingested or removed); the probe counts such rows, and when the count moves the snapshot's rows
  are unlinked to match;
- conversations are copied by id, and when their figures (count, status, ended_at, summaries, user) no
  longer match, compared row by row: updated rows are updated, deleted ones leave with their messages and
  turns (with their stages and retrievals). A conversation replaced under a reused id (SQLite hands the highest
  id out again after it was deleted) has a different start time and is treated as deleted and new;
- users, personas, persona versions, eval runs and results, comparisons (variants, votes) and retrieval
  evaluations (runs, per-question results) are small and copied whole when their hash changes; JSON columns
  are stored as canonical JSON text.

How rows are read: PostgreSQL is attached READ_ONLY through DuckDB's postgres scanner, loaded from the
`duckdb-extension-postgres-scanner` package (never INSTALLed: that would need the internet), with the id
ranges pushed down to the server. A SQLite store is read with Python's own sqlite3 and handed to DuckDB as
Arrow batches, not through DuckDB's sqlite scanner: the scanner carries a second copy of the SQLite
library, and two copies in one process break each other's POSIX locks (closing either one's file
descriptor drops the other's locks; sqlite.org/howtocorrupt.html, section 2.2.1). The app and the CLI
write the store through Python's sqlite3 in the same process, so that could corrupt it.

Several processes use the snapshot (the app, the CLI, report kernels, pipelines) and DuckDB lets only one
process open a file for writing. So no connection is held between calls: each call takes
`<snapshot>.lock` with `fcntl.flock` (exclusive to refresh, then shared to read, so readers in several
processes run side by side but never beside a writer), opens the snapshot, works and closes it. Threads of
one process are serialised per snapshot file on top, because DuckDB refuses a second connection to a file
with different settings (read-write against read-only) within one process.

User SQL runs on a connection opened read-only with external access disabled and its configuration
locked, after `check_sql` (guard.py) has accepted it: a statement the guard missed still cannot write,
read files or reach the network. It runs in a worker process of its own (worker.py), whose address space is
capped: DuckDB's memory_limit does not cover the strings an expression builds, so one query could otherwise
take the app's whole process down. Its result is capped in bytes as well as rows. Every user query is written
to the audit log, with any password in it or in its error masked (store/redaction.py).

The snapshot is a cache: one DuckDB cannot read (garbage, a torn or truncated file, another version's) is
removed and built again from the store, once, by whichever call finds it so; the call then goes on.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import pickle
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import duckdb
import pandas as pd
from sqlalchemy import text
from sqlalchemy.engine import make_url
from sqlalchemy.exc import SQLAlchemyError

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.analytics.guard import MAX_SQL_CHARS, ForbiddenSQL, check_sql
from callbot_core.analytics.views import MACROS, SNAPSHOT_FORMAT, TABLES, VIEWS
from callbot_core.csv_safety import FORMULA_PREFIXES, QUOTE
from callbot_core.errors import CallbotError, ConfigError, InvalidInput
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store
from callbot_core.store.redaction import redact_url, scrub, url_password

__all__ = [
    "Analytics",
    "QueryResult",
    "QueryTimeout",
    "RefreshStats",
    "ResultTooLarge",
    "scanner_extension_path",
    "libpq_conninfo",
]

SNAPSHOT_NAME = "analytics.duckdb"
SOURCE = "src"  # the attached store's catalog name inside the refresh connection
APPEND_ONLY = ("messages", "turn_metrics", "turn_stages", "turn_retrievals")
# Small enough to copy whole when their hash changes; this also covers eval runs whose status changes and
# rows deleted by cascades (a conversation's comparison variants and votes).
SMALL_TABLES = (
    "users",
    "personas",
    "persona_versions",
    "eval_runs",
    "eval_results",
    "comparisons",
    "comparison_variants",
    "comparison_votes",
    "retrieval_evals",
    "retrieval_eval_results",
)
# Ids a PostgreSQL transaction may still commit below the highest id already copied (see the docstring).
PG_ID_MARGIN = 1000
STAGE_CHUNK = 100_000  # rows per batch when staging SQLite rows: bounded memory on the first copy
# Conversations that may still change (active, or not summarised) are re-read by id up to this many.
CANDIDATE_LIMIT = 20_000
# Up to this many ids, PostgreSQL rows are read over the store's own connection rather than the scanner.
NATIVE_MAX_ROWS = 50_000
LOCK_WAIT_S = 120.0
# How often a refresh also compares the summaries' lengths (see `Analytics._probe`).
FULL_CHECK_S = 60.0
# DuckDB's own limits: its buffer manager spills to the temp directory beyond `memory_limit`, and the temp
# directory (DuckDB's default: 90% of the free disk) is capped so one query cannot fill the disk.
READER_MEMORY_LIMIT = "1GB"
WRITER_MEMORY_LIMIT = "2GB"  # a first copy of a million messages needs ~1 GB (see `_Sync.commit_piece`)
TEMP_DIRECTORY_LIMIT = "4GB"
# What a user query's worker process may grow by, all allocations counted (see worker.py); above DuckDB's
# memory_limit, so DuckDB spills first and only what it cannot account for meets this wall.
QUERY_MEMORY_BYTES = 2 * 2**30
# The SQL console's result, as Python holds it: what the app keeps per user and turns into a table and downloads.
MAX_RESULT_BYTES = 50 * 2**20
# How much of a refused over-long query the audit log keeps (with its length).
AUDIT_SQL_PREVIEW = 1000
# A worker that ignores its own timeout (stuck outside DuckDB's interrupt checks) is killed this much later.
WORKER_GRACE_S = 10.0
WORKER = Path(__file__).with_name("worker.py")
EXPORT_FORMATS = ("csv", "json", "parquet")
# DuckDB errors that mean the snapshot file itself is unreadable (and a rebuild helps), when they name it.
_DAMAGE_TYPES = ("IOException", "SerializationException")

T = TypeVar("T")

_EXTENSION_PACKAGES = {"sqlite": "duckdb_extension_sqlite_scanner", "postgres": "duckdb_extension_postgres_scanner"}
_path_locks: dict[str, _ReadWriteLock] = {}
_path_locks_guard = threading.Lock()


class _ReadWriteLock:
    """Many reading threads or one writing thread, per snapshot file within a process.

    Writers go first once waiting, so a steady stream of queries cannot hold a refresh off for ever.
    `connecting` serialises opening read-only connections: they share one DuckDB instance, which only the
    first of them configures.
    """

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self._readers = 0
        self._writer = False
        self._waiting_writers = 0
        self.connecting = threading.Lock()

    @contextlib.contextmanager
    def read(self) -> Iterator[None]:
        with self._cond:
            self._cond.wait_for(lambda: not self._writer and not self._waiting_writers)
            self._readers += 1
        try:
            yield
        finally:
            with self._cond:
                self._readers -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def write(self) -> Iterator[None]:
        with self._cond:
            self._waiting_writers += 1
            try:
                self._cond.wait_for(lambda: not self._writer and not self._readers)
            finally:
                self._waiting_writers -= 1
            self._writer = True
        try:
            yield
        finally:
            with self._cond:
                self._writer = False
                self._cond.notify_all()


class QueryTimeout(InvalidInput):
    """A user query ran longer than its timeout and was interrupted."""


class ResultTooLarge(InvalidInput):
    """A user query's result (or the memory it needed) went over the SQL console's limit."""


class _SnapshotDamaged(Exception):
    """DuckDB cannot read the snapshot file: caught by `Analytics._attempt`, which rebuilds it once."""


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
        raise ConfigError(
            f"The DuckDB {kind} scanner is missing: install {package.replace('_', '-')}=={duckdb.__version__}"
        )
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
        with _path_locks_guard:
            self._rw = _path_locks.setdefault(key, _ReadWriteLock())
        # The snapshot is tied to one store: a different URL (password left out) means a rebuild.
        shown = make_url(store.url).render_as_string(hide_password=True)
        self._source_id = hashlib.sha256(shown.encode()).hexdigest()[:16]
        # Masked in every message and audit row, also where a driver quotes it on its own (see `_say`).
        self._password = url_password(store.url)
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
                # Named after the URL without its password: a short hash of a secret is one to brute-force.
                name = f"analytics-{hashlib.sha256(redact_url(url).encode()).hexdigest()[:10]}.duckdb"
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
    def _locked(self, exclusive: bool) -> Iterator[None]:
        """The snapshot for writing (one thread of one process) or for reading (any number of both)."""
        if self._closed:
            raise CallbotError("This analytics handle is closed")
        with self._rw.write() if exclusive else self._rw.read():
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                self._flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
                yield
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

    def _attempt(self, work: Callable[[RefreshStats | None], T], *, refresh: bool) -> T:
        """`work` under the shared lock, on a snapshot brought up to date (if asked, or if there is none yet).

        `work` raises `_SnapshotDamaged` when DuckDB cannot read the snapshot: it is then rebuilt from the
        store, and `work` runs once more.
        """
        for attempt in (1, 2):
            stats = self.refresh() if refresh or not self.snapshot_path.exists() else None
            stamp = None
            try:
                with self._locked(exclusive=False):
                    stamp = _stamp(self.snapshot_path)
                    return work(stats)
            except _SnapshotDamaged as exc:
                if attempt == 2:
                    raise CallbotError(
                        f"The analytics snapshot {self.snapshot_path} cannot be read even after a rebuild: {exc}"
                    ) from exc
                self._rebuild(stamp)
        raise AssertionError("unreachable")

    def _rebuild(self, stamp: tuple[int, int, int] | None) -> None:
        """Build the snapshot again, unless another thread or process already did since `stamp`."""
        with self._locked(exclusive=True):
            if _stamp(self.snapshot_path) == stamp:
                self._remove_snapshot()
                self._refresh_locked()

    def _damaged(self, type_name: str, message: str) -> bool:
        """A DuckDB error that says the snapshot file is unreadable (not a lock held elsewhere, not a bad query)."""
        if type_name not in _DAMAGE_TYPES or "lock" in message.lower():
            return False
        return self.snapshot_path.name in message or any(w in message.lower() for w in ("corrupt", "checksum"))

    def _raise_if_damaged(self, exc: duckdb.Error) -> None:
        if self._damaged(type(exc).__name__, str(exc)):
            raise _SnapshotDamaged(self._say(exc)) from exc

    @contextlib.contextmanager
    def _reader(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection to the snapshot in this process, for trusted queries (dashboards, reports)."""
        try:
            conn = self._connect_reader()
        except duckdb.Error as exc:
            self._raise_if_damaged(exc)
            raise CallbotError(f"The analytics snapshot could not be opened: {self._say(exc)}") from exc
        try:
            yield conn
        finally:
            conn.close()

    def _say(self, exc: BaseException) -> str:
        """An error's first line, fit to show: the store's password and any URL's password masked."""
        return scrub(_error_line(exc), self._password)

    # -- connections ----------------------------------------------------------------------------------

    def _connect_writer(self) -> duckdb.DuckDBPyConnection:
        config = {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "memory_limit": WRITER_MEMORY_LIMIT,
            "max_temp_directory_size": TEMP_DIRECTORY_LIMIT,
        }
        conn = duckdb.connect(str(self.snapshot_path), config=config)
        # PostgreSQL timestamptz values are cast to the snapshot's zone-less UTC timestamps in this zone.
        conn.execute("SET TimeZone = 'UTC'")
        return conn

    @staticmethod
    def _reader_config() -> dict[str, Any]:
        return {
            "autoinstall_known_extensions": False,
            "autoload_known_extensions": False,
            "memory_limit": READER_MEMORY_LIMIT,
            "max_temp_directory_size": TEMP_DIRECTORY_LIMIT,
            # Defence in depth behind the guard: no files, no network, no ATTACH/INSTALL/LOAD.
            "enable_external_access": False,
        }

    # Run on a fresh reader; the last one also forbids SET from here on.
    _READER_SETUP = ("SET TimeZone = 'UTC'", "SET lock_configuration = true")

    def _connect_reader(self) -> duckdb.DuckDBPyConnection:
        with self._rw.connecting:
            conn = duckdb.connect(str(self.snapshot_path), read_only=True, config=self._reader_config())
            try:
                # Readers in one process share one DuckDB instance: the first configures and locks it.
                if not conn.execute("SELECT current_setting('lock_configuration')").fetchone()[0]:
                    for statement in self._READER_SETUP:
                        conn.execute(statement)
            except BaseException:
                conn.close()
                raise
        return conn

    # -- refresh --------------------------------------------------------------------------------------

    def refresh(self) -> RefreshStats:
        """Bring the snapshot in step with the store; cheap (a probe of the store) when nothing changed.

        The check needs no lock: only when something changed does it wait for the readers of this
        process and of others to finish, and copy under the exclusive lock.
        """
        start = time.perf_counter()
        if self._closed:
            raise CallbotError("This analytics handle is closed")
        if self._in_step():
            return RefreshStats(copied={}, elapsed_ms=_ms(start), changed=False)
        with self._locked(exclusive=True):
            stats = self._refresh_locked()
        stats.elapsed_ms = _ms(start)
        return stats

    def _in_step(self) -> bool:
        """The fast path: the store looks exactly as it did after the last refresh (per the sidecar)."""
        try:
            migrated = self.store.is_migrated()
        except SQLAlchemyError as exc:
            raise ConfigError(f"Analytics could not read the store: {self._say(exc)}") from exc
        if not migrated:
            raise ConfigError(
                f"The store at {redact_url(self.store.url)} has no tables yet: run `callbot db upgrade` first"
            )
        sidecar = self._read_sidecar() if self.snapshot_path.exists() else None
        if sidecar is None:
            return False
        full = time.time() - sidecar.get("full_checked_at", 0) > FULL_CHECK_S
        if not _matches(self._probe(sidecar["params"], full=full), sidecar["expected"]):
            return False
        if full:
            self._write_sidecar(sidecar | {"full_checked_at": time.time()})
        return True

    def _read_sidecar(self) -> dict[str, Any] | None:
        try:
            state = json.loads(self._state_path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if state.get("format") != SNAPSHOT_FORMAT or state.get("source") != self._source_id:
            return None
        return state

    def _write_sidecar(self, state: dict[str, Any]) -> None:
        tmp = self._state_path.with_name(f"{self._state_path.name}.{uuid.uuid4().hex[:8]}.tmp")
        tmp.write_text(json.dumps(state), encoding="utf-8")
        os.replace(tmp, self._state_path)

    def _refresh_locked(self) -> RefreshStats:
        # No second look at the sidecar: `_Sync.run` compares the store with the state inside the snapshot,
        # which also covers another thread or process having refreshed while we waited for the lock.
        with contextlib.suppress(FileNotFoundError):
            self._state_path.unlink()
        for attempt in (1, 2):
            sync = _Sync(self)
            try:
                stats, state = sync.run()
                break
            except (SQLAlchemyError, sqlite3.Error) as exc:
                raise ConfigError(f"Analytics could not read the store: {self._say(exc)}") from exc
            except duckdb.Error as exc:
                # A snapshot that opened but has unreadable blocks (a truncated file): start from nothing.
                if attempt == 1 and self._damaged(type(exc).__name__, str(exc)):
                    sync.conn.close()
                    self._remove_snapshot()
                    continue
                raise CallbotError(f"Analytics could not refresh its snapshot: {self._say(exc)}") from exc
            finally:
                sync.conn.close()
        self._write_sidecar(state | {"full_checked_at": time.time()})
        return stats

    def _remove_snapshot(self) -> None:
        name = self.snapshot_path.name
        for path in (self.snapshot_path, self.snapshot_path.with_name(name + ".wal"), self._state_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    def _probe(self, params: dict[str, int], *, full: bool = True) -> dict[str, Any]:
        """A few native queries describing the store: equal probes mean equal data, as far as we copy it.

        Everything but one scan of `conversations` is answered from indexes. `full` adds the summaries'
        total length to that scan (it then reads the text, ~2x the cost): only then is a summary that was
        replaced by another of the same count noticed, so it is checked every FULL_CHECK_S, not every time.
        """
        sql = """
            SELECT
              (SELECT max(id) FROM conversations),
              (SELECT max(started_at) FROM conversations),
              (SELECT max(id) FROM messages),
              (SELECT count(*) FROM messages WHERE id > :messages_from),
              (SELECT max(id) FROM turn_metrics),
              (SELECT count(*) FROM turn_metrics WHERE id > :turn_metrics_from),
              (SELECT count(*) FROM system_metrics),
              (SELECT max(id) FROM system_metrics),
              (SELECT max(id) FROM turn_stages),
              (SELECT count(*) FROM turn_stages WHERE id > :turn_stages_from),
              (SELECT max(id) FROM turn_retrievals),
              (SELECT count(*) FROM turn_retrievals WHERE id > :turn_retrievals_from),
              (SELECT count(*) FROM turn_retrievals WHERE chunk_id IS NULL)
        """
        lengths = ", sum(length(summary_short)), sum(length(summary_full))" if full else ""
        conv_sql = f"""
            SELECT count(*), count(ended_at), count(summary_short), count(summary_full), count(user_id),
                   count(CASE WHEN status = 'ended' THEN 1 END){lengths}
            FROM conversations
        """
        try:
            with self.store.engine.connect() as c, c.begin():
                row = c.execute(text(sql), params).one()
                conv = [int(v or 0) for v in c.execute(text(conv_sql)).one()]
                small = {
                    name: hashlib.sha256(
                        repr(c.execute(text(f"SELECT {_cols(name)} FROM {name} ORDER BY id")).all()).encode()
                    ).hexdigest()
                    for name in SMALL_TABLES
                }
        except SQLAlchemyError as exc:
            raise ConfigError(f"Analytics could not read the store: {self._say(exc)}") from exc
        probe: dict[str, Any] = {
            "conversations": [row[0] and int(row[0]), _naive_utc(row[1]), *conv[:6]],
            "messages": [row[2] and int(row[2]), int(row[3])],
            "turn_metrics": [row[4] and int(row[4]), int(row[5])],
            "turn_stages": [row[8] and int(row[8]), int(row[9])],
            "turn_retrievals": [row[10] and int(row[10]), int(row[11])],
            "unlinked_retrievals": int(row[12]),
            "system_metrics": [int(row[6]), row[7] and int(row[7])],
            "small": small,
        }
        if full:
            probe["conversation_lengths"] = conv[6:]
        return probe

    # -- user SQL -------------------------------------------------------------------------------------

    def query(
        self,
        sql: str,
        *,
        max_rows: int = 1000,
        max_bytes: int = MAX_RESULT_BYTES,
        timeout_s: float = 30.0,
        actor: Actor,
        client_addr: str | None = None,
    ) -> QueryResult:
        """Run one user query (guarded) on a fresh snapshot as `actor`; the first `max_rows` rows are kept.

        A result over `max_bytes` (as Python holds it) is refused with `ResultTooLarge` rather than cut, since
        a cut by size would hide rows in a way the row count does not say.
        """
        require(actor, "sql.run")
        who = actor.username
        if max_rows < 0:
            raise InvalidInput("max_rows must be zero or more")
        if max_bytes <= 0:
            raise InvalidInput("max_bytes must be more than zero")
        if timeout_s <= 0:
            raise InvalidInput("timeout_s must be more than zero")
        cleaned = self._checked(sql, actor=who, client_addr=client_addr)
        detail: dict[str, Any] = {"sql": self._audit_sql(sql), "max_rows": max_rows}
        start = time.perf_counter()
        request = {"mode": "rows", "sql": cleaned, "max_rows": max_rows, "max_bytes": max_bytes}

        def work(stats: RefreshStats | None) -> tuple[list[str], list[tuple], dict[str, Any]]:
            nonlocal start
            detail["refresh_ms"] = round(stats.elapsed_ms, 1) if stats else None
            start = time.perf_counter()
            return self._in_worker(request, timeout_s=timeout_s, max_bytes=max_bytes)

        try:
            columns, rows, _end = self._attempt(work, refresh=True)
        except CallbotError as exc:
            detail |= {"status": "timeout" if isinstance(exc, QueryTimeout) else "failed", "error": str(exc)}
            detail["elapsed_ms"] = round(_ms(start), 1)
            self._audit_failure("sql.query", detail, actor=who, client_addr=client_addr)
            raise
        truncated = len(rows) > max_rows
        rows = rows[:max_rows]
        elapsed = _ms(start)
        detail |= {"status": "ok", "rows": len(rows), "truncated": truncated, "elapsed_ms": round(elapsed, 1)}
        audit.log(self.store, "sql.query", actor=who, target="analytics", detail=detail, client_addr=client_addr)
        return QueryResult(columns=columns, rows=rows, truncated=truncated, elapsed_ms=elapsed)

    def _checked(self, sql: str, *, actor: str | None, client_addr: str | None) -> str:
        try:
            return check_sql(sql)
        except InvalidInput as exc:  # refused or unparsable: recorded either way
            action = "sql.refused" if isinstance(exc, ForbiddenSQL) else "sql.query"
            detail = {"sql": self._audit_sql(sql), "error": scrub(str(exc), self._password)}
            if len(sql) > MAX_SQL_CHARS:
                detail["sql_chars"] = len(sql)
            if action == "sql.query":
                detail["status"] = "failed"
            self._audit_failure(action, detail, actor=actor, client_addr=client_addr)
            raise

    def _audit_sql(self, sql: str) -> str:
        """The query as the audit log keeps it: passwords masked, and only the start of one over the length limit
        (it was refused, so the start says enough; the log should not grow by megabytes per attempt)."""
        if len(sql) > MAX_SQL_CHARS:
            sql = sql[:AUDIT_SQL_PREVIEW] + " …"
        return scrub(sql, self._password)

    def _audit_failure(
        self, action: str, detail: dict[str, Any], *, actor: str | None, client_addr: str | None
    ) -> None:
        # A store that cannot be reached cannot record the failure either: the caller raises the failure itself
        # (which says the store is unreachable), not the audit's own error about the same thing.
        with contextlib.suppress(SQLAlchemyError):
            audit.log(self.store, action, actor=actor, target="analytics", detail=detail, client_addr=client_addr)

    def _in_worker(
        self, request: dict[str, Any], *, timeout_s: float, max_bytes: int = 0
    ) -> tuple[list[str], list[tuple], dict[str, Any]]:
        """Run a guarded query in a worker process (worker.py) on the snapshot; the caller holds the shared lock.

        Returns the columns, the rows and the worker's last message's payload. Raises `_SnapshotDamaged` when
        the worker could not read the snapshot.
        """
        request = request | {
            "snapshot": str(self.snapshot_path),
            "config": self._reader_config(),
            "setup": list(self._READER_SETUP),
            "timeout_s": timeout_s,
            "address_space": QUERY_MEMORY_BYTES,
        }
        worker = _Worker.take()
        try:
            columns, rows, end = worker.run(request, deadline_s=timeout_s + WORKER_GRACE_S)
        finally:
            worker.close()
            _Worker.prepare_spare()
        kind, payload = end
        if kind in ("done", "written"):
            return columns, rows, payload
        if kind == "error":
            kind = payload["kind"]
        raise self._worker_error(kind, payload, timeout_s=timeout_s, max_bytes=max_bytes)

    def _worker_error(self, kind: str, payload: dict[str, Any], *, timeout_s: float, max_bytes: int) -> Exception:
        message = scrub(str(payload.get("message", "")), self._password)
        if kind in ("timeout", "killed"):
            return QueryTimeout(f"The query timed out after {_fmt_s(timeout_s)} s")
        if kind == "too_big":
            return ResultTooLarge(
                f"The result is over the SQL console's limit of {_mb(max_bytes)}: add a LIMIT, select fewer or "
                "shorter columns, or write it to a file with `callbot sql … --out FILE`"
            )
        out_of_memory = kind == "died" and (
            payload.get("returncode") in (-6, -9)  # an allocation failed outside DuckDB's checks; the OOM killer
            or any(word in message for word in ("MemoryError", "bad_alloc"))
        )
        if kind == "memory" or out_of_memory:
            return ResultTooLarge(
                f"The query ran out of memory: a query may use {_mb(QUERY_MEMORY_BYTES)} at most; add a LIMIT, "
                "aggregate, or build shorter values"
            )
        if kind == "failed" and self._damaged(str(payload.get("type", "")), str(payload.get("message", ""))):
            return _SnapshotDamaged(message)
        if kind == "write":
            return CallbotError(f"Could not write the export: {message}")
        if kind == "died":
            return CallbotError(f"The query's worker process stopped (exit status {payload['returncode']}): {message}")
        return InvalidInput(f"The query failed: {message}")

    def df(self, sql: str, params: list | dict | None = None, *, refresh: bool = True) -> pd.DataFrame:
        """Trusted internal SQL (dashboards, reports) as a DataFrame; `params` positional (`?`) or named (`$x`)."""

        def work(_stats: RefreshStats | None) -> pd.DataFrame:
            with self._reader() as conn:
                try:
                    return conn.execute(sql, params).df() if params is not None else conn.execute(sql).df()
                except duckdb.Error as exc:
                    self._raise_if_damaged(exc)
                    raise CallbotError(f"Analytics query failed: {self._say(exc)}") from exc

        return self._attempt(work, refresh=refresh)

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

        def work(stats: RefreshStats | None) -> dict[str, pd.DataFrame]:
            out: dict[str, pd.DataFrame] = {}
            if timings is not None:
                timings["refresh"] = stats.elapsed_ms if stats else 0.0
            with self._reader() as conn:
                for name, sql in queries.items():
                    used = {k: v for k, v in params.items() if f"${k}" in sql}
                    start = time.perf_counter()
                    try:
                        out[name] = conn.execute(sql, used).df() if used else conn.execute(sql).df()
                    except duckdb.Error as exc:
                        self._raise_if_damaged(exc)
                        raise CallbotError(f"Analytics query {name!r} failed: {self._say(exc)}") from exc
                    if timings is not None:
                        timings[name] = _ms(start)
            return out

        return self._attempt(work, refresh=refresh)

    def export(
        self,
        sql: str,
        fmt: str,
        path: Path,
        *,
        actor: Actor,
        client_addr: str | None = None,
        timeout_s: float = 300.0,
    ) -> int:
        """Write the whole result of one user query (guarded) to `path` as csv, json or parquet; returns rows.

        The file appears complete or not at all: it is written beside `path` and renamed into place. CSV text
        cells a spreadsheet would run as formulas are neutralised (callbot_core/csv_safety.py).
        """
        require(actor, "sql.run")
        who = actor.username
        fmt = fmt.lower()
        if fmt not in EXPORT_FORMATS:
            raise InvalidInput(f"Unknown export format {fmt!r}: use {', '.join(EXPORT_FORMATS)}")
        cleaned = self._checked(sql, actor=who, client_addr=client_addr)
        path = Path(path)
        detail: dict[str, Any] = {"sql": self._audit_sql(sql), "format": fmt, "path": str(path)}
        start = time.perf_counter()
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        request = {
            "mode": "file", "sql": cleaned, "fmt": fmt, "out": str(tmp),
            "writer_config": {"autoinstall_known_extensions": False, "autoload_known_extensions": False,
                              "memory_limit": READER_MEMORY_LIMIT, "max_temp_directory_size": TEMP_DIRECTORY_LIMIT},
            "csv_formula_prefixes": list(FORMULA_PREFIXES), "csv_quote": QUOTE,
        }  # fmt: skip
        try:
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                _columns, _rows, written = self._attempt(
                    lambda _stats: self._in_worker(request, timeout_s=timeout_s), refresh=True
                )
                os.replace(tmp, path)
            except OSError as exc:
                raise CallbotError(f"Could not write {path}: {_error_line(exc)}") from exc
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
        except CallbotError as exc:
            status = "timeout" if isinstance(exc, QueryTimeout) else "failed"
            detail |= {"status": status, "error": str(exc), "elapsed_ms": round(_ms(start), 1)}
            self._audit_failure("sql.export", detail, actor=who, client_addr=client_addr)
            raise
        rows = int(written["rows"])
        detail |= {"status": "ok", "rows": rows, "elapsed_ms": round(_ms(start), 1)}
        audit.log(self.store, "sql.export", actor=who, target="analytics", detail=detail, client_addr=client_addr)
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


def _matches(probe: dict[str, Any], expected: dict[str, Any]) -> bool:
    """The probe (which may leave out the costly parts) agrees with what the snapshot holds."""
    return all(expected.get(key) == value for key, value in probe.items())


def _fmt_s(seconds: float) -> str:
    return f"{seconds:g}"


def _mb(n: int) -> str:
    return f"{n / 2**30:g} GB" if n >= 2**30 else f"{n / 2**20:g} MB"


def _stamp(path: Path) -> tuple[int, int, int] | None:
    """Which file the snapshot is: a rebuild replaces it, so a changed stamp means someone rebuilt it already."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


class _Worker:
    """A worker process (worker.py) for one user query.

    Starting one costs ~0.2 s, nearly all of it importing DuckDB, so one spare is kept started: it imports
    DuckDB and then waits for its request on stdin, holding no file and no lock. A spare whose parent exits
    reads end-of-file and exits too.
    """

    _spare: _Worker | None = None
    _spare_lock = threading.Lock()

    def __init__(self) -> None:
        self.stderr = tempfile.TemporaryFile()  # noqa: SIM115 - closed in close(), it outlives this call
        # -P: the script's folder (this package) must not shadow top-level modules in the worker.
        self.proc = subprocess.Popen(
            [sys.executable, "-P", str(WORKER)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr
        )

    @classmethod
    def take(cls) -> _Worker:
        with cls._spare_lock:
            worker, cls._spare = cls._spare, None
        if worker is not None and worker.proc.poll() is None:
            return worker
        if worker is not None:
            worker.close()
        return cls()

    @classmethod
    def prepare_spare(cls) -> None:
        with cls._spare_lock:
            if cls._spare is None:
                cls._spare = cls()

    @classmethod
    def discard_spare(cls) -> None:
        with cls._spare_lock:
            worker, cls._spare = cls._spare, None
        if worker is not None:
            worker.close()

    def run(self, request: dict[str, Any], *, deadline_s: float) -> tuple[list[str], list[tuple], tuple[str, dict]]:
        """Send the request and read the answer: (columns, rows, (last message's kind, payload)). A worker that
        is still running after `deadline_s` is killed ("killed"); one that died otherwise is "died"."""
        proc = self.proc
        assert proc.stdin is not None and proc.stdout is not None
        killed = threading.Event()

        def kill() -> None:
            killed.set()
            proc.kill()

        watchdog = threading.Timer(deadline_s, kill)
        watchdog.daemon = True
        watchdog.start()
        columns: list[str] = []
        rows: list[tuple] = []
        end: tuple[str, dict[str, Any]] | None = None
        try:
            with contextlib.suppress(BrokenPipeError):
                proc.stdin.write(json.dumps(request).encode("utf-8"))
                proc.stdin.close()
            while end is None:
                try:
                    kind, payload = pickle.load(proc.stdout)
                except (EOFError, pickle.UnpicklingError):
                    break  # the worker died: its exit status says how
                if kind == "columns":
                    columns = payload
                elif kind == "rows":
                    rows.extend(payload)
                else:
                    end = (kind, payload)
            proc.wait()
        except BaseException:
            proc.kill()
            proc.wait()
            raise
        finally:
            watchdog.cancel()
        if end is None:
            if killed.is_set():
                return columns, rows, ("killed", {})
            self.stderr.seek(0)
            tail = self.stderr.read()[-2000:].decode("utf-8", "replace").strip().splitlines()
            return columns, rows, ("died", {"returncode": proc.returncode, "message": tail[-1] if tail else ""})
        return columns, rows, end

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout, self.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


atexit.register(_Worker.discard_spare)


def _stored(table: str) -> list[Any]:
    """A copied table's columns that exist in the store (the others are computed in the snapshot)."""
    return [c for c in TABLES[table] if c.source is None or c.source.startswith("CAST(s.")]


def _canonical_json(value: str | None) -> str:
    if value is None:
        return "{}"
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    if parsed is None or parsed == {}:
        return "{}"
    return json.dumps(parsed, sort_keys=True, ensure_ascii=False)


def _cols(table: str) -> str:
    """The store columns of a small table, as the probe hashes them (they have no computed columns)."""
    return ", ".join(c.name for c in TABLES[table])


# -- the incremental copy -------------------------------------------------------------------------------


class _Sync:
    """One refresh. An incremental one is one DuckDB transaction on the snapshot: all of it lands, or none.

    Rows are read from the store in id ranges through `source()`/`sources()`: on PostgreSQL the scanner's
    attachment, on SQLite Python's own sqlite3 as Arrow batches (see the module docstring for why).
    """

    def __init__(self, an: Analytics) -> None:
        self.an = an
        self.postgres = an.dialect == "postgresql"
        self.copied: dict[str, int] = {}
        self.deleted: dict[str, int] = {}
        self.attached = False
        self.rebuilding = False
        self.canonical_json_ready = False
        try:
            self.conn = an._connect_writer()
        except (duckdb.IOException, duckdb.SerializationException, duckdb.InternalException) as exc:
            if "lock" in str(exc).lower():
                raise CallbotError(f"The analytics snapshot is open elsewhere: {an._say(exc)}") from exc
            # The snapshot is a cache: one DuckDB cannot open (another version's, a torn file) is rebuilt.
            an._remove_snapshot()
            self.conn = an._connect_writer()

    # -- helpers

    def commit_piece(self) -> None:
        """While building a new snapshot, commit piece by piece: DuckDB holds a transaction's new rows in
        memory, and a first copy of a million messages in one transaction needs ~1 GB. A build cut short
        leaves no state row, so the next refresh starts it again; an incremental refresh stays one
        transaction (it is small, and readers never see half of it)."""
        if self.rebuilding:
            self.conn.execute("COMMIT")
            self.conn.execute("BEGIN TRANSACTION")

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
        if self.use_scanner(table, low, high):
            return self.scanner_table(table)
        import pyarrow as pa

        stage = f"stage_{table}"
        batches = list(self.native_batches(table, "id > {p} AND id <= {p}", (low, high)))
        self.conn.register(stage, pa.Table.from_batches(batches, self.native_schema(table)))
        return stage

    def sources(self, table: str, low: int, high: int) -> Iterator[str]:
        """Like `source`, in pieces of at most STAGE_CHUNK rows when read natively, so a first copy of a
        million messages never holds them all in memory at once."""
        if self.use_scanner(table, low, high):
            yield self.scanner_table(table)
            return
        stage = f"stage_{table}"
        for batch in self.native_batches(table, "id > {p} AND id <= {p}", (low, high)):
            self.conn.register(stage, batch)
            yield stage
            self.conn.unregister(stage)

    def use_scanner(self, table: str, low: int, high: int) -> bool:
        # PostgreSQL's scanner is the fast way to copy many rows; for a few, loading it and attaching
        # costs more (~0.1 s) than reading them over the store's own connection.
        return self.postgres and table not in SMALL_TABLES and high - low > NATIVE_MAX_ROWS

    def scanner_table(self, table: str) -> str:
        if not self.attached:
            self.conn.execute(f"LOAD {_quote(str(scanner_extension_path('postgres')))}")
            conninfo = _quote(libpq_conninfo(self.an.store.url))
            try:
                self.conn.execute(f"ATTACH {conninfo} AS {SOURCE} (TYPE postgres, READ_ONLY)")
            except duckdb.Error as exc:
                raise ConfigError(f"Analytics could not read the store: {self.an._say(exc)}") from exc
            self.attached = True
        return f"{SOURCE}.{table}"

    @staticmethod
    def native_schema(table: str) -> Any:
        """The Arrow schema of a table's stored columns as read natively: timestamps as UTC text, booleans
        as integers (SQLite's own forms); the copy's CASTs turn them into the snapshot's types."""
        import pyarrow as pa

        arrow = {"BIGINT": pa.int64(), "INTEGER": pa.int64(), "DOUBLE": pa.float64(), "VARCHAR": pa.string(),
                 "TIMESTAMP": pa.string(), "BOOLEAN": pa.int64()}  # fmt: skip
        return pa.schema([(c.name, arrow[c.type]) for c in _stored(table)])

    def native_batches(self, table: str, where: str, params: tuple) -> Iterator[Any]:
        """Rows read over the store's own driver (for SQLite: Python's sqlite3, see the module docstring),
        as Arrow record batches. `where` marks parameters with `{p}`."""
        import pyarrow as pa

        schema = self.native_schema(table)
        if self.postgres:
            exprs = [
                f"to_char({c.name} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')" if c.type == "TIMESTAMP"
                else f"CAST({c.name} AS INTEGER)" if c.type == "BOOLEAN"
                else f"CAST({c.name} AS TEXT)" if c.json
                else c.name
                for c in _stored(table)
            ]  # fmt: skip
            mark = "%s"
        else:
            exprs, mark = [c.name for c in _stored(table)], "?"
        sql = f"SELECT {', '.join(exprs)} FROM {table} WHERE {where.replace('{p}', mark)} ORDER BY id"
        with self.an.store.engine.connect() as sa_conn:
            cursor = sa_conn.connection.dbapi_connection.cursor()  # type: ignore[union-attr]
            try:
                cursor.execute(sql, params)
                while rows := cursor.fetchmany(STAGE_CHUNK):
                    columns = zip(*rows, strict=True)
                    yield pa.record_batch(
                        [pa.array(values, type=f.type) for values, f in zip(columns, schema, strict=True)], schema
                    )
            finally:
                cursor.close()

    def fetch_by_id(self, table: str, ids: list[int]) -> Any:
        """Whole rows by id, read natively, as one Arrow table."""
        import pyarrow as pa

        batches = []
        for i in range(0, len(ids), 5000):
            chunk = tuple(ids[i : i + 5000])
            batches += self.native_batches(table, f"id IN ({', '.join(['{p}'] * len(chunk))})", chunk)
        return pa.Table.from_batches(batches, self.native_schema(table))

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
            state is None or state.get("format") != str(SNAPSHOT_FORMAT) or state.get("source") != self.an._source_id
        )
        if rebuilt:
            self.conn.close()
            self.an._remove_snapshot()
            self.conn = self.an._connect_writer()
            state = {}
        assert state is not None
        params = json.loads(state["params"]) if state.get("params") else None
        expected = json.loads(state["expected"]) if state.get("expected") else None
        # One probe serves both: the comparison, and the highest ids to copy up to.
        probe = self.an._probe(params or {f"{t}_from": 2**62 for t in APPEND_ONLY}, full=True)
        if params is not None and expected is not None and _matches(probe, expected):
            # In step after all (the sidecar was lost, or another process refreshed while we waited).
            return self._finish(params, expected, changed=False, rebuilt=False)
        try:
            self.rebuilding = rebuilt
            self.conn.execute("BEGIN TRANSACTION")
            if rebuilt:
                self.create_schema()
            self.sync_small(probe, json.loads(state.get("small", "{}")))
            self.sync_conversations(probe)
            for table in APPEND_ONLY:
                self.sync_append_only(table, probe[table][0] or 0)
            self.sync_unlinked_retrievals(probe)
            self.sync_system_metrics(probe)
            self.commit_piece()
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
            json_columns = [c.name for c in TABLES[table] if c.json]
            if json_columns:
                self.ensure_canonical_json()
                sets = ", ".join(f"{c} = canonical_json({c})" for c in json_columns)
                self.conn.execute(f"UPDATE raw.{table} SET {sets}")
            self.add(self.copied, table, n)
            self.add(self.deleted, table, max(before - n, 0))

    def ensure_canonical_json(self) -> None:
        """`canonical_json(text)` on the refresh connection: sorted keys, '{}' for NULL, JSON null or empty."""
        if self.canonical_json_ready:
            return
        self.conn.create_function(
            "canonical_json", _canonical_json, ["VARCHAR"], "VARCHAR", null_handling="special", side_effects=False
        )
        self.canonical_json_ready = True

    def snapshot_conversations(self) -> tuple[list[Any], list[int]]:
        """The probe's figures for conversations, read from the snapshot."""
        row = self.conn.execute(
            """SELECT max(id), max(started_at), count(*), count(ended_at), count(summary_short), count(summary_full),
                      count(user_id), count(CASE WHEN status = 'ended' THEN 1 END),
                      sum(length(summary_short)), sum(length(summary_full))
               FROM raw.conversations"""
        ).fetchone()
        key = [row[0] and int(row[0]), _naive_utc(row[1]), *(int(v or 0) for v in row[2:8])]
        return key, [int(v or 0) for v in row[8:]]

    def sync_conversations(self, probe: dict[str, Any]) -> None:
        top = probe["conversations"][0] or 0
        have = self.one("SELECT coalesce(max(id), 0) FROM raw.conversations")
        for rel in self.sources("conversations", have, top) if top > have else ():
            n = self.count(
                f"INSERT INTO raw.conversations SELECT {self.select_list('conversations')} "
                f"FROM {rel} s WHERE s.id > ? AND s.id <= ? ORDER BY s.id",
                [have, top],
            )
            self.add(self.copied, "conversations", n)
            self.commit_piece()
        wanted = (probe["conversations"], probe["conversation_lengths"])
        if self.snapshot_conversations() == wanted:
            return
        # Usually a conversation ended or was summarised: only active or unsummarised ones can be, in the
        # app, so those are read again first. Anything else (a deletion, a reused id) is found by comparing
        # every conversation's key columns, and only the rows that differ are read in full.
        candidates = [
            row[0]
            for row in self.conn.execute(
                "SELECT id FROM raw.conversations WHERE status = 'active' OR summary_short IS NULL "
                "OR summary_full IS NULL ORDER BY id"
            ).fetchall()
        ]
        if len(candidates) <= CANDIDATE_LIMIT:
            self.apply_conversations(self.fetch_by_id("conversations", candidates), candidates)
            if self.snapshot_conversations() == wanted:
                return
        self.reconcile_conversations(top)

    def apply_conversations(self, rows: Any, scope: list[int]) -> None:
        """Make the snapshot's conversations with ids in `scope` match `rows`, just read from the store."""
        import pyarrow as pa

        self.conn.register("fetched_conversations", rows)
        self.conn.execute(
            f"CREATE OR REPLACE TEMP TABLE src_conversations AS SELECT {self.select_list('conversations')} "
            "FROM fetched_conversations s"
        )
        self.conn.unregister("fetched_conversations")
        self.conn.register("scope_ids", pa.table({"id": pa.array(scope, type=pa.int64())}))
        self.conn.execute("CREATE OR REPLACE TEMP TABLE scope AS SELECT id FROM scope_ids")
        self.conn.unregister("scope_ids")
        in_scope = "r.id IN (SELECT id FROM scope)"
        # Gone, or replaced under the same id (a different start): their rows leave the snapshot.
        self.conn.execute(
            f"""CREATE OR REPLACE TEMP TABLE gone AS
               SELECT r.id FROM raw.conversations r LEFT JOIN src_conversations s ON s.id = r.id
               WHERE {in_scope} AND (s.id IS NULL OR s.started_at IS DISTINCT FROM r.started_at)"""
        )
        self.delete_gone()
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
        for temp in ("src_conversations", "scope", "gone"):
            self.conn.execute(f"DROP TABLE {temp}")

    def delete_gone(self) -> None:
        if not self.one("SELECT count(*) FROM gone"):
            return
        # A turn's stages and retrievals hang off its turn_metrics row, so they go first, found through it.
        for table in ("turn_stages", "turn_retrievals"):
            n = self.count(
                f"DELETE FROM raw.{table} WHERE turn_metrics_id IN "
                "(SELECT id FROM raw.turn_metrics WHERE conversation_id IN (SELECT id FROM gone))"
            )
            self.add(self.deleted, table, n)
        for table in ("turn_metrics", "messages", "conversations"):
            key = "id" if table == "conversations" else "conversation_id"
            self.add(self.deleted, table, self.count(f"DELETE FROM raw.{table} WHERE {key} IN (SELECT id FROM gone)"))

    def reconcile_conversations(self, top: int) -> None:
        """Compare every conversation's key columns with the store; read in full only the rows that differ."""
        import pyarrow as pa

        if self.postgres:

            def ts(col: str) -> str:
                return f"to_char({col} AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS.US')"
        else:

            def ts(col: str) -> str:
                return col

        sql = (
            f"SELECT id, {ts('started_at')}, {ts('ended_at')}, status, user_id, length(summary_short), "
            "length(summary_full) FROM conversations WHERE id <= :top"
        )
        with self.an.store.engine.connect() as c:
            keys = c.execute(text(sql), {"top": top}).all()
        names = ["id", "started_at", "ended_at", "status", "user_id", "short_len", "full_len"]
        types = [pa.int64(), pa.string(), pa.string(), pa.string(), pa.int64(), pa.int64(), pa.int64()]
        columns = list(zip(*keys, strict=True)) if keys else [()] * len(names)
        self.conn.register(
            "fetched_keys",
            pa.table([pa.array(list(v), type=t) for v, t in zip(columns, types, strict=True)], names=names),
        )
        self.conn.execute(
            """CREATE OR REPLACE TEMP TABLE src_keys AS
               SELECT id, CAST(started_at AS TIMESTAMP) AS started_at, CAST(ended_at AS TIMESTAMP) AS ended_at,
                      status, user_id, short_len, full_len
               FROM fetched_keys"""
        )
        self.conn.unregister("fetched_keys")
        self.conn.execute(
            """CREATE OR REPLACE TEMP TABLE gone AS
               SELECT r.id FROM raw.conversations r LEFT JOIN src_keys s ON s.id = r.id
               WHERE s.id IS NULL OR s.started_at IS DISTINCT FROM r.started_at"""
        )
        self.delete_gone()
        stale = [
            row[0]
            for row in self.conn.execute(
                """SELECT s.id FROM src_keys s LEFT JOIN raw.conversations r ON r.id = s.id
                   WHERE r.id IS NULL OR r.ended_at IS DISTINCT FROM s.ended_at OR r.status IS DISTINCT FROM s.status
                      OR r.user_id IS DISTINCT FROM s.user_id
                      OR length(r.summary_short) IS DISTINCT FROM s.short_len
                      OR length(r.summary_full) IS DISTINCT FROM s.full_len
                   ORDER BY s.id"""
            ).fetchall()
        ]
        self.conn.execute("DROP TABLE src_keys")
        self.conn.execute("DROP TABLE gone")
        if stale:
            self.apply_conversations(self.fetch_by_id("conversations", stale), stale)

    def sync_append_only(self, table: str, top: int) -> None:
        have = self.one(f"SELECT coalesce(max(id), 0) FROM raw.{table}")
        low = max(have - PG_ID_MARGIN, 0) if self.postgres else have
        if top <= low:
            return
        # Conversations were copied first and only rows up to the probe's highest id are read, so a row's
        # conversation is in the snapshot already, or was deleted with it (the next probe sees that), or on
        # PostgreSQL commits late and arrives with the next refresh.
        for rel in self.sources(table, low, top):
            rows = (
                f"SELECT {self.select_list(table)} FROM {rel} s WHERE s.id > ? AND s.id <= ? "
                f"AND NOT EXISTS (SELECT 1 FROM raw.{table} r WHERE r.id > ? AND r.id = s.id)"
            )
            if table != "turn_metrics":
                n = self.count(f"INSERT INTO raw.{table} SELECT * FROM ({rows}) ORDER BY id", [low, top, low])
            else:
                # A turn's start and word counts come from its messages, copied just before. Only messages
                # from the new turns' lowest id on are joined: DuckDB skips the older row groups unread.
                self.conn.execute(f"CREATE OR REPLACE TEMP TABLE new_turns AS {rows}", [low, top, low])
                first = self.one("SELECT min(user_message_id) FROM new_turns")
                n = self.count(
                    """INSERT INTO raw.turn_metrics
                    SELECT t.* REPLACE (um.created_at AS started_at, um.words AS user_words, am.words AS bot_words)
                    FROM new_turns t
                    LEFT JOIN (SELECT id, created_at, words FROM raw.messages WHERE id >= $first) um
                           ON um.id = t.user_message_id
                    LEFT JOIN (SELECT id, words FROM raw.messages WHERE id >= $first) am
                           ON am.id = t.assistant_message_id
                    ORDER BY t.id""",
                    {"first": first or 0},
                )
                self.conn.execute("DROP TABLE new_turns")
            self.add(self.copied, table, n)
            self.commit_piece()

    def unlinked_retrievals(self) -> int:
        return self.count("SELECT count(*) FROM raw.turn_retrievals WHERE chunk_id IS NULL")

    def sync_unlinked_retrievals(self, probe: dict[str, Any]) -> None:
        """Follow the store's ON DELETE SET NULL of turn_retrievals.chunk_id (a chunk deleted or re-ingested).

        A chunk_id only ever goes from a chunk to NULL, so when the store's count of unlinked rows differs from
        the snapshot's, the store's unlinked ids are read (from the chunk_id index) and those rows unlinked here.
        """
        import pyarrow as pa

        if self.unlinked_retrievals() == probe["unlinked_retrievals"]:
            return
        with self.an.store.engine.connect() as c:
            ids = c.execute(text("SELECT id FROM turn_retrievals WHERE chunk_id IS NULL")).scalars().all()
        self.conn.register("unlinked_ids", pa.table({"id": pa.array(ids, type=pa.int64())}))
        n = self.count(
            "UPDATE raw.turn_retrievals SET chunk_id = NULL "
            "WHERE chunk_id IS NOT NULL AND id IN (SELECT id FROM unlinked_ids)"
        )
        self.conn.unregister("unlinked_ids")
        self.add(self.copied, "turn_retrievals", n)

    def sync_system_metrics(self, probe: dict[str, Any]) -> None:
        count, top = probe["system_metrics"]
        top = top or 0
        have_count, have_top = self.conn.execute(
            "SELECT count(*), coalesce(max(id), 0) FROM raw.system_metrics"
        ).fetchone()
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
        key, lengths = self.snapshot_conversations()
        out: dict[str, Any] = {"conversations": key, "conversation_lengths": lengths}
        for table in APPEND_ONLY:
            top, window = self.conn.execute(
                f"SELECT max(id), count(*) FILTER (WHERE id > ?) FROM raw.{table}", [params[f"{table}_from"]]
            ).fetchone()
            out[table] = [top and int(top), int(window)]
        count, top = self.conn.execute("SELECT count(*), max(id) FROM raw.system_metrics").fetchone()
        out["system_metrics"] = [int(count), top and int(top)]
        out["unlinked_retrievals"] = self.unlinked_retrievals()
        out["small"] = probe["small"]
        return out
