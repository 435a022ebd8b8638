"""`callbot sql`: read-only SQL over the analytics snapshot (being written)."""

from __future__ import annotations

import click


@click.command("sql")
def sql_cmd() -> None:
    """Run read-only SQL over the store (not ready yet)."""
    raise click.ClickException("callbot sql is not implemented yet")
