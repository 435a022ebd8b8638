"""One user query in a process of its own, so that the operating system bounds its memory, not DuckDB's goodwill.

DuckDB's `memory_limit` bounds its buffer manager only. The strings an expression builds for a vector are
allocated outside it: `select repeat('x', 100000000) from range(1000)` asks for 100 GB under a 200 MB limit
(measured with DuckDB 1.5.5), and in the app's process that is a crash for every user. An address-space limit
(RLIMIT_AS) does bound it (DuckDB then reports "Out of Memory"), but only a whole process can carry one. So
`Analytics.query` and `Analytics.export` run this file as a script (`python -P worker.py`: it imports only
DuckDB, pyarrow for exports, and the standard library) while they hold the snapshot's shared lock. Starting
one takes ~0.2 s, nearly all of it importing DuckDB, so the parent keeps one spare started (engine._Worker).

Protocol: one JSON request on stdin; pickled `(kind, payload)` messages on stdout, in this order:
`("columns", names)`, then `("rows", [tuple, ...])` any number of times, then one of `("done", {"truncated":
bool})`, `("written", {"rows": n})` or `("error", {"kind": ..., "type": ..., "message": ...})`, where kind is
`timeout`, `too_big`, `memory`, `write` or `failed`, type is DuckDB's exception class and message its first line.
Rows are counted in bytes as Python holds them (`sys.getsizeof`, recursively), and the worker stops at
`max_bytes`: the parent never receives more than that and one small batch.
"""

from __future__ import annotations

import json
import os
import pickle
import resource
import sys
import threading
from typing import IO, Any

# Rows per message are sized to about this many bytes, so the first oversized rows stop the query early.
BATCH_BYTES = 1 << 20
MAX_BATCH_ROWS = 2048


def _address_space() -> int | None:
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[0]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return None  # not Linux: DuckDB's own limit is all there is


def _cap_address_space(headroom: int) -> None:
    """This process may grow `headroom` bytes beyond what it holds now (DuckDB loaded, the snapshot open)."""
    now = _address_space()
    if now is None:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = now + headroom
    for cap in (soft, hard):
        if cap != resource.RLIM_INFINITY:
            limit = min(limit, cap)
    resource.setrlimit(resource.RLIMIT_AS, (limit, hard))


def _size(value: Any) -> int:
    if isinstance(value, list | tuple):
        return sys.getsizeof(value) + sum(_size(v) for v in value)
    if isinstance(value, dict):
        return sys.getsizeof(value) + sum(_size(k) + _size(v) for k, v in value.items())
    return sys.getsizeof(value)


