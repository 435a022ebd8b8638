"""Passwords (bcrypt), the user as the front ends see it (`UserInfo`), and looking users up. Accounts are created and
changed through `access.signin`, which checks that the acting user may manage users.

Passwords are taken exactly as typed: spaces at either end are part of the password when it is set and when it is
checked (only usernames are trimmed and lower-cased), so "  pass word  " set is "  pass word  " signed in with.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime

import bcrypt
from sqlalchemy import select
from sqlalchemy.orm import Session

from callbot_core.access.permissions import allowed
from callbot_core.errors import InvalidInput
from callbot_core.settings import get_settings
from callbot_core.store.models import User

USERNAME_RE = re.compile(r"^[A-Za-z0-9_.-]{2,64}$")
MIN_PASSWORD_CHARS = 8
# bcrypt looks at the first 72 bytes only; refuse longer so two different passwords never collide.
MAX_PASSWORD_BYTES = 72


def hash_password(password: str) -> str:
    validate_password(password)
    rounds = get_settings().bcrypt_rounds
    return bcrypt.hashpw(password.encode("utf-8"), bcrypt.gensalt(rounds)).decode("ascii")


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


def user_info(user: User) -> UserInfo:
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


def normalize_username(username: str | None) -> str:
    """Usernames are case-insensitive and trimmed: stored lower-case, as the login form sends them."""
    return (username or "").strip().lower()


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))
