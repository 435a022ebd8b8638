"""`callbot user`: accounts that sign in to the workbench."""

from __future__ import annotations

import sys

import click

from callbot_core.cli._common import acting_user, open_checked_store

# -- users -------------------------------------------------------------------------------------


@click.group()
def user() -> None:
    """Users who sign in to the workbench."""


@user.command("add")
@click.argument("username")
@click.option("--role", type=click.Choice(["admin", "researcher", "viewer"]), default="researcher")
@click.option("--display-name", default="")
@click.option("--email", default=None)
@click.option("--password-stdin", is_flag=True, help="Read the password from standard input.")
def user_add(username: str, role: str, display_name: str, email: str | None, password_stdin: bool) -> None:
    """Add a user; the password is read from stdin or prompted for."""
    from callbot_core.access.permissions import require
    from callbot_core.access.signin import create_user

    store = open_checked_store()
    actor = acting_user(store)
    # create_user checks this again; asking first refuses before anyone types a password for nothing.
    require(actor, "user.manage")
    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    info = create_user(store, username, password, role=role, display_name=display_name, email=email, actor=actor)
    click.echo(f"User {info.username!r} added with role {info.role}.")
