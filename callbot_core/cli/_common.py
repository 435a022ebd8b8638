"""Helpers every command group shares: the checked store, tables, one-line cells."""

from __future__ import annotations

from collections.abc import Sequence

from callbot_core.errors import ConfigError
from callbot_core.settings import get_settings
from callbot_core.store import Store, open_store


def open_checked_store(migrated: bool = True) -> Store:
    settings = get_settings()
    store = open_store(settings)
    if migrated and not store.is_migrated():
        raise ConfigError(
            f"The store at {settings.resolved_database_url()} has no tables yet: run `callbot db upgrade` first"
        )
    return store


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
