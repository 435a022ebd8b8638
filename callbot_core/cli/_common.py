"""Helpers every command group shares: the checked store, who acts, NAME=VALUE options, tables, one-line cells."""

from __future__ import annotations

from collections.abc import Sequence

import click

from callbot_core.access.permissions import LOCAL_OPERATOR, Actor
from callbot_core.errors import ConfigError, InvalidInput
from callbot_core.settings import get_settings
from callbot_core.store import Store, open_store
from callbot_core.store.redaction import redact_url

# Where `callbot --as USERNAME` leaves the name for `acting_user` (click shares `meta` with every sub-context).
AS_USER_KEY = "callbot.as_user"


def open_checked_store(migrated: bool = True) -> Store:
    settings = get_settings()
    store = open_store(settings)
    if migrated and not store.is_migrated():
        shown = redact_url(settings.resolved_database_url())
        raise ConfigError(f"The store at {shown} has no tables yet: run `callbot db upgrade` first")
    return store


def open_service(store: Store):  # type: ignore[no-untyped-def]
    """The conversation service for a command: with Redis configured its turns are published, so the API's live
    listeners see a `callbot chat` as they see the app's turns."""
    from callbot_core.conversations.events import live_observers
    from callbot_core.conversations.service import ConversationService

    return ConversationService(store=store, observers=live_observers(get_settings()))


def acting_user(store: Store) -> Actor:
    """Who acts in this command: the stored user named by `--as` (else CALLBOT_CLI_USER), with that user's role;
    without either, the local operator (an admin: whoever runs the CLI already holds the store's credentials)."""
    context = click.get_current_context(silent=True)
    username = (context.meta.get(AS_USER_KEY) if context is not None else None) or get_settings().cli_user
    if not username or not username.strip():
        return LOCAL_OPERATOR
    # Imported here: signin hashes a dummy password at import, a cost only `--as` should pay.
    from callbot_core.access.signin import get_user_info

    return get_user_info(store, username.strip().lower())


def parse_assignments(
    values: Sequence[str], *, error: str, require_value: bool = False, duplicate: str | None = None
) -> dict[str, str]:
    """Repeated `NAME=VALUE` options (`--var`, `--param`, `-p`) as a dict: names stripped, values kept as given.

    Messages are the option's own, formatted with `raw` (the item as given, quoted) and `name`. `error` is for a
    malformed item: no `=`, no name, or an empty value when `require_value`. A repeated name raises `duplicate`
    when given; otherwise the last value wins.
    """
    out: dict[str, str] = {}
    for raw in values:
        name, sep, value = raw.partition("=")
        name = name.strip()
        if not sep or not name or (require_value and not value.strip()):
            raise InvalidInput(error.format(raw=repr(raw), name=name))
        if duplicate is not None and name in out:
            raise InvalidInput(duplicate.format(raw=repr(raw), name=name))
        out[name] = value
    return out


def fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def one_line(text: str | None, width: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"
