"""`callbot user`: accounts that sign in to the workbench."""

from __future__ import annotations

import sys

import click

from callbot_core.cli._common import acting_user, open_checked_store

# -- users -------------------------------------------------------------------------------------


@click.group()
def user() -> None:
    """Users who sign in to the workbench."""


def _read_password(password_stdin: bool) -> str:
    """A new password from standard input or a hidden prompt asked twice, never from the command line (where it
    would sit in the shell history and the process list). Taken as typed: spaces at either end are kept."""
    if password_stdin:
        return sys.stdin.readline().rstrip("\r\n")
    return click.prompt("Password", hide_input=True, confirmation_prompt=True)


def _manager():  # type: ignore[no-untyped-def]
    """The store and the acting user, refused before anything is asked if they may not manage users."""
    from callbot_core.access.permissions import require

    store = open_checked_store()
    actor = acting_user(store)
    # The engine checks this again; asking first refuses before anyone types a password for nothing.
    require(actor, "user.manage")
    return store, actor


@user.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["admin", "researcher", "viewer"]), default="researcher")
@click.option("--display-name", default="")
@click.option("--email", default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(username: str, role: str, display_name: str, email: str | None, password_stdin: bool) -> None:
    """Add a user; the password is read from stdin or prompted for."""
    from callbot_core.access.signin import create_user

    store, actor = _manager()
    password = _read_password(password_stdin)
    info = create_user(store, username, password, role=role, display_name=display_name, email=email, actor=actor)
    click.echo(f"User {info.username!r} added with role {info.role}.")


@user.command("passwd")
@click.argument("username")
@click.option("--password-stdin", is_flag=True, help="Read the new password from standard input.")
def user_passwd(username: str, password_stdin: bool) -> None:
    """Set a user's password (prompted twice, or from stdin); it also unlocks and signs them out everywhere."""
    from callbot_core.access.signin import get_user_info, reset_password

    store, actor = _manager()
    name = get_user_info(store, username).username  # an unknown user is refused before the prompt
    reset_password(store, name, _read_password(password_stdin), actor=actor)
    click.echo(f"Password of {name!r} set; their open sessions have ended.")


@user.command("unlock")
@click.argument("username")
def user_unlock(username: str) -> None:
    """Let a locked user sign in again (clears the failed sign-in count)."""
    from callbot_core.access.signin import get_user_info, unlock

    store, actor = _manager()
    name = get_user_info(store, username).username
    unlock(store, name, actor=actor)
    click.echo(f"User {name!r} unlocked.")


@user.command("lock")
@click.argument("username")
def user_lock(username: str) -> None:
    """Stop a user signing in until unlocked, and end their open sessions now."""
    from callbot_core.access.signin import get_user_info, lock

    store, actor = _manager()
    name = get_user_info(store, username).username
    lock(store, name, actor=actor)
    click.echo(f"User {name!r} locked until unlocked; their open sessions have ended.")


@user.command("delete")
@click.argument("username")
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
def user_delete(username: str, yes: bool) -> None:
    """Remove an account and end its sessions; its conversations stay, without a user."""
    from callbot_core.access.signin import delete_user, get_user_info

    store, actor = _manager()
    name = get_user_info(store, username).username
    if not yes:
        click.confirm(f"Delete user {name!r}? Their sessions and saved queries go with them", abort=True)
    delete_user(store, name, actor=actor)
    click.echo(f"User {name!r} deleted; their open sessions have ended.")
