"""Shared fixtures: a migrated store on SQLite and (when configured) PostgreSQL, settings, backends.

Store tests are parametrised over `store_url`: SQLite always, PostgreSQL when
CALLBOT_TEST_DATABASE_URL is set. In CI (CI=true) a missing PostgreSQL is a failure, not a skip.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import text

from callbot_core.backends.llm import get_backend
from callbot_core.backends.llm.embedded import EmbeddedBackend
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import Base
from callbot_core.store.seeds import seed_default_personas


def _worker_url(url: str | None) -> str | None:
    """Under pytest-xdist (`make test` and `make test-fast` run two workers) each worker gets a database of its own,
    `<name>_gw0`…, created on first use: every worker empties its test database before it starts."""
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if not url or not worker:
        return url
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"{base.database}_{worker}"
    admin = create_engine(base.set(database="postgres"), isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            if conn.scalar(text("SELECT 1 FROM pg_database WHERE datname = :n"), {"n": name}) is None:
                conn.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        admin.dispose()
    return base.set(database=name).render_as_string(hide_password=False)


PG_URL = _worker_url(os.environ.get("CALLBOT_TEST_DATABASE_URL"))
IN_CI = os.environ.get("CI", "").lower() == "true"

STORE_PARAMS = [
    pytest.param("sqlite", id="sqlite"),
    pytest.param("postgresql", id="postgresql", marks=pytest.mark.postgres),
]


# bcrypt at its production cost (~0.4 s a hash) would be most of the suite's time; the cost is a setting, and the
# tests of lockout and sign-in do not depend on it. Set before anything reads the settings, for subprocesses too.
os.environ.setdefault("CALLBOT_BCRYPT_ROUNDS", "4")


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


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        # A test that asks for the real model is a model test, whatever its module says.
        if "embedded" in fixtures:
            item.add_marker(pytest.mark.model)
        # The `callbot` command in a subprocess pays the interpreter's start and imports on every call.
        if "run" in fixtures or "cli" in fixtures:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def embedded() -> EmbeddedBackend:
    """The real embedded model, loaded and warmed once for the whole run."""
    settings = Settings(_env_file=None)  # type: ignore[call-arg]
    backend = get_backend("embedded", settings)
    assert isinstance(backend, EmbeddedBackend)
    return backend


CALLBOT = str(Path(sys.executable).with_name("callbot"))


@pytest.fixture
def run(tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Runs the installed `callbot` in a subprocess on a SQLite store of its own in `tmp_path`.

    `run.url` is that store's URL; `ok=False` lets a test look at a failure instead of asserting success.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env.update(CALLBOT_DATABASE_URL=url, CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"))
    env["CALLBOT_BCRYPT_ROUNDS"] = os.environ["CALLBOT_BCRYPT_ROUNDS"]

    def _run(
        *args: str, input: str | None = None, ok: bool = True, env_extra: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [CALLBOT, *args],
            input=input,
            capture_output=True,
            text=True,
            env={**env, **(env_extra or {})},
            cwd=tmp_path,
            timeout=120,
        )
        if ok:
            assert proc.returncode == 0, proc.stderr
        return proc

    _run.url = url  # type: ignore[attr-defined]
    return _run


@pytest.fixture
def cli(run: Callable[..., subprocess.CompletedProcess[str]]) -> Callable[..., subprocess.CompletedProcess[str]]:
    """The same as `run`, under the name the analytics tests use."""
    return run
