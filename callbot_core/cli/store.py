"""The store and the browser app: `callbot db upgrade`, `callbot app`."""

from __future__ import annotations

import sys

import click

from callbot_core.cli._common import open_checked_store
from callbot_core.errors import ConfigError
from callbot_core.settings import get_settings

# -- db ----------------------------------------------------------------------------------------


@click.group()
def db() -> None:
    """The SQL store."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the store to the newest schema and seed the default personas."""
    settings = get_settings()
    # Create (or, in production, insist on) the signing secret now, not on the first sign-in.
    settings.secret()
    store = open_checked_store(migrated=False)
    store.upgrade()
    click.echo(f"Store at {store.engine.url.render_as_string(hide_password=True)} is up to date.")
    from callbot_core.conversations.service import reconcile_turns

    # A deploy runs this first: turns cut short by the process it replaced are stored as interrupted now.
    if ended := reconcile_turns(store):
        click.echo(f"{len(ended)} turn(s) whose process had died stored as interrupted.")


# -- the browser app ---------------------------------------------------------------------------


@click.command("app")
@click.option("--port", default=8501, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
def app_cmd(port: int, address: str) -> None:
    """Start the browser workbench (headless); the first run creates the `admin` account."""
    import os

    from callbot_core.access.signin import ADMIN_USERNAME, ensure_admin
    from callbot_core.settings import PROJECT_ROOT

    settings = get_settings()
    settings.secret()
    store = open_checked_store()
    password = settings.admin_password.get_secret_value() if settings.admin_password else None
    generated = ensure_admin(store, password)
    if generated:
        click.secho(
            f"Created the admin account. Sign in as {ADMIN_USERNAME!r} with password: {generated}\n"
            "(shown this once; change it on the Admin page)",
            fg="yellow",
        )
    # server.py serves streamlit_app.py's pages behind security headers (see there).
    script = PROJECT_ROOT / "app" / "server.py"
    if not script.is_file():
        raise ConfigError(f"The browser app is not here ({script}): it ships with the source tree, not the wheel")
    click.echo(f"Callbot Workbench: http://{address}:{port}")
    argv = [
        sys.executable, "-m", "streamlit", "run", str(script),
        "--server.headless", "true",
        "--server.port", str(port),
        "--server.address", address,
        "--browser.gatherUsageStats", "false",
        # No "Deploy" button or developer menu for researchers.
        "--client.toolbarMode", "minimal",
        # Uploads and websockets must come from this app's own pages.
        "--server.enableXsrfProtection", "true",
        # No traceback reaches a user: errors are logged with an id (app/failures.py); this covers what escapes that.
        "--client.showErrorDetails", "none",
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, argv)
