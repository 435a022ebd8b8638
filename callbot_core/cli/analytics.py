"""`callbot sql`: read-only SQL over the analytics snapshot of the store (see callbot_core/analytics)."""

from __future__ import annotations

import json
import sys
from datetime import date, datetime, time
from decimal import Decimal
from pathlib import Path
from typing import Any

import click

from callbot_core.cli._common import acting_user, open_checked_store, table
from callbot_core.errors import InvalidInput

FORMATS = ("table", "csv", "json", "parquet")


def _cell(value: Any) -> Any:
    """A value as JSON can carry it: timestamps as ISO text, decimals as numbers, bytes as hex."""
    if isinstance(value, datetime | date | time):
        return value.isoformat()
    if isinstance(value, Decimal):
        return float(value)
    if isinstance(value, bytes | bytearray):
        return value.hex()
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    return value


def _print_list() -> None:
    from callbot_core.analytics import VIEW_DOCS
    from callbot_core.analytics.views import RAW_TABLES_NOTE

    for doc in VIEW_DOCS:
        click.secho(doc.name, bold=True)
        click.echo(f"  {doc.description}")
        width = max(len(name) for name, _ in doc.columns)
        for name, meaning in doc.columns:
            click.echo(f"    {name.ljust(width)}  {meaning}")
        click.echo()
    click.echo(RAW_TABLES_NOTE)


@click.command("sql")
@click.argument("query", required=False)
@click.option("--format", "fmt", type=click.Choice(FORMATS), default="table", show_default=True)
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the whole result to this file (csv, json or parquet) instead of printing it.",
)
@click.option(
    "--max-rows",
    type=click.IntRange(0),
    default=1000,
    show_default=True,
    help="Rows printed at most (--out writes them all).",
)
@click.option(
    "--timeout",
    "timeout_s",
    type=click.FloatRange(min=0.01),
    default=30.0,
    show_default=True,
    help="Seconds before the query is stopped.",
)
@click.option("--list", "list_views", is_flag=True, help="List the views you can query, with their columns.")
def sql_cmd(
    query: str | None, fmt: str, out: Path | None, max_rows: int, timeout_s: float, list_views: bool
) -> None:  # fmt: skip
    """Run one read-only SQL query (DuckDB dialect) over the store's analytics snapshot.

    \b
    Examples:
      callbot sql "select persona, count(*) from turns group by 1"
      callbot sql "select * from persona_performance" --format csv --out perf.csv
      callbot sql --list
    Anything that writes or reaches outside the snapshot is refused.
    """
    if list_views:
        _print_list()
        return
    if not query or not query.strip():
        raise InvalidInput('Give a query, e.g. callbot sql "select persona, count(*) from turns group by 1", '
                           "or --list to see the views")  # fmt: skip
    if fmt == "parquet" and out is None:
        raise InvalidInput("--format parquet writes a binary file: give --out FILE")
    if out is not None and fmt == "table":
        raise InvalidInput("--out needs --format csv, json or parquet")

    from callbot_core.analytics import Analytics
    from callbot_core.settings import get_settings

    store = open_checked_store()  # a clear error if the store has not been migrated yet
    actor = acting_user(store)
    an = Analytics.open(get_settings())
    if out is not None:
        rows = an.export(query, fmt, out, actor=actor, timeout_s=timeout_s)
        click.echo(f"Wrote {rows} row(s) to {out}.")
        return
    result = an.query(query, max_rows=max_rows, timeout_s=timeout_s, actor=actor)
    if fmt == "table":
        click.echo(table(result.columns, [[_cell(v) for v in row] for row in result.rows]))
    elif fmt == "csv":
        import csv

        from callbot_core.csv_safety import safe_csv_cell

        # CRLF (RFC 4180): the csv module quotes a cell holding a carriage return only when it ends lines.
        writer = csv.writer(sys.stdout, lineterminator="\r\n")
        writer.writerow(result.columns)
        writer.writerows([[safe_csv_cell(_cell(v)) for v in row] for row in result.rows])
    else:
        records = [dict(zip(result.columns, (_cell(v) for v in row), strict=True)) for row in result.rows]
        click.echo(json.dumps(records, ensure_ascii=False, indent=1))
    note = f"{len(result.rows)} row(s) in {result.elapsed_ms:,.0f} ms"
    if result.truncated:
        note += f"; showing the first {max_rows} (raise --max-rows, or --out FILE for all)"
    click.secho(note, dim=True, err=True)
