"""API keys: a program's credential instead of a password (the HTTP API's `Authorization: Bearer cbk_…`).

A key is shown once, when it is made; the store keeps only its SHA-256 digest (the key is 32 random bytes, so no
salt or slow hash is needed) and its first characters, so a person can tell their keys apart. A key acts as its
user, as stored now (a role change applies at once), narrowed to its scopes (`permissions.SCOPES`). It is refused
at once when revoked or expired, when its user is deleted (the row goes with the user) or locked by an admin until
unlocked. A lockout after failed password guesses does not stop keys: a stranger guessing passwords must not cut
off a program that holds a key.

A key's `last_used_at` is kept to the minute (written at most once a minute, so a busy key does not turn every
request into a write); a conversation a key starts remembers it, and every request's log line names its key.
"""

from __future__ import annotations

import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import or_, select, update

from callbot_core.access import audit
from callbot_core.access.permissions import SCOPES, Actor, require
from callbot_core.access.sessions import clip_addr, token_digest
from callbot_core.access.signin import LOCKED_UNTIL_UNLOCKED
from callbot_core.access.users import UserInfo, get_user, normalize_username, user_info
from callbot_core.errors import InvalidInput, NotFound
from callbot_core.store import Store
from callbot_core.store.models import ApiKey, User, utcnow

KEY_PREFIX = "cbk_"
KEY_BYTES = 32
SHOWN_CHARS = 12  # "cbk_" and 8 more: enough to tell keys apart, far too few to guess the rest
MAX_NAME_CHARS = 100
DEFAULT_SCOPES = ("chat", "read")
MAX_EXPIRY = timedelta(days=3650)
# last_used_at is written at most this often per key: a write per request would serialise SQLite under load.
USE_RESOLUTION = timedelta(minutes=1)
_DURATION = re.compile(r"^\s*(\d{1,5})\s*([dhm])\s*$")
_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


@dataclass(frozen=True, slots=True)
class KeyInfo:
    id: int
    username: str
    name: str
    prefix: str
    scopes: tuple[str, ...]
    created_at: datetime
    created_by: str | None
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None

    def state(self, now: datetime | None = None) -> str:
        """active, expired or revoked: what a list shows."""
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= (now or utcnow()):
            return "expired"
        return "active"


@dataclass(frozen=True, slots=True)
class NewKey:
    """A key just made: `key` is shown once and never stored."""

    key: str
    info: KeyInfo


@dataclass(frozen=True, slots=True)
class KeyActor:
    """A key's user acting through it: the role is the user's now, `scopes` narrow it (permissions.allowed)."""

    id: int
    username: str
    role: str
    scopes: frozenset[str]
    key_id: int
    key_name: str
    user: UserInfo


def parse_expiry(text: str | None) -> timedelta | None:
    """`90d`, `12h`, `30m` → a duration; None, '' or `never` → a key that does not expire."""
    if text is None or not str(text).strip() or str(text).strip().lower() == "never":
        return None
    match = _DURATION.match(str(text))
    if not match or int(match.group(1)) == 0:
        raise InvalidInput(f"Expiry {text!r} is not valid: give a number and d, h or m (e.g. 90d), or 'never'")
    duration = timedelta(**{_UNITS[match.group(2)]: int(match.group(1))})
    if duration > MAX_EXPIRY:
        raise InvalidInput(f"Expiry {text!r} is too long: at most {MAX_EXPIRY.days} days (or 'never')")
    return duration


