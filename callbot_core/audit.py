"""The audit log: who did what to what, from where."""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from .store.models import AuditLog


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
