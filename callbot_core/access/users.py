"""Passwords (bcrypt) and looking users up. Accounts are created and changed through `access.signin`, which checks
that the acting user may manage users."""

from __future__ import annotations

import re

import bcrypt
from sqlalchemy import select
from sqlalchemy.orm import Session

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


def get_user(session: Session, username: str) -> User | None:
    return session.scalar(select(User).where(User.username == username))