def _first_line(exc: BaseException) -> str:
    lines = [line for line in str(exc).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(exc).__name__


def _send(out: IO[bytes], kind: str, payload: Any) -> None:
    pickle.dump((kind, payload), out, protocol=pickle.HIGHEST_PROTOCOL)
    out.flush()


def _rows(conn: Any, request: dict[str, Any], out: IO[bytes], connections: list[Any]) -> None:
    cursor = conn.execute(request["sql"])
    if not cursor.description:
        _send(out, "columns", [])
        _send(out, "done", {"truncated": False})
        return
    _send(out, "columns", [d[0] for d in cursor.description])
    wanted = request["max_rows"] + 1  # one more than kept tells the caller the result was cut
    max_bytes = request["max_bytes"]
    total = sent = 0
    batch = 1
    while sent < wanted:
        rows = cursor.fetchmany(min(batch, wanted - sent))
        if not rows:
            break
        total += sum(_size(row) for row in rows)
        if total > max_bytes:
            _send(out, "error", {"kind": "too_big", "type": "", "message": ""})
            return
        _send(out, "rows", rows)
        sent += len(rows)
        batch = max(1, min(MAX_BATCH_ROWS, int(BATCH_BYTES * sent / total)))
    _send(out, "done", {"truncated": sent > request["max_rows"]})


def _quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _file(conn: Any, request: dict[str, Any], out: IO[bytes], connections: list[Any]) -> None:
    import duckdb

    path = request["out"]
    try:
        open(path, "wb").close()  # a path we cannot write is reported as that, before the query runs
    except OSError as exc:
        _send(out, "error", {"kind": "write", "type": type(exc).__name__, "message": _first_line(exc)})
        return
    # The user's connection may not touch files; a second, in-memory one writes the stream it produces.
    reader = conn.execute(request["sql"]).to_arrow_reader(10_000)
    writer = duckdb.connect(":memory:", config=request["writer_config"])
    connections.append(writer)  # the timeout interrupts it too: it is the one pulling the user's query
    try:
        writer.register("result", reader)
        columns = writer.execute("DESCRIBE SELECT * FROM result").fetchall()
        select = []
        for name, column_type, *_ in columns:
            col = _quote_ident(name)
            if request["fmt"] == "csv" and column_type == "VARCHAR":
                # The spreadsheet rule of callbot_core.csv_safety, sent with the request, done by DuckDB.
                starts = ", ".join(f"chr({ord(c)})" for c in request["csv_formula_prefixes"])
                quote = "'" + request["csv_quote"].replace("'", "''") + "'"
                col = f"CASE WHEN left({col}, 1) IN ({starts}) THEN {quote} || {col} ELSE {col} END AS {col}"
            select.append(col)
        options = {"csv": "FORMAT csv, HEADER true", "json": "FORMAT json, ARRAY true", "parquet": "FORMAT parquet"}
        target = "'" + path.replace("'", "''") + "'"
        # The path is already a temporary file the parent renames: DuckDB's own `tmp_…` beside it would be left
        # behind by a query killed at its timeout.
        row = writer.execute(
            f"COPY (SELECT {', '.join(select)} FROM result) TO {target} ({options[request['fmt']]}, USE_TMP_FILE false)"
        )
        _send(out, "written", {"rows": int(row.fetchone()[0])})
    finally:
        writer.close()


def main() -> None:
    # The protocol gets its own copy of stdout; anything else printed (a library's warning) goes to stderr.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    # Imported before the request is read: a spare worker (see engine._Worker) has it loaded when one comes.
    import duckdb

    raw = sys.stdin.read()
    if not raw.strip():
        return  # a spare whose parent exited without using it
    request = json.loads(raw)

    try:
        conn = duckdb.connect(request["snapshot"], read_only=True, config=request["config"])
        for statement in request["setup"]:
            conn.execute(statement)
    except duckdb.Error as exc:
        _send(out, "error", {"kind": "failed", "type": type(exc).__name__, "message": _first_line(exc)})
        return
    if request["mode"] == "file":
        import pyarrow  # noqa: F401 - loaded before the cap: the export's stream needs it

    _cap_address_space(request["address_space"])
    connections = [conn]

    interrupted = threading.Event()

    def interrupt() -> None:
        interrupted.set()
        for c in list(connections):
            c.interrupt()

    timer = threading.Timer(request["timeout_s"], interrupt)
    timer.daemon = True
    timer.start()
    try:
        (_file if request["mode"] == "file" else _rows)(conn, request, out, connections)
    except duckdb.InterruptException as exc:
        _send(out, "error", {"kind": "timeout", "type": type(exc).__name__, "message": _first_line(exc)})
    except (duckdb.OutOfMemoryException, MemoryError) as exc:
        _send(out, "error", {"kind": "memory", "type": type(exc).__name__, "message": _first_line(exc)})
    except duckdb.Error as exc:
        # An export interrupted mid-stream surfaces as the stream's error ("arrow_scan: … INTERRUPT"), not as an
        # InterruptException: what the timer did decides what it was.
        kind = "timeout" if interrupted.is_set() else "failed"
        _send(out, "error", {"kind": kind, "type": type(exc).__name__, "message": _first_line(exc)})
    finally:
        timer.cancel()
        conn.close()
        out.close()


if __name__ == "__main__":
    main()
