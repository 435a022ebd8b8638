"""`callbot report` and `callbot pipelines` (being written)."""

from __future__ import annotations

import click


@click.group()
def report() -> None:
    """Notebook reports."""


@click.group()
def pipelines() -> None:
    """Scheduled pipelines."""
