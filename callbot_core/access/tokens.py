"""Bearer tokens for programs that sign in with a password (the HTTP API's `POST /v1/auth/token`).

A token is a JWT (HS256, the store's secret) whose `sid` is a store session's token (`access.sessions`): the
signature keeps forged tokens out cheaply, the session makes a token revocable like the app's cookie. Signing out,
a new password, a role change, an admin's lock or deletion end it at once; `exp` ends it at the latest. The
password check is the app's own (`signin.authenticate`): the same lockout, throttling and audit.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

import jwt

from callbot_core.access import sessions, signin
from callbot_core.access.users import UserInfo
from callbot_core.store import Store

ALGORITHM = "HS256"
AUDIENCE = "callbot-api"
TOKEN_TTL = timedelta(hours=12)


@dataclass(frozen=True, slots=True)
class IssuedToken:
    token: str
    expires_at: datetime
    user: UserInfo


def issue(
    store: Store,
    secret: str,
    username: object,
    password: object,
    *,
    client_addr: str | None = None,
    ttl: timedelta = TOKEN_TTL,
) -> IssuedToken | None:
    """A token for a right password; None otherwise (wrong, unknown, locked, throttled: one answer)."""
    if not isinstance(username, str) or not isinstance(password, str):
        return None
    user = signin.authenticate(store, username, password, client_addr=client_addr)
    if user is None:
        return None
    new = sessions.start(store, user, client_addr=client_addr, ttl=ttl)
    claims = {"sub": user.username, "sid": new.token, "aud": AUDIENCE, "exp": new.expires_at}
    return IssuedToken(token=jwt.encode(claims, secret, algorithm=ALGORITHM), expires_at=new.expires_at, user=user)


def session_of(secret: str, token: str) -> str | None:
    """The store session token a JWT we signed carries; None for anything else (forged, expired, not ours)."""
    try:
        claims = jwt.decode(token, secret, algorithms=[ALGORITHM], audience=AUDIENCE)
    except jwt.PyJWTError:
        return None
    sid = claims.get("sid")
    return sid if isinstance(sid, str) else None


def user_for(store: Store, secret: str, token: str | None) -> UserInfo | None:
    """The user a live token stands for, as stored now; None when it is not one."""
    if not token or not isinstance(token, str):
        return None
    sid = session_of(secret, token)
    return sessions.user_for(store, sid) if sid else None


def revoke(store: Store, secret: str, token: str, *, client_addr: str | None = None) -> bool:
    """Sign a token out (its session ends); False when it was not live."""
    sid = session_of(secret, token)
    return sessions.end(store, sid, client_addr=client_addr) if sid else False