def parse_scopes(value: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """`chat,read` (or a list) → the scopes in SCOPES order; unknown or no scopes are refused."""
    if value is None:
        return DEFAULT_SCOPES
    parts = value.split(",") if isinstance(value, str) else list(value)
    given = {str(p).strip().lower() for p in parts if str(p).strip()}
    unknown = sorted(given - set(SCOPES))
    if unknown:
        raise InvalidInput(f"Unknown scope {', '.join(map(repr, unknown))}: scopes are {', '.join(SCOPES)}")
    if not given:
        raise InvalidInput(f"Give at least one scope: {', '.join(SCOPES)}")
    return tuple(s for s in SCOPES if s in given)


def _info(row: ApiKey, username: str) -> KeyInfo:
    return KeyInfo(
        id=row.id,
        username=username,
        name=row.name,
        prefix=row.prefix,
        scopes=tuple(s for s in row.scopes.split(",") if s),
        created_at=row.created_at,
        created_by=row.created_by,
        expires_at=row.expires_at,
        revoked_at=row.revoked_at,
        last_used_at=row.last_used_at,
    )


def create_key(
    store: Store,
    username: str,
    name: str,
    *,
    actor: Actor,
    scopes: str | list[str] | tuple[str, ...] | None = None,
    expires_in: timedelta | None = None,
    client_addr: str | None = None,
) -> NewKey:
    """Make a key for `username`, labelled `name`; the returned key is its only copy."""
    require(actor, "apikey.manage")
    label = name.strip() if isinstance(name, str) else ""
    if not label:
        raise InvalidInput("Give the key a name (what it is for, e.g. 'asterisk-lab')")
    if len(label) > MAX_NAME_CHARS:
        raise InvalidInput(f"A key's name is at most {MAX_NAME_CHARS} characters; got {len(label)}")
    chosen = parse_scopes(scopes)
    key = KEY_PREFIX + secrets.token_urlsafe(KEY_BYTES)
    now = utcnow()
    with store.session() as session:
        user = get_user(session, normalize_username(username))
        if user is None:
            raise NotFound(f"Unknown user {username!r}")
        row = ApiKey(
            user_id=user.id,
            name=label,
            prefix=key[:SHOWN_CHARS],
            key_hash=token_digest(key),
            scopes=",".join(chosen),
            created_at=now,
            created_by=actor.username,
            expires_at=now + expires_in if expires_in is not None else None,
        )
        session.add(row)
        session.flush()
        audit.record(session, "apikey.create", actor=actor.username, target=user.username,
                     detail={"key": row.id, "name": label, "scopes": list(chosen),
                             "expires_at": row.expires_at.isoformat() if row.expires_at else None},
                     client_addr=clip_addr(client_addr))  # fmt: skip
        return NewKey(key=key, info=_info(row, user.username))


def list_keys(store: Store, *, actor: Actor, username: str | None = None) -> list[KeyInfo]:
    """Every key (or one user's), newest first; revoked and expired ones too, marked by `state()`."""
    require(actor, "apikey.manage")
    query = select(ApiKey, User.username).join(User, User.id == ApiKey.user_id).order_by(ApiKey.id.desc())
    if username is not None:
        query = query.where(User.username == normalize_username(username))
    with store.session() as session:
        return [_info(row, name) for row, name in session.execute(query)]


def revoke_key(store: Store, key_id: int, *, actor: Actor, client_addr: str | None = None) -> bool:
    """Revoke a key: refused from the next request on. False when it was already revoked."""
    require(actor, "apikey.manage")
    if isinstance(key_id, bool) or not isinstance(key_id, int):
        raise InvalidInput(f"A key id is a whole number; got {key_id!r}")
    with store.session() as session:
        row = session.get(ApiKey, key_id)
        if row is None:
            raise NotFound(f"No API key with id {key_id}")
        if row.revoked_at is not None:
            return False
        row.revoked_at = utcnow()
        audit.record(session, "apikey.revoke", actor=actor.username, target=str(key_id),
                     detail={"name": row.name}, client_addr=clip_addr(client_addr))  # fmt: skip
    return True


def looks_like_key(credential: str) -> bool:
    return credential.startswith(KEY_PREFIX)


def actor_for_key(store: Store, key: str | None) -> KeyActor | None:
    """The acting user of a live key, counting this use; None for an unknown, revoked or expired key, or one whose
    user an admin has locked until unlocked."""
    if not key or not isinstance(key, str) or not looks_like_key(key) or len(key) > 200:
        return None
    now = utcnow()
    with store.session() as session:
        found = session.execute(
            select(ApiKey, User)
            .join(User, User.id == ApiKey.user_id)
            .where(ApiKey.key_hash == token_digest(key), ApiKey.revoked_at.is_(None))
        ).first()
        if found is None:
            return None
        row, user = found
        if row.expires_at is not None and row.expires_at <= now:
            return None
        if user.locked_until is not None and user.locked_until >= LOCKED_UNTIL_UNLOCKED:
            return None
        if row.last_used_at is None or row.last_used_at < now - USE_RESOLUTION:
            # Conditional, so of parallel requests only one writes; the rest of the minute is read-only.
            session.execute(
                update(ApiKey)
                .where(
                    ApiKey.id == row.id, or_(ApiKey.last_used_at.is_(None), ApiKey.last_used_at < now - USE_RESOLUTION)
                )
                .values(last_used_at=now)
                .execution_options(synchronize_session=False)
            )
        info = user_info(user)
        return KeyActor(
            id=user.id,
            username=user.username,
            role=user.role,
            scopes=frozenset(s for s in row.scopes.split(",") if s),
            key_id=row.id,
            key_name=row.name,
            user=info,
        )
