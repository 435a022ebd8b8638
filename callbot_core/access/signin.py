"""Signing in: password checks against the store, lockout after repeated failures, managing users.

The store is the one source of truth for accounts: the browser app's login form calls
`authenticate`, so lockout, audit and last-login work the same for every front end. Managing users
(create, role, password, unlock) is `user.manage` in `access.permissions`: every front end creates
accounts through `create_user` here, so the check cannot be skipped.
"""

from __future__ import annotations

import functools
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, allowed, require
from callbot_core.access.users import USERNAME_RE, hash_password, verify_password
from callbot_core.errors import CallbotError, Conflict, InvalidInput, NotFound
from callbot_core.store import Store
from callbot_core.store.models import ROLES, User, utcnow

MAX_FAILED_LOGINS = 5
LOCK_DURATION = timedelta(minutes=15)
ADMIN_USERNAME = "admin"


# A real bcrypt hash of a random string: checking a password against it for unknown usernames
# takes as long as for real ones, so response times do not reveal which usernames exist.
@functools.cache
def _dummy_hash() -> str:
    # Made on first use, not at import: hashing costs as much as a sign-in, and most commands never sign in.
    return hash_password(secrets.token_urlsafe(16))


class AccountLocked(CallbotError):
    """Too many failed sign-ins: the account is locked until `until`."""

    def __init__(self, username: str, until: datetime) -> None:
        super().__init__(
            f"Account {username!r} is locked after {MAX_FAILED_LOGINS} failed sign-ins until "
            f"{until:%H:%M} UTC; an admin can unlock it"
        )
        self.until = until


@dataclass(frozen=True, slots=True)
class UserInfo:
    id: int
    username: str
    display_name: str
    email: str | None
    role: str
    last_login_at: datetime | None = None
    failed_logins: int = 0
    locked_until: datetime | None = None
    created_at: datetime | None = None

    # Shorthands for the front ends' menus; the rule itself is the permissions table's.
    @property
    def is_admin(self) -> bool:
        return allowed(self, "user.manage")

    @property
    def can_chat(self) -> bool:
        return allowed(self, "chat")


def _info(user: User) -> UserInfo:
    return UserInfo(
        id=user.id,
        username=user.username,
        display_name=user.display_name or user.username,
        email=user.email,
        role=user.role,
        last_login_at=user.last_login_at,
        failed_logins=user.failed_logins,
        locked_until=user.locked_until,
        created_at=user.created_at,
    )


def _is_locked(user: User, now: datetime) -> bool:
    return user.locked_until is not None and user.locked_until > now


def authenticate(store: Store, username: str, password: str, *, client_addr: str | None = None) -> UserInfo | None:
    """The user if the password is right; None if not. Raises `AccountLocked` while locked.

    Every attempt is audited. The fifth failure in a row locks the account for 15 minutes.
    """
    username = (username or "").strip().lower()
    now = utcnow()
    with store.session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            verify_password(password or "", _dummy_hash())
            audit.record(session, "login.failed", actor=username or None, detail={"reason": "unknown user"},
                         client_addr=client_addr)  # fmt: skip
            return None
        if _is_locked(user, now):
            audit.record(session, "login.refused", actor=username, detail={"reason": "locked"}, client_addr=client_addr)
            locked = AccountLocked(username, user.locked_until)  # type: ignore[arg-type]
        elif verify_password(password or "", user.password_hash):
            user.failed_logins = 0
            user.locked_until = None
            user.last_login_at = now
            audit.record(session, "login.ok", actor=username, client_addr=client_addr)
            return _info(user)
        else:
            user.failed_logins += 1
            detail: dict[str, object] = {"reason": "wrong password", "failed_logins": user.failed_logins}
            locked = None
            if user.failed_logins >= MAX_FAILED_LOGINS:
                user.locked_until = now + LOCK_DURATION
                detail["locked_until"] = user.locked_until.isoformat()
                audit.record(session, "user.locked", actor=username, target=username, detail=detail,
                             client_addr=client_addr)  # fmt: skip
                locked = AccountLocked(username, user.locked_until)
            audit.record(session, "login.failed", actor=username, detail=detail, client_addr=client_addr)
    # Raised after the transaction commits, so the failure count and the audit rows are kept.
    if locked is not None:
        raise locked
    return None


def get_user_info(store: Store, username: str) -> UserInfo:
    with store.session() as session:
        user = session.scalar(select(User).where(User.username == username))
        if user is None:
            raise NotFound(f"Unknown user {username!r}")
        return _info(user)


def list_users(store: Store) -> list[UserInfo]:
    with store.session() as session:
        return [_info(u) for u in session.scalars(select(User).order_by(User.username))]


def active_usernames(store: Store) -> dict[str, UserInfo]:
    """Users who may sign in now (not locked), by username."""
    now = utcnow()
    with store.session() as session:
        return {u.username: _info(u) for u in session.scalars(select(User)) if not _is_locked(u, now)}


def _get(session, username: str) -> User:  # type: ignore[no-untyped-def]
    user = session.scalar(select(User).where(User.username == username))
    if user is None:
        raise NotFound(f"Unknown user {username!r}")
    return user


def _add_user(
    session: Session, username: str, password: str, *, role: str, display_name: str, email: str | None, by: str
) -> User:
    # Usernames are case-insensitive: stored lower-case, as the login form sends them.
    username = username.strip().lower()
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
        return _info(_add_user(session, username, password, role=role, display_name=display_name, email=email,
                               by=actor.username))  # fmt: skip


def set_role(store: Store, username: str, role: str, *, actor: Actor, client_addr: str | None = None) -> None:
    require(actor, "user.manage")
    if role not in ROLES:
        raise InvalidInput(f"Role {role!r} is not valid; roles: {', '.join(ROLES)}")
    with store.session() as session:
        user = _get(session, username)
        if user.role == "admin" and role != "admin" and _admin_count(session) <= 1:
            raise InvalidInput("The last admin cannot lose the admin role: make another admin first")
        old, user.role = user.role, role
        audit.record(session, "user.role", actor=actor.username, target=username, detail={"from": old, "to": role},
                     client_addr=client_addr)  # fmt: skip


def reset_password(store: Store, username: str, password: str, *, actor: Actor, client_addr: str | None = None) -> None:
    require(actor, "user.manage")
    new_hash = hash_password(password)
    with store.session() as session:
        user = _get(session, username)
        user.password_hash = new_hash
        user.failed_logins = 0
        user.locked_until = None
        audit.record(session, "user.password_reset", actor=actor.username, target=username, client_addr=client_addr)


def unlock(store: Store, username: str, *, actor: Actor, client_addr: str | None = None) -> None:
    require(actor, "user.manage")
    with store.session() as session:
        user = _get(session, username)
        user.failed_logins = 0
        user.locked_until = None
        audit.record(session, "user.unlock", actor=actor.username, target=username, client_addr=client_addr)


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
