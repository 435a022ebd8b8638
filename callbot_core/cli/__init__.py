"""The `callbot` command line: a thin front end over the engine, one module per command group."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

import click

from callbot_core.cli import (
    analytics,
    api,
    chat,
    conversations,
    evals,
    knowledge,
    personas,
    reports,
    simulate,
    store,
    users,
)
from callbot_core.cli._common import AS_USER_KEY
from callbot_core.conversations.validation import NOT_UTF8
from callbot_core.errors import CallbotError


@click.group()
@click.version_option(package_name="callbot-workbench")
@click.option(
    "--as", "as_user", metavar="USERNAME", default=None,
    help="Act as this stored user, with their role (default: CALLBOT_CLI_USER, else the local operator, an admin).",
)  # fmt: skip
@click.pass_context
def cli(ctx: click.Context, as_user: str | None) -> None:
    """Callbot Workbench: talk to bot personas and study every turn."""
    # Read where the engine is called (`_common.acting_user`): only commands that do something guarded look it up.
    ctx.meta[AS_USER_KEY] = as_user


for command in (
    store.db,
    store.app_cmd,
    api.api_cmd,
    api.apikey,
    users.user,
    personas.personas_list,
    personas.persona_group,
    chat.models,
    chat.chat,
    conversations.conversations,
    conversations.search_cmd,
    conversations.export,
    analytics.sql_cmd,
    reports.report,
    reports.pipelines,
    evals.eval_group,
    knowledge.knowledge,
    simulate.simulate_cmd,
):
    cli.add_command(command)


def _undecodable(args: Sequence[str]) -> str | None:
    """The first argument holding bytes that are not UTF-8 (Python keeps them as lone surrogates), shown escaped."""
    for arg in args:
        try:
            arg.encode("utf-8")
        except UnicodeEncodeError:
            return os.fsencode(arg).decode("utf-8", "backslashreplace")  # the bytes as typed: \xff
    return None


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: engine errors become one clear line on stderr and exit status 1."""
    args = list(argv) if argv is not None else sys.argv[1:]
    bad = _undecodable(args)
    if bad is not None:
        # Every command would store, print or compare it and fail somewhere with a traceback: refuse it here.
        click.secho(f'Error: argument "{bad}" {NOT_UTF8}', fg="red", err=True)
        sys.exit(1)
    try:
        cli.main(args=args, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except CallbotError as exc:
        click.secho(f"Error: {exc}", fg="red", err=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
