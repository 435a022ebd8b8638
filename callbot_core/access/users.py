"""Users and passwords (bcrypt)."""

from __future__ import annotations

import re

import bcrypt
from sqlalchemy import select
from sqlalchemy.orm import Session

from callbot_core.access import audit
from callbot_core.errors import Conflict, InvalidInput
from callbot_core.store.models import ROLES, User

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{2,64}$")
MIN_PASSWORD_CHARS = 8
# bcrypt looks at the first 72 bytes only; refuse longer so two different passwords never collide.
MAX_PASSWORD_BYTES = 72


def hash_password(password: str) -> str:
    validate_password(password)
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt()).decode("ascii")


def verify_password(password: str, password_hash: str) -> bool:
    try:
        return bcrypt.checkpw(password.encode("utf-8"), password_hash.encode("ascii"))
    except ValueError:
        return False


def validate_password(password: str) -> None:
    if len(password) < MIN_PASSWORD_CHARS:
        raise InvalidInput(f"Password is too short: use at least {MIN_PASSWORD_CHARS} characters")
    if len(password.encode("utf-8")) > MAX_PASSWORD_BYTES:
        raise InvalidInput(f"Password is too long: bcrypt uses at most {MAX_PASSWORD_BYTES} bytes")


def add_user(
    session: Session,
    username: str,
    password: str,
    *,
    role: str = "researcher",
    display_name: str = "",
    email: str | None = None,
    actor: str | None = None,
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
    audit.record(session, "user.add", actor=actor, target=username, detail={"role": role})
    return user


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))
