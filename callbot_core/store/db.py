"""Opening the store: one engine per URL, SQLite tuned for a single machine, migrations to head."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from pathlib import Path
from typing import Any

from sqlalchemy import create_engine, event, inspect
from sqlalchemy.engine import Engine
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from callbot_core.errors import ConfigError, Duplicate
from callbot_core.settings import Settings, get_settings
from callbot_core.store import guards  # noqa: F401  (registers the ORM guards)
from callbot_core.store.redaction import redact_url
from callbot_core.store.seeds import seed_default_personas

# Shipped inside the package, so an installed wheel (a container image) migrates as a checkout does.
MIGRATIONS_DIR = Path(str(resources.files("callbot_core.store").joinpath("migrations")))


# Connections per engine: SQLAlchemy's default (5, and 10 more at peaks) starved the API under load. Each request
# holds one only for its short transactions, but 50 callers keep dozens of threads (the API's pool of 40, one
# reader per streamed reply) inside a session at once, and a thread waiting for a connection waited behind the
# GIL-bound stragglers holding one: p95 API overhead 114-317 ms with the CPU mostly idle, 41 ms with room for all
# (bench/api_load.py). PostgreSQL's default max_connections (100) fits two such processes.
POOL_SIZE, POOL_OVERFLOW = 20, 20


def make_engine(url: str, **kwargs: Any) -> Engine:
    if url.startswith("sqlite"):
        db_path = url.split("///", 1)[-1]
        if db_path and not db_path.startswith(":") and url != "sqlite://":
            Path(db_path).parent.mkdir(parents=True, exist_ok=True)
            kwargs = {"pool_size": POOL_SIZE, "max_overflow": POOL_OVERFLOW, **kwargs}  # in memory: one connection
        engine = create_engine(url, connect_args={"check_same_thread": False, "timeout": 30}, **kwargs)

        @event.listens_for(engine, "connect")
        def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
            cur = dbapi_conn.cursor()
            # Foreign keys are off by default in SQLite; WAL lets the app read while a turn is written,
            # and synchronous=NORMAL makes a commit cost well under a millisecond.
            cur.execute("PRAGMA foreign_keys=ON")
            cur.execute("PRAGMA journal_mode=WAL")
            cur.execute("PRAGMA synchronous=NORMAL")
            cur.close()

        return engine
    if url.startswith("postgresql"):
        return create_engine(url, pool_pre_ping=True, pool_size=POOL_SIZE, max_overflow=POOL_OVERFLOW, **kwargs)
    raise ConfigError(
        f"Unsupported CALLBOT_DATABASE_URL {redact_url(url)!r}: use sqlite:///… or postgresql+psycopg://…"
    )


class Store:
    """An engine and its session factory. Sessions do not expire on commit: rows stay readable."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = make_engine(url)
        self._sessions = sessionmaker(self.engine, expire_on_commit=False)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def session(self) -> Iterator[Session]:
        """A session in one transaction: committed on success, rolled back on any error.

        A unique-constraint violation becomes `Duplicate`, one line naming the table and key: code checks before
        it inserts, but two sessions saving the same key at the same moment both pass the check, and the loser
        should hear what happened, not see a driver's traceback.
        """
        try:
            with self._sessions() as session, session.begin():
                yield session
        except IntegrityError as exc:
            duplicate = _duplicate(exc)
            if duplicate is None:
                raise
            raise duplicate from exc

    def is_migrated(self) -> bool:
        return inspect(self.engine).has_table("alembic_version")

    def alembic_config(self) -> Any:
        from alembic.config import Config

        cfg = Config()
        cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
        # Percent signs in a URL (encoded passwords) would be read as interpolation by configparser.
        cfg.set_main_option("sqlalchemy.url", self.url.replace("%", "%%"))
        cfg.attributes["engine"] = self.engine
        return cfg

    def upgrade(self) -> None:
        """Migrate to head, then seed what a fresh store needs (the default personas)."""
        from alembic import command

        command.upgrade(self.alembic_config(), "head")
        seed_default_personas(self)

    def dispose(self) -> None:
        self.engine.dispose()


_SQLITE_UNIQUE = re.compile(r"UNIQUE constraint failed: (?P<columns>[\w., ]+)")
_PG_KEY = re.compile(r"Key \((?P<columns>[^)]*)\)=")


def _duplicate(exc: IntegrityError) -> Duplicate | None:
    """`Duplicate` for a unique violation on SQLite or PostgreSQL; None for any other integrity error."""
    orig = exc.orig
    table, columns = "", ""
    if (match := _SQLITE_UNIQUE.search(str(orig))) is not None:
        qualified = [c.strip() for c in match["columns"].split(",")]
        table = qualified[0].split(".")[0]
        columns = ", ".join(c.split(".")[-1] for c in qualified)
    elif getattr(orig, "sqlstate", None) == "23505":  # psycopg's unique_violation
        diag = orig.diag  # type: ignore[union-attr]
        table = diag.table_name or ""
        match = _PG_KEY.search(diag.message_detail or "")
        columns = match["columns"] if match else (diag.constraint_name or "")
    else:
        return None
    return Duplicate(
        f"Not saved: {table} already has a row with the same {columns} (another save got there first); "
        "nothing was stored, reload and try again"
    )


_stores: dict[str, Store] = {}


def open_store(settings: Settings | None = None, url: str | None = None) -> Store:
    """The process-wide store for the configured (or given) URL."""
    url = url or (settings or get_settings()).resolved_database_url()
    store = _stores.get(url)
    if store is None:
        store = _stores[url] = Store(url)
    return store
