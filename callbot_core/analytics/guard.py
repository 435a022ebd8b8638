"""The SQL guard: user SQL must be one read-only query over the analytics snapshot.

DuckDB's own parser decides, not a regex: `duckdb.extract_statements` splits and types the statements,
and `json_serialize_sql` gives the parse tree of a SELECT, which is walked for table functions and
file-path "tables" (DuckDB's replacement scans turn `FROM 'x.csv'` into a file read). The guard is the
first line; the connection that runs user SQL is the second: it is opened read-only, with external
access disabled and its configuration locked (see `engine.py`), so a query the guard missed still
cannot write, read files or reach the network.
"""

from __future__ import annotations

import json
import re
from typing import Any

import duckdb

from callbot_core.errors import InvalidInput

__all__ = ["ForbiddenSQL", "check_sql", "ALLOWED_TABLE_FUNCTIONS", "MAX_SQL_CHARS"]

# Longer than any query a person writes (the canned ones are under 2,000): parsing, auditing and storing a
# multi-megabyte "query" costs the server, and tells nobody anything.
MAX_SQL_CHARS = 100_000


class ForbiddenSQL(InvalidInput):
    """User SQL that would write, change settings, run several statements or reach outside the snapshot."""


# Table functions that only compute or describe the snapshot. Everything else is refused: most of
# DuckDB's table functions read files (read_csv, read_parquet, glob...), other databases (sqlite_scan,
# postgres_scan...), or run SQL given as a string (query, query_table), which would bypass this guard.
ALLOWED_TABLE_FUNCTIONS = frozenset(
    {
        "range",
        "generate_series",
        "unnest",
        "duckdb_views",
        "duckdb_tables",
        "duckdb_columns",
        "duckdb_schemas",
        "duckdb_types",
        "duckdb_functions",
        "duckdb_keywords",
        "pragma_table_info",
        "pragma_show",
    }
)

# Scalar functions refused wherever they appear: they read the environment or files, or change state.
FORBIDDEN_FUNCTIONS = frozenset({"getenv", "read_text", "read_blob", "setseed", "nextval", "currval", "file_exists"})

# Leading keywords of statements DuckDB types as SELECT although they are not plain queries
# (PRAGMA becomes a SELECT from a pragma function), and the ones we accept.
_READ_KEYWORDS = frozenset({"SELECT", "WITH", "VALUES", "FROM", "TABLE", "DESCRIBE", "DESC", "SHOW", "SUMMARIZE", "("})

_WHAT = {
    "COPY": "COPY (it writes or reads files)",
    "EXPORT": "EXPORT DATABASE (it writes files)",
    "INSTALL": "INSTALL (it downloads extensions)",
    "LOAD": "LOAD (it loads extensions)",
    "FORCE": "FORCE INSTALL (it downloads extensions)",
    "ATTACH": "ATTACH (it opens another database)",
    "DETACH": "DETACH",
    "PRAGMA": "PRAGMA (it reads or changes settings)",
    "SET": "SET (it changes settings)",
    "RESET": "RESET (it changes settings)",
    "USE": "USE (it changes the default database)",
    "CALL": "CALL",
    "CHECKPOINT": "CHECKPOINT",
    "FORCE CHECKPOINT": "CHECKPOINT",
    "EXPLAIN": "EXPLAIN",
}

_COMMENT_OR_SPACE = re.compile(r"(\s+|--[^\n]*(\n|$)|/\*.*?\*/)", re.S)
_FILEISH = re.compile(r"[./\\:~*?]|^(https?|s3|gcs|az|hf)\b", re.I)


def _leading_keyword(sql: str) -> str:
    """The first keyword of a statement, after comments and blanks (upper case)."""
    pos = 0
    while True:
        m = _COMMENT_OR_SPACE.match(sql, pos)
        if not m:
            break
        pos = m.end()
    rest = sql[pos:]
    if rest.startswith("("):
        return "("
    m = re.match(r"[A-Za-z_]+", rest)
    return m.group(0).upper() if m else rest[:10]


def _refuse(what: str) -> ForbiddenSQL:
    return ForbiddenSQL(f"Only read-only queries are allowed (one SELECT): {what} is refused")


def _walk(node: Any, found: list[str]) -> None:
    """Collect what the parse tree does that a read-only query over the snapshot must not."""
    if isinstance(node, list):
        for item in node:
            _walk(item, found)
        return
    if not isinstance(node, dict):
        return
    kind = node.get("type")
    if kind == "TABLE_FUNCTION":
        fn = node.get("function") or {}
        name = str(fn.get("function_name", "")).lower()
        if name not in ALLOWED_TABLE_FUNCTIONS:
            found.append(f"the table function {name}() (it may read files, other databases or the network)")
    elif kind == "BASE_TABLE":
        table = str(node.get("table_name", ""))
        if _FILEISH.search(table):
            found.append(f"reading the file {table!r} (a file path used as a table)")
    elif node.get("class") == "FUNCTION" or kind == "FUNCTION":
        name = str(node.get("function_name", "")).lower()
        if name in FORBIDDEN_FUNCTIONS or name.startswith(("read_", "sqlite_", "postgres_", "parquet_")):
            found.append(f"the function {name}()")
    for value in node.values():
        if isinstance(value, dict | list):
            _walk(value, found)


def _parse_tree(sql: str) -> dict[str, Any]:
    con = duckdb.connect(":memory:")
    try:
        raw = con.execute("SELECT json_serialize_sql(?::VARCHAR)", [sql]).fetchone()
    finally:
        con.close()
    return json.loads(raw[0]) if raw else {"error": True, "error_message": "no parse tree"}


def check_sql(sql: str) -> str:
    """The cleaned single read-only statement (no trailing semicolon), or ForbiddenSQL naming what is refused.

    Accepted: one SELECT (also WITH … SELECT, VALUES, FROM-first, DESCRIBE, SHOW, SUMMARIZE) that reads only
    the snapshot's tables and views. Syntax errors are reported as InvalidInput with DuckDB's message.
    """
    if not sql or not sql.strip():
        raise InvalidInput("The query is empty")
    if len(sql) > MAX_SQL_CHARS:
        raise InvalidInput(f"The query is {len(sql):,} characters long; the limit is {MAX_SQL_CHARS:,}")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise InvalidInput(f"The query is not valid SQL: {_first_line(exc)}") from exc
    if not statements:
        raise InvalidInput("The query is empty")
    if len(statements) > 1:
        kinds = ", ".join(_leading_keyword(s.query) for s in statements)
        raise ForbiddenSQL(f"Only one statement at a time is allowed: found {len(statements)} statements ({kinds})")
    stmt = statements[0]
    text = stmt.query.strip().rstrip(";").strip()
    # The user's own first word: DuckDB hands back some statements rewritten (PRAGMA x as a SELECT).
    keyword = _leading_keyword(sql)
    if stmt.type != duckdb.StatementType.SELECT:
        second = _leading_keyword(text[len(keyword) :]) if keyword == "FORCE" else ""
        label = _WHAT.get(f"{keyword} {second}".strip()) or _WHAT.get(keyword) or keyword
        raise _refuse(label)
    if keyword not in _READ_KEYWORDS:
        raise _refuse(_WHAT.get(keyword, keyword))
    tree = _parse_tree(text)
    if tree.get("error"):
        raise InvalidInput(f"The query is not valid SQL: {tree.get('error_message', 'unknown error')}")
    found: list[str] = []
    _walk(tree.get("statements", []), found)
    if found:
        raise _refuse(found[0])
    return text


def _first_line(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
