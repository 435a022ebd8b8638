"""Shared fixtures: a migrated store on SQLite and (when configured) PostgreSQL, settings, backends.

Store tests are parametrised over `store_url`: SQLite always, PostgreSQL when
CALLBOT_TEST_DATABASE_URL is set. In CI (CI=true) a missing PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from callbot_core.llm import get_backend
from callbot_core.llm.embedded import EmbeddedBackend
from callbot_core.personas import seed_default_personas
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import Base

PG_URL = os.environ.get("CALLBOT_TEST_DATABASE_URL")
IN_CI = os.environ.get("CI", "").lower() == "true"

STORE_PARAMS = [pytest.param("sqlite", id="sqlite"), pytest.param("postgresql", id="postgresql")]


def pytest_configure(config: pytest.Config) -> None:
    if IN_CI and not PG_URL:
        raise pytest.UsageError("CI=true but CALLBOT_TEST_DATABASE_URL is not set: store tests need PostgreSQL")


def _reset_postgres(url: str) -> None:
    # The test database is disposable: start every run from an empty schema so migrations run for real.
    store = Store(url)
    with store.engine.begin() as conn:
        conn.execute(text("DROP SCHEMA public CASCADE"))
        conn.execute(text("CREATE SCHEMA public"))
    store.dispose()


@pytest.fixture(scope="session")
def _stores(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Store]]:
    stores: dict[str, Store] = {}
    yield stores
    for store in stores.values():
        store.dispose()


@pytest.fixture(params=STORE_PARAMS)
def store_url(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path_factory.getbasetemp() / 'store.db'}"
    if not PG_URL:
        if IN_CI:
            pytest.fail("CALLBOT_TEST_DATABASE_URL is required in CI")
        pytest.skip("PostgreSQL tests need CALLBOT_TEST_DATABASE_URL")
    return PG_URL


@pytest.fixture
def store(store_url: str, _stores: dict[str, Store]) -> Store:
    """A migrated store holding only the default personas."""
    existing = _stores.get(store_url)
    if existing is None:
        if store_url.startswith("postgresql"):
            _reset_postgres(store_url)
        existing = Store(store_url)
        existing.upgrade()
        _stores[store_url] = existing
    else:
        with existing.engine.begin() as conn:
            for table in reversed(Base.metadata.sorted_tables):
                conn.execute(table.delete())
        seed_default_personas(existing)
    return existing


@pytest.fixture
def settings(tmp_path: Path, store_url: str) -> Settings:
    return Settings(
        _env_file=None,  # type: ignore[call-arg]
        env="test",
        database_url=store_url,
        runtime_dir=tmp_path / "runtime",
        llm_backend="embedded",
        embedded_n_ctx=2048,
    )


@pytest.fixture(scope="session")
def embedded() -> EmbeddedBackend:
    """The real embedded model, loaded and warmed once for the whole run."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    backend = get_backend("embedded", settings)
    assert isinstance(backend, EmbeddedBackend)
    return backend
