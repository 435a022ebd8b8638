"""Signing in: password checks against the store, lockout after repeated failures, managing users.

The store is the one source of truth for accounts: the browser app's login form calls
`authenticate`, so lockout, audit and last-login work the same for every front end. Managing users
(create, role, password, lock, unlock, delete) is `user.manage` in `access.permissions`: every front end creates
accounts through `create_user` here, so the check cannot be skipped.

What someone signing in learns is only "yes" or "no": a wrong password, an unknown name, a locked account and a
throttled client all answer None after the same bcrypt check, so neither the message nor the time taken tells
them apart. The audit log records the real reason.
"""

from __future__ import annotations

import functools
import secrets
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import ColumnElement, case, func, literal, null, or_, select, update
from sqlalchemy.orm import Session

from callbot_core.access import audit, sessions
from callbot_core.access.permissions import Actor, require
from callbot_core.access.users import (  # UserInfo is re-exported: the front ends import it from here
    USERNAME_RE,
    UserInfo,
    hash_password,
    normalize_username,
    user_info,
    verify_password,
)
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.store import Store
from callbot_core.store.models import ROLES, AuditLog, User, utcnow

MAX_FAILED_LOGINS = 5
LOCK_DURATION = timedelta(minutes=15)
# Per client address as well as per account (OWASP ASVS 2.2.1): one address guessing across many accounts is
# refused after this many failures within the window. Generous, so a team behind one NAT address is not refused.
CLIENT_MAX_FAILURES = 20
CLIENT_WINDOW = timedelta(minutes=15)
# An admin's lock lasts until an admin unlocks.
LOCKED_UNTIL_UNLOCKED = datetime(9999, 12, 31, tzinfo=UTC)
ADMIN_USERNAME = "admin"
# The audit log's actor column is 64 characters; a longer name typed at the form is cut, not a database error.
ACTOR_CHARS = 64
# Audit actions counted as a client's failures: wrong passwords, unknown names, attempts on a locked account.
_CLIENT_FAILURES = ("login.failed", "login.refused")


# A real bcrypt hash of a random string: checking a password against it for unknown usernames
# takes as long as for real ones, so response times do not reveal which usernames exist.
@functools.cache
def _dummy_hash() -> str:
    # Made on first use, not at import: hashing costs as much as a sign-in, and most commands never sign in.
    return hash_password(secrets.token_urlsafe(16))


def _not_locked(now: datetime) -> ColumnElement[bool]:
    return or_(User.locked_until.is_(None), User.locked_until <= now)


def _recent_client_failures(session: Session, client_addr: str, now: datetime) -> int:
    return int(
        session.scalar(
            select(func.count(AuditLog.id)).where(
                AuditLog.client_addr == client_addr,
                AuditLog.action.in_(_CLIENT_FAILURES),
                AuditLog.created_at >= now - CLIENT_WINDOW,
            )
        )
        or 0
    )


