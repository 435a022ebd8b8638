"""Passwords out of anything a person or a log can read: database URLs, libpq connection strings, error text.

A connection string reaches messages by many roads (a failed ATTACH echoes it, a driver error quotes it, a
notebook parameter is written into the .ipynb), so the rule is here once and every road goes through it.
"""

from __future__ import annotations

import re
from urllib.parse import unquote

from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

MASK = "***"

# scheme://user:password@host — the password is whatever sits between the first ':' after the user and the '@'.
_URL_PASSWORD = re.compile(r"(?P<head>[A-Za-z][A-Za-z0-9+.\-]*://[^:/@\s'\"]*:)(?P<password>[^@\s'\"]*)(?P<at>@)")
# libpq key=value strings (what the postgres scanner's ATTACH takes): password=secret or password='se cret'.
_KV_PASSWORD = re.compile(r"(?P<head>\bpassword\s*=\s*)(?P<password>'(?:[^'\\]|\\.)*'|\S+)", re.IGNORECASE)


def redact_url(url: str) -> str:
    """The URL with its password masked; text that is not a URL comes back with any password-looking part masked."""
    try:
        return make_url(url).render_as_string(hide_password=True)
    except (ArgumentError, ValueError):
        return scrub(url)


def scrub(text: str, *secrets: str | None) -> str:
    """`text` with every URL or key=value password masked, and every known secret in `secrets` too.

    Known secrets catch what no pattern can: a password quoted on its own by a driver's error message. Their
    percent-decoded form is masked as well, since URLs carry passwords encoded and drivers echo them decoded.
    """
    text = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['at']}", text)
    text = _KV_PASSWORD.sub(lambda m: f"{m['head']}{MASK}", text)
    for secret in secrets:
        if not secret or len(secret) < 3:  # masking "a" everywhere would garble the message and hide nothing
            continue
        for form in {secret, unquote(secret)}:
            text = text.replace(form, MASK)
    return text


def url_password(url: str | None) -> str | None:
    """The password inside a database URL, for `scrub`'s known secrets; None when there is none."""
    if not url:
        return None
    try:
        return make_url(url).password  # type: ignore[return-value]
    except (ArgumentError, ValueError):
        match = _URL_PASSWORD.search(url)
        return match["password"] if match else None
