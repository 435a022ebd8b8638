"""Signed-in sessions, kept in the store so every request can check them and an admin's change can end them.

A sign-in (`start`) makes a random token for the client (the browser's cookie, or any other front end); the store
keeps only its SHA-256 digest, so a copy of the table signs nobody in. `user_for` answers on every request whether
the token still names a live session: it exists, is not revoked, has not expired, and its user still exists. A
cookie is only a carrier: a copied cookie dies with its session.

Sign-out revokes one session (`end`). Changing a user's password or role, an admin locking the account and
deleting it revoke all of that user's sessions (`revoke_all`, called inside those changes' own transactions in
`access.signin`). A lockout after failed guesses does not: it stops new sign-ins only, so a stranger guessing
passwords cannot throw the owner out of a session they already have.

No Streamlit here: the browser app and the HTTP API share this.
"""

from __future__ import annotations

import hashlib
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import delete, func, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.access.users import UserInfo, user_info
from callbot_core.errors import NotFound
from callbot_core.store import Store
from callbot_core.store.models import User, UserSession, utcnow

SESSION_TTL = timedelta(days=1)
# Ended sessions are kept this long after they end (the audit log keeps the history for good), then pruned.
KEEP_ENDED = timedelta(days=7)
# 32 random bytes: a token cannot be guessed, so the store needs no per-token salt or slow hash.
TOKEN_BYTES = 32
# The audit log's and this table's address columns are 64 characters.
ADDR_CHARS = 64


@dataclass(frozen=True, slots=True)
class NewSession:
    """A session just started: `token` goes to the client and is never stored."""

    token: str
    expires_at: datetime
    user: UserInfo


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def clip_addr(client_addr: str | None) -> str | None:
    return client_addr[:ADDR_CHARS] if client_addr else None


def start(store: Store, user: UserInfo, *, client_addr: str | None = None, ttl: timedelta = SESSION_TTL) -> NewSession:
    """A new session for `user`, who has just proved who they are (`signin.authenticate`)."""
    token = secrets.token_urlsafe(TOKEN_BYTES)
    now = utcnow()
    try:
        with store.session() as session:
            # Tidy this user's long-ended sessions as they start a new one: the table stays small without a job.
            session.execute(
                delete(UserSession).where(
                    UserSession.user_id == user.id,
                    or_(UserSession.expires_at < now - KEEP_ENDED, UserSession.revoked_at < now - KEEP_ENDED),
                )
            )
            session.add(
                UserSession(
                    user_id=user.id,
                    token_hash=token_digest(token),
                    created_at=now,
                    expires_at=now + ttl,
                    client_addr=clip_addr(client_addr),
                )
            )
    except IntegrityError as exc:  # the user was deleted between the password check and now
        raise NotFound(f"Unknown user {user.username!r}") from exc
    return NewSession(token=token, expires_at=now + ttl, user=user)


def user_for(store: Store, token: str | None) -> UserInfo | None:
    """The user of a live session, as stored now (role included); None for a missing, revoked or expired one."""
    if not token or not isinstance(token, str):
        return None
    with store.session() as session:
        user = session.scalar(
            select(User)
            .join(UserSession, UserSession.user_id == User.id)
            .where(
                UserSession.token_hash == token_digest(token),
                UserSession.revoked_at.is_(None),
                UserSession.expires_at > utcnow(),
            )
        )
        return None if user is None else user_info(user)


def end(store: Store, token: str | None, *, client_addr: str | None = None) -> bool:
    """Sign-out: revoke this one session (audited as `logout`). False when it was not live (nothing to end)."""
    if not token:
        return False
    now = utcnow()
    with store.session() as session:
        row = session.scalar(
            select(UserSession).where(UserSession.token_hash == token_digest(token), UserSession.revoked_at.is_(None))
        )
        if row is None:
            return False
        row.revoked_at = now
        username = session.scalar(select(User.username).where(User.id == row.user_id))
        audit.record(session, "logout", actor=username, detail={"session": row.id}, client_addr=clip_addr(client_addr))
    return True


def revoke_all(session: Session, user_id: int) -> int:
    """End every live session of one user inside the caller's transaction, so the change that warrants it (a new
    password, a new role, a lock) and the revocation commit together. Returns how many were ended."""
    result = session.execute(
        update(UserSession)
        .where(UserSession.user_id == user_id, UserSession.revoked_at.is_(None))
        .values(revoked_at=utcnow())
        .execution_options(synchronize_session=False)
    )
    return int(result.rowcount or 0)


def live_counts(store: Store) -> dict[str, int]:
    """How many live sessions each user has, by username (users with none are left out): the admin's user list."""
    with store.session() as session:
        rows = session.execute(
            select(User.username, func.count(UserSession.id))
            .join(UserSession, UserSession.user_id == User.id)
            .where(UserSession.revoked_at.is_(None), UserSession.expires_at > utcnow())
            .group_by(User.username)
        )
        return {name: int(count) for name, count in rows}