def authenticate(store: Store, username: str, password: str, *, client_addr: str | None = None) -> UserInfo | None:
    """The user if the password is right, else None: for a wrong password, an unknown name, a locked account and
    a client with too many recent failures alike (the audit log says which).

    The password is taken exactly as given (spaces included). The fifth failure in a row locks the account for
    15 minutes; a lock that has run out starts the count again. A lock stops new sign-ins only: sessions already
    open stay (`access.sessions`).
    """
    name = normalize_username(username)
    actor = name[:ACTOR_CHARS] or None
    addr = sessions.clip_addr(client_addr)
    password = password if isinstance(password, str) else ""
    now = utcnow()
    # Read, then check the password outside any transaction: bcrypt takes ~0.2 s at production cost, and no row
    # should stay locked meanwhile. What changes is then written by conditional updates that re-check the lock.
    with store.session() as session:
        throttled = addr is not None and _recent_client_failures(session, addr, now) >= CLIENT_MAX_FAILURES
        row = (
            session.execute(select(User.id, User.password_hash, User.locked_until).where(User.username == name)).first()
            if USERNAME_RE.match(name)
            else None  # cannot exist; not even asked, so an over-long name never reaches a length-limited column
        )
    # Always one bcrypt check, whatever the outcome, so the time taken reveals nothing.
    password_ok = verify_password(password, row.password_hash if row is not None else _dummy_hash())
    if throttled:
        detail: dict[str, Any] = {
            "reason": "too many failures from this address",
            "window_minutes": int(CLIENT_WINDOW.total_seconds() // 60),
        }
        audit.log(store, "login.throttled", actor=actor, detail=detail, client_addr=addr)
        return None
    if row is None:
        audit.log(store, "login.failed", actor=actor, detail={"reason": "unknown user"}, client_addr=addr)
        return None
    if row.locked_until is not None and row.locked_until > now:
        audit.log(store, "login.refused", actor=actor, detail={"reason": "locked"}, client_addr=addr)
        return None
    if password_ok:
        return _succeed(store, row.id, row.password_hash, name, now, addr)
    _fail(store, row.id, name, now, addr)
    return None


def _succeed(
    store: Store, user_id: int, checked_hash: str, name: str, now: datetime, addr: str | None
) -> UserInfo | None:
    with store.session() as session:
        # Conditional: a parallel guess may have locked the account, or an admin changed the password, since the read.
        user = session.scalar(
            update(User)
            .where(User.id == user_id, User.password_hash == checked_hash, _not_locked(now))
            .values(failed_logins=0, locked_until=None, last_login_at=now)
            .returning(User)
            .execution_options(synchronize_session=False)
        )
        if user is None:
            audit.record(session, "login.refused", actor=name, detail={"reason": "locked or changed meanwhile"},
                         client_addr=addr)  # fmt: skip
            return None
        audit.record(session, "login.ok", actor=name, client_addr=addr)
        return user_info(user)


def _fail(store: Store, user_id: int, name: str, now: datetime, addr: str | None) -> None:
    # Counted in the database, not read-modify-written here: parallel guesses each add one, and the update that
    # reaches the limit sets the lock in the same statement. Its WHERE re-checks the lock after waiting for any
    # parallel update of the row, so once locked, later guesses count as refused, not as failures.
    lock_until = now + LOCK_DURATION
    # A lock that has run out (the WHERE lets only expired ones through) starts the count again at 1.
    count = case((User.locked_until.is_(None), User.failed_logins + 1), else_=literal(1))
    with store.session() as session:
        counted = session.execute(
            update(User)
            .where(User.id == user_id, _not_locked(now))
            .values(
                failed_logins=count,
                locked_until=case(
                    (count >= MAX_FAILED_LOGINS, literal(lock_until, User.__table__.c.locked_until.type)),
                    else_=null(),
                ),
            )
            .returning(User.failed_logins, User.locked_until)
            .execution_options(synchronize_session=False)
        ).first()
        if counted is None:
            audit.record(session, "login.refused", actor=name, detail={"reason": "locked"}, client_addr=addr)
            return
        detail: dict[str, Any] = {"reason": "wrong password", "failed_logins": counted.failed_logins}
        if counted.locked_until is not None:
            detail["locked_until"] = counted.locked_until.isoformat()
            audit.record(session, "user.locked", actor=name, target=name, detail=detail, client_addr=addr)
        audit.record(session, "login.failed", actor=name, detail=detail, client_addr=addr)


def get_user_info(store: Store, username: str) -> UserInfo:
    with store.session() as session:
        return user_info(_get(session, username))


def list_users(store: Store) -> list[UserInfo]:
    with store.session() as session:
        return [user_info(u) for u in session.scalars(select(User).order_by(User.username))]


def is_locked(user: UserInfo, now: datetime | None = None) -> bool:
    """Whether new sign-ins are refused now (after failed guesses, or an admin's lock)."""
    return user.locked_until is not None and user.locked_until > (now or utcnow())


def _get(session: Session, username: str) -> User:
    name = normalize_username(username)
    user = session.scalar(select(User).where(User.username == name)) if USERNAME_RE.match(name) else None
    if user is None:
        raise NotFound(f"Unknown user {username!r}")
    return user


def _add_user(
    session: Session, username: str, password: str, *, role: str, display_name: str, email: str | None, by: str
) -> User:
    username = normalize_username(username)
    if not USERNAME_RE.match(username):
        raise InvalidInput(f"Username {username!r} is not valid: use 2-64 letters, digits, '.', '_' or '-'")
    if role not in ROLES:
        raise InvalidInput(f"Role {role!r} is not valid; roles: {', '.join(ROLES)}")
    if session.scalar(select(User.id).where(User.username == username)) is not None:
        raise Conflict(f"User {username!r} already exists")
    user = User(
        username=username,
        password_hash=hash_password(password),
        role=role,
        display_name=display_name or username,
        email=email,
    )
    session.add(user)
    session.flush()
    audit.record(session, "user.add", actor=by, target=username, detail={"role": role})
    return user


def create_user(
    store: Store, username: str, password: str, *, role: str = "researcher", display_name: str = "",
    email: str | None = None, actor: Actor,
) -> UserInfo:  # fmt: skip
    """A new account (the one way every front end creates one); `actor` must be allowed `user.manage`."""
    require(actor, "user.manage")
    with store.session() as session:
        return user_info(_add_user(session, username, password, role=role, display_name=display_name, email=email,
                               by=actor.username))  # fmt: skip


def set_role(store: Store, username: str, role: str, *, actor: Actor, client_addr: str | None = None) -> None:
    """Change a user's role; their open sessions end, so the new role applies from their next sign-in."""
    require(actor, "user.manage")
    if role not in ROLES:
        raise InvalidInput(f"Role {role!r} is not valid; roles: {', '.join(ROLES)}")
    with store.session() as session:
        user = _get(session, username)
        if user.role == "admin" and role != "admin" and _admin_count(session) <= 1:
            raise InvalidInput("The last admin cannot lose the admin role: make another admin first")
        if user.role == role:
            return
        old, user.role = user.role, role
        ended = sessions.revoke_all(session, user.id)
        audit.record(session, "user.role", actor=actor.username, target=user.username,
                     detail={"from": old, "to": role, "sessions_ended": ended}, client_addr=client_addr)  # fmt: skip


def reset_password(store: Store, username: str, password: str, *, actor: Actor, client_addr: str | None = None) -> None:
    """Set a new password (taken exactly as given) and unlock; every open session of the user ends."""
    require(actor, "user.manage")
    new_hash = hash_password(password)
    with store.session() as session:
        user = _get(session, username)
        user.password_hash = new_hash
        user.failed_logins = 0
        user.locked_until = None
        ended = sessions.revoke_all(session, user.id)
        audit.record(session, "user.password_reset", actor=actor.username, target=user.username,
                     detail={"sessions_ended": ended}, client_addr=client_addr)  # fmt: skip


def lock(
    store: Store, username: str, *, actor: Actor, until: datetime | None = None, client_addr: str | None = None
) -> None:
    """An admin's lock: no new sign-ins until `until` (default: until an admin unlocks), and every open session
    ends now. Unlike a lockout after failed guesses, this one is meant to throw the user out."""
    require(actor, "user.manage")
    with store.session() as session:
        user = _get(session, username)
        if user.username == actor.username:
            raise InvalidInput("You cannot lock your own account")
        user.locked_until = until or LOCKED_UNTIL_UNLOCKED
        ended = sessions.revoke_all(session, user.id)
        detail: dict[str, Any] = {"sessions_ended": ended, "by_admin": True}
        if until is not None:
            detail["locked_until"] = until.isoformat()
        audit.record(session, "user.locked", actor=actor.username, target=user.username, detail=detail,
                     client_addr=client_addr)  # fmt: skip


def unlock(store: Store, username: str, *, actor: Actor, client_addr: str | None = None) -> None:
    require(actor, "user.manage")
    with store.session() as session:
        user = _get(session, username)
        user.failed_logins = 0
        user.locked_until = None
        audit.record(session, "user.unlock", actor=actor.username, target=user.username, client_addr=client_addr)


def delete_user(store: Store, username: str, *, actor: Actor, client_addr: str | None = None) -> None:
    """Remove an account. Its sessions and saved queries go with it (ON DELETE CASCADE); its conversations stay,
    without a user. The last admin cannot be deleted, nor can an admin delete themself."""
    require(actor, "user.manage")
    with store.session() as session:
        user = _get(session, username)
        if user.username == actor.username:
            raise InvalidInput("You cannot delete your own account")
        if user.role == "admin" and _admin_count(session) <= 1:
            raise InvalidInput("The last admin cannot be deleted: make another admin first")
        # Revoked explicitly as well as by the cascade, so the audit row says how many sessions ended.
        ended = sessions.revoke_all(session, user.id)
        session.delete(user)
        audit.record(session, "user.delete", actor=actor.username, target=user.username,
                     detail={"sessions_ended": ended}, client_addr=client_addr)  # fmt: skip


def _admin_count(session) -> int:  # type: ignore[no-untyped-def]
    return len(list(session.scalars(select(User.id).where(User.role == "admin"))))


def ensure_admin(store: Store, password: str | None = None) -> str | None:
    """Create the `admin` account if the store has no admin yet.

    Returns the password when one was generated (to be shown once), else None.
    """
    with store.session() as session:
        if _admin_count(session):
            return None
        generated = None
        if not password:
            password = generated = secrets.token_urlsafe(12)
        # No acting user yet (this makes the first one): the bootstrap is recorded as "setup".
        _add_user(session, ADMIN_USERNAME, password, role="admin", display_name="Administrator", email=None, by="setup")
    return generated
