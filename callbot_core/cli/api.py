"""`callbot api` serves the HTTP API; `callbot apikey` makes, lists and revokes the keys programs use with it."""

from __future__ import annotations

import click

from callbot_core.cli._common import acting_user, open_checked_store, table


@click.command("api")
@click.option("--host", default="127.0.0.1", show_default=True, help="Interface to listen on.")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535))
def api_cmd(host: str, port: int) -> None:
    """Serve the HTTP API (REST, WebSocket, OpenAI-compatible, /metrics); docs at /docs."""
    from callbot_core.api.server import serve
    from callbot_core.settings import get_settings

    settings = get_settings()
    settings.secret()  # a missing production secret is refused before the port is taken
    open_checked_store()
    click.echo(f"Callbot Workbench API: http://{host}:{port}  (docs: http://{host}:{port}/docs)")
    serve(settings, host=host, port=port)


@click.group("apikey")
def apikey() -> None:
    """API keys: what programs send instead of a password (shown once, only a hash is stored)."""


@apikey.command("create")
@click.option("--user", "username", required=True, help="The user the key acts as (their role applies).")
@click.option("--name", required=True, help="What the key is for, e.g. asterisk-lab.")
@click.option(
    "--scope",
    "scopes",
    default="chat,read",
    show_default=True,
    help="Comma-separated: chat, read, admin. A key never does more than its user's role allows.",
)
@click.option("--expires", default="never", show_default=True, help="90d, 12h, 30m or never.")
def apikey_create(username: str, name: str, scopes: str, expires: str) -> None:  # fmt: skip
    """Make a key and print it, the only time it is shown."""
    from callbot_core.access import apikeys

    store = open_checked_store()
    new = apikeys.create_key(
        store, username, name, actor=acting_user(store), scopes=scopes, expires_in=apikeys.parse_expiry(expires)
    )
    click.echo(new.key)
    until = f"expires {new.info.expires_at:%Y-%m-%d %H:%M} UTC" if new.info.expires_at else "does not expire"
    click.echo(
        f"Key #{new.info.id} {new.info.name!r} for {new.info.username} ({', '.join(new.info.scopes)}), {until}. "
        "Copy it now: it is not stored and cannot be shown again.",
        err=True,
    )


@apikey.command("list")
@click.option("--user", "username", default=None, help="Only this user's keys.")
def apikey_list(username: str | None) -> None:
    """Every key, newest first: its id, owner, name, first characters, scopes, state and last use."""
    from callbot_core.access import apikeys

    store = open_checked_store()
    keys = apikeys.list_keys(store, actor=acting_user(store), username=username)
    if not keys:
        click.echo("No API keys yet: make one with `callbot apikey create --user NAME --name LABEL`.")
        return
    rows = [
        (k.id, k.username, k.name, k.prefix + "…", ",".join(k.scopes), k.state(),
         f"{k.expires_at:%Y-%m-%d}" if k.expires_at else "never",
         f"{k.last_used_at:%Y-%m-%d %H:%M}" if k.last_used_at else "-")
        for k in keys
    ]  # fmt: skip
    click.echo(table(["id", "user", "name", "key", "scopes", "state", "expires", "last used"], rows))


@apikey.command("revoke")
@click.argument("key_id", type=int)
def apikey_revoke(key_id: int) -> None:
    """Revoke a key: every request with it is refused from now on."""
    from callbot_core.access import apikeys

    store = open_checked_store()
    if apikeys.revoke_key(store, key_id, actor=acting_user(store)):
        click.echo(f"Revoked API key #{key_id}.")
    else:
        click.echo(f"API key #{key_id} was already revoked.")
