"""CLI fixtures: `callbot` in this process (click's runner) against the test store, on SQLite and PostgreSQL."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from callbot_core.cli import cli
from callbot_core.settings import get_settings
from callbot_core.store import Store


@pytest.fixture
def callbot(store: Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[object]:
    """`callbot ARGS` in this process against the test store; returns click's result."""
    monkeypatch.setenv("CALLBOT_DATABASE_URL", store.url)
    monkeypatch.setenv("CALLBOT_RUNTIME_DIR", str(tmp_path / "runtime"))
    monkeypatch.delenv("CALLBOT_CLI_USER", raising=False)
    get_settings.cache_clear()
    runner = CliRunner()

    def _invoke(*args: str, input: str | None = None) -> Result:
        return runner.invoke(cli, list(args), input=input)

    yield _invoke
    get_settings.cache_clear()
