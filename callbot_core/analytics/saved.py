"""Canned queries: named SQL saved per user on the Analytics page, optionally shared with everyone.

The SQL is checked by the same guard as any user query when it is saved, so a saved query can never
be one that writes or reaches outside.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import or_, select
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.store import Store
from callbot_core.store.models import SavedQuery, User, utcnow

MAX_NAME_CHARS = 120
MAX_SQL_CHARS = 20_000


@dataclass(frozen=True, slots=True)
class SavedQueryInfo:
    id: int | None
    name: str
    sql: str
    description: str
    shared: bool
    owner: str
    updated_at: datetime | None = None

    @property
    def builtin(self) -> bool:
        return self.id is None


# Examples every user starts with: they show the views and answer the first questions people ask.
BUILTIN_QUERIES: tuple[SavedQueryInfo, ...] = (
    SavedQueryInfo(
        None,
        "Turns per persona",
        "select persona, count(*) as turns from turns group by 1 order by 2 desc",
        "How many assistant turns each persona has had.",
        True,
        "workbench",
    ),  # fmt: skip
    SavedQueryInfo(
        None,
        "Slowest personas (p95 TTFT)",
        "select persona, persona_version, turns, ttft_p95_ms, tokens_per_s_mean, error_rate\n"
        "from persona_performance order by ttft_p95_ms desc nulls last",
        "Persona versions ranked by their 95th-percentile time to first token.",
        True,
        "workbench",
    ),
    SavedQueryInfo(
        None,
        "Activity by day",
        "select * from daily_activity order by day desc limit 30",
        "Conversations, turns and errors per day, newest first.",
        True,
        "workbench",
    ),  # fmt: skip
    SavedQueryInfo(
        None,
        "Failed turns",
        "select started_at, persona, backend, model, error from turns where error is not null "
        "order by started_at desc limit 100",
        "The latest turns that failed, with their errors.",
        True,
        "workbench",
    ),
    SavedQueryInfo(
        None,
        "Leaderboard",
        "select * from leaderboard order by pass_rate desc nulls last",
        "Persona versions and parameter sets ranked by scenario-suite pass rate, with side-by-side votes.",
        True,
        "workbench",
    ),
)


def _check(name: str, sql: str) -> tuple[str, str]:
    from callbot_core.analytics.guard import check_sql

    name = (name or "").strip()
    if not name:
        raise InvalidInput("A saved query needs a name")
    if len(name) > MAX_NAME_CHARS:
        raise InvalidInput(f"The query name is too long: at most {MAX_NAME_CHARS} characters")
    if not (sql or "").strip():
        raise InvalidInput("The query is empty")
    if len(sql) > MAX_SQL_CHARS:
        raise InvalidInput(f"The query is too long: at most {MAX_SQL_CHARS:,} characters")
    check_sql(sql)
    return name, sql.strip()


def _info(row: SavedQuery, owner: str) -> SavedQueryInfo:
    return SavedQueryInfo(row.id, row.name, row.sql, row.description, row.shared, owner, row.updated_at)


def list_queries(store: Store, user_id: int) -> list[SavedQueryInfo]:
    """The built-in queries, then the user's own, then those others shared."""
    with store.session() as session:
        rows = session.execute(
            select(SavedQuery, User.username)
            .join(User, User.id == SavedQuery.owner_id)
            .where(or_(SavedQuery.owner_id == user_id, SavedQuery.shared.is_(True)))
            .order_by((SavedQuery.owner_id != user_id), SavedQuery.name)
        )
        return [*BUILTIN_QUERIES, *(_info(q, owner) for q, owner in rows)]


def _owner(session: Session, actor: Actor) -> User:
    user = session.scalar(select(User).where(User.username == actor.username))
    if user is None:
        # The local operator and scheduled jobs have no account to own a query: `callbot --as USERNAME` acts as one.
        raise NotFound(f"{actor.username!r} is not a stored user: saved queries belong to user accounts")
    return user


def save_query(
    store: Store, name: str, sql: str, *, actor: Actor, description: str = "", shared: bool = False,
    overwrite: bool = False,
) -> SavedQueryInfo:  # fmt: skip
    """Save (or with `overwrite`, replace) `actor`'s query called `name`."""
    require(actor, "query.save")
    name, sql = _check(name, sql)
    with store.session() as session:
        owner = _owner(session, actor)
        row = session.scalar(select(SavedQuery).where(SavedQuery.owner_id == owner.id, SavedQuery.name == name))
        if row is not None and not overwrite:
            raise Conflict(f"You already have a query called {name!r}: choose another name or overwrite it")
        if row is None:
            row = SavedQuery(owner_id=owner.id, name=name, sql=sql, description=description, shared=shared)
            session.add(row)
        else:
            row.sql, row.description, row.shared, row.updated_at = sql, description, shared, utcnow()
        session.flush()
        audit.record(session, "sql.save", actor=owner.username, target=name, detail={"shared": shared})
        return _info(row, owner.username)


def delete_query(store: Store, query_id: int, *, actor: Actor) -> None:
    """Delete a saved query: its owner may; someone else's needs `query.delete_others` (admins)."""
    require(actor, "query.save")
    with store.session() as session:
        row = session.get(SavedQuery, query_id)
        if row is None:
            raise NotFound(f"Unknown saved query {query_id}")
        owner = session.get(User, row.owner_id)
        if owner is None or owner.username != actor.username:
            require(actor, "query.delete_others")
        session.delete(row)
        audit.record(session, "sql.delete_saved", actor=actor.username, target=row.name)
