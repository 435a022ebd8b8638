"""The audit log: who did what to what, from where."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from callbot_core.access.permissions import Actor, require
from callbot_core.store.models import AuditLog

if TYPE_CHECKING:
    from callbot_core.store import Store


def record(
    session: Session,
    action: str,
    *,
    actor: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    client_addr: str | None = None,
) -> AuditLog:
    """Add an audit row to the caller's transaction, so the action and its record commit together."""
    row = AuditLog(actor=actor, action=action, target=target, detail=detail, client_addr=client_addr)
    session.add(row)
    return row


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    created_at: datetime
    actor: str | None
    action: str
    target: str | None
    detail: dict[str, Any] | None
    client_addr: str | None


def recent(store: Store, *, actor: Actor, limit: int = 200, action_prefix: str | None = None) -> list[AuditEntry]:
    """The newest audit entries, optionally only actions starting with `action_prefix` (e.g. "login.").

    The log says who did what from where, so reading it is `audit.read` (admins).
    """
    require(actor, "audit.read")
    query = select(AuditLog).order_by(AuditLog.id.desc()).limit(limit)
    if action_prefix:
        query = query.where(AuditLog.action.startswith(action_prefix, autoescape=True))
    with store.session() as session:
        return [
            AuditEntry(r.id, r.created_at, r.actor, r.action, r.target, r.detail, r.client_addr)
            for r in session.scalars(query)
        ]


def log(
    store: Store,
    action: str,
    *,
    actor: str | None = None,
    target: str | None = None,
    detail: dict[str, Any] | None = None,
    client_addr: str | None = None,
) -> None:
    """Record an action that has no transaction of its own (a sign-out, a viewed export)."""
    with store.session() as session:
        record(session, action, actor=actor, target=target, detail=detail, client_addr=client_addr)
