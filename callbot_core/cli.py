"""The `callbot` command line: a thin front end over the engine."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import click

from .errors import CallbotError, ConfigError, InvalidInput
from .settings import get_settings
from .store import Store, open_store


def _store(migrated: bool = True) -> Store:
    settings = get_settings()
    store = open_store(settings)
    if migrated and not store.is_migrated():
        raise ConfigError(
            f"The store at {settings.resolved_database_url()} has no tables yet: run `callbot db upgrade` first"
        )
    return store


def _fmt_ms(value: float | None) -> str:
    return "-" if value is None else f"{value:,.0f} ms"


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    cells = [[("" if c is None else str(c)) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    line = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    out = [line, "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    return "\n".join(out)


def _one_line(text: str | None, width: int = 60) -> str:
    text = (text or "").replace("\n", " ")
    return text if len(text) <= width else text[: width - 1] + "…"


@click.group()
@click.version_option(package_name="callbot-workbench")
def cli() -> None:
    """Callbot Workbench: talk to bot personas and study every turn."""


# -- db ----------------------------------------------------------------------------------------


@cli.group()
def db() -> None:
    """The SQL store."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Migrate the store to the newest schema and seed the default personas."""
    settings = get_settings()
    # Create (or, in production, insist on) the signing secret now, not on the first sign-in.
    settings.secret()
    store = _store(migrated=False)
    store.upgrade()
    click.echo(f"Store at {store.engine.url.render_as_string(hide_password=True)} is up to date.")


# -- the browser app ---------------------------------------------------------------------------


@cli.command("app")
@click.option("--port", default=8501, show_default=True, type=click.IntRange(1, 65535))
@click.option("--address", default="127.0.0.1", show_default=True, help="Interface to listen on.")
def app_cmd(port: int, address: str) -> None:
    """Start the browser workbench (headless); the first run creates the `admin` account."""
    import os

    from .auth import ADMIN_USERNAME, ensure_admin
    from .settings import PROJECT_ROOT

    settings = get_settings()
    settings.secret()
    store = _store()
    generated = ensure_admin(store, os.environ.get("CALLBOT_ADMIN_PASSWORD"))
    if generated:
        click.secho(
            f"Created the admin account. Sign in as {ADMIN_USERNAME!r} with password: {generated}\n"
            "(shown this once; change it on the Admin page)",
            fg="yellow",
        )
    script = PROJECT_ROOT / "app" / "streamlit_app.py"
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
    ]  # fmt: skip
    sys.stdout.flush()
    os.execv(sys.executable, argv)


# -- users -------------------------------------------------------------------------------------


@cli.group()
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
    from .users import add_user

    if password_stdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    with _store().session() as session:
        add_user(session, username, password, role=role, display_name=display_name, email=email, actor="cli")
    click.echo(f"User {username!r} added with role {role}.")


# -- personas ----------------------------------------------------------------------------------


@cli.command("personas")
def personas_list() -> None:
    """List personas and their latest versions."""
    from .personas import list_personas

    with _store().session() as session:
        rows = [(p.key, v, p.name, _one_line(p.description, 70)) for p, v in list_personas(session)]
    click.echo(_table(["key", "version", "name", "description"], rows))


@cli.group("persona")
def persona_group() -> None:
    """Versions, diffs, the production label and Character Card V2 (JSON) import/export."""


@persona_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", default=None, help="Persona key (default: the card's callbot key, else from its name).")
def persona_import(file: Path, key: str | None) -> None:
    """Import a Character Card V2 JSON file as a new persona, or a new version of KEY."""
    from .persona_versions import import_card

    info = import_card(_store(), file.read_bytes(), actor="cli", key=key)
    click.echo(f"Imported {info.ref} ({info.name}).")


@persona_group.command("export")
@click.argument("ref")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: stdout.")
def persona_export(ref: str, out: Path | None) -> None:
    """Export KEY[@VERSION] as a Character Card V2 JSON document."""
    import json

    from .persona_versions import export_card

    text = json.dumps(export_card(_store(), ref), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(f"Wrote {out}", err=True)


@persona_group.command("versions")
@click.argument("key")
def persona_versions_cmd(key: str) -> None:
    """List the versions of KEY, oldest first; `*` marks production."""
    from .persona_versions import list_versions

    rows = [
        (
            f"{v.version}{' *' if v.production else ''}",
            v.created_at.strftime("%Y-%m-%d %H:%M"),
            v.temperature,
            v.top_p,
            v.max_tokens,
            _one_line(v.note, 40),
            _one_line(v.system_prompt, 50),
        )
        for v in list_versions(_store(), key)
    ]
    click.echo(_table(["version", "created", "temp", "top_p", "max_tok", "note", "system prompt"], rows))


@persona_group.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
def persona_diff(ref_a: str, ref_b: str) -> None:
    """Show the fields that differ between two versions (KEY@A KEY@B)."""
    from .persona_versions import diff_versions

    diffs = diff_versions(_store(), ref_a, ref_b)
    if not diffs:
        click.echo("No differences.")
    for d in diffs:
        if d.diff:
            click.echo(d.diff.rstrip("\n"))
        else:
            click.echo(f"{d.field}: {d.old!r} -> {d.new!r}")


@persona_group.command("clone")
@click.argument("ref")
@click.argument("new_key")
@click.option("--name", default=None, help="The clone's name (default: the source's name + ' (copy)').")
def persona_clone(ref: str, new_key: str, name: str | None) -> None:
    """Make NEW_KEY, a new persona whose version 1 copies REF (KEY or KEY@VERSION)."""
    from .persona_versions import clone_persona, get_version

    store = _store()
    info = clone_persona(store, ref, new_key, name or f"{get_version(store, ref).name} (copy)", actor="cli")
    click.echo(f"Created {info.ref} ({info.name}).")


@persona_group.command("edit")
@click.argument("key")
@click.option("--system-prompt", default=None, help="The new system prompt.")
@click.option(
    "--system-prompt-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
    help="Read the new system prompt from this file.",
)  # fmt: skip
@click.option("--greeting", default=None)
@click.option("--temperature", type=float, default=None)
@click.option("--top-p", type=float, default=None)
@click.option("--max-tokens", type=int, default=None)
@click.option("--stop", "stop_words", multiple=True, help="A stop word (repeatable; replaces the list).")
@click.option("--note", default="", help="What changed, kept with the version.")
def persona_edit(
    key: str,
    system_prompt: str | None,
    system_prompt_file: Path | None,
    greeting: str | None,
    temperature: float | None,
    top_p: float | None,
    max_tokens: int | None,
    stop_words: tuple[str, ...],
    note: str,
) -> None:
    """Save a new version of KEY: the latest version with the given fields changed."""
    from .persona_versions import save_version

    if system_prompt is not None and system_prompt_file is not None:
        raise InvalidInput("Give --system-prompt or --system-prompt-file, not both")
    if system_prompt_file is not None:
        system_prompt = system_prompt_file.read_text(encoding="utf-8")
    given = {
        "system_prompt": system_prompt,
        "greeting": greeting,
        "temperature": temperature,
        "top_p": top_p,
        "max_tokens": max_tokens,
        "stop_words": list(stop_words) or None,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes:
        raise InvalidInput("Nothing to change: give at least one of the options (see --help)")
    info = save_version(_store(), key, changes, actor="cli", note=note)
    click.echo(f"Saved {info.ref}.")


@persona_group.command("promote")
@click.argument("ref")
def persona_promote(ref: str) -> None:
    """Move the production label of a persona to KEY@VERSION."""
    from .persona_versions import set_production

    info = set_production(_store(), ref, actor="cli")
    click.echo(f"{info.ref} is now production.")


# -- backends ----------------------------------------------------------------------------------


@cli.command("models")
@click.option("--backend", default=None, help="embedded, ollama or openai (default: configured).")
def models(backend: str | None) -> None:
    """Check a backend's health and list its models."""
    from .llm import get_backend

    llm = get_backend(backend)
    health = llm.health()
    click.echo(f"{llm.name} at {llm.where}: {'ok' if health.ok else 'DOWN'} {health.detail}")
    if health.ok:
        for name in llm.list_models():
            click.echo(f"  {name}")
    else:
        sys.exit(1)


# -- chat --------------------------------------------------------------------------------------


def _metrics_line(result: object) -> str:
    r = result
    tps = "-" if r.tokens_per_s is None else f"{r.tokens_per_s:.0f} tok/s"  # type: ignore[attr-defined]
    return (
        f"[TTFT {_fmt_ms(r.ttft_ms)} · {tps} · {r.completion_tokens or 0} tokens"  # type: ignore[attr-defined]
        f" · total {_fmt_ms(r.total_ms)}]"  # type: ignore[attr-defined]
    )


def _stream_reply(service: object, conversation_id: int, text: str) -> None:
    turn = service.send(conversation_id, text)  # type: ignore[attr-defined]
    click.echo("bot> ", nl=False)
    for piece in turn:
        click.echo(piece, nl=False)
    click.echo()
    click.secho(_metrics_line(turn.result), dim=True)


def _print_summaries(summaries: object) -> None:
    click.echo("\nSummary (short):")
    click.echo(summaries.short)  # type: ignore[attr-defined]
    click.echo("\nSummary (full):")
    click.echo(summaries.full)  # type: ignore[attr-defined]


@cli.command()
@click.option("--persona", default="assistant", show_default=True, help="Persona key, or key@version.")
@click.option("--backend", default=None, help="embedded, ollama or openai (default: persona's, then configured).")
@click.option("--model", default=None, help="Model name on that backend.")
@click.option("--message", "-m", default=None, help="Send one message, print the reply and exit.")
@click.option("--end", "end_after", is_flag=True, help="With --message: end the conversation and summarise.")
@click.option(
    "--var", "variables", multiple=True, metavar="NAME=VALUE",
    help="A prompt variable, e.g. --var caller_name=Ann (repeatable); stored with the conversation.",
)  # fmt: skip
def chat(
    persona: str,
    backend: str | None,
    model: str | None,
    message: str | None,
    end_after: bool,
    variables: tuple[str, ...],
) -> None:
    """Chat with a persona: an interactive streaming REPL, or one turn with --message.

    In the REPL, /end ends the conversation and prints its summaries; /quit leaves it open.
    """
    from .conversation import ConversationService

    given: dict[str, str] = {}
    for raw in variables:
        name, sep, value = raw.partition("=")
        if not sep:
            raise InvalidInput(f"--var {raw!r} is not NAME=VALUE, e.g. --var caller_name=Ann")
        given[name.strip()] = value
    service = ConversationService(store=_store())
    info = service.start(persona, backend=backend, model=model, channel="text", variables=given)
    click.secho(
        f"Conversation {info.id} with {info.persona_key}@{info.persona_version} on {info.backend} ({info.model})",
        dim=True,
    )
    if message is not None:
        _stream_reply(service, info.id, message)
        if end_after:
            _print_summaries(service.end(info.id))
        return
    if info.greeting:
        click.echo(f"bot> {info.greeting}")
    click.secho("Type a message; /end ends the call and summarises it, /quit leaves.", dim=True)
    while True:
        try:
            text = click.prompt("you", prompt_suffix="> ", default="", show_default=False)
        except (EOFError, click.Abort):
            click.echo()
            return
        command = text.strip().lower()
        if command in ("/quit", "/exit"):
            return
        if command == "/end":
            click.secho("Ending the conversation and writing its summaries…", dim=True)
            _print_summaries(service.end(info.id))
            return
        try:
            _stream_reply(service, info.id, text)
        except InvalidInput as exc:
            click.secho(f"Not sent: {exc}", fg="yellow", err=True)
        except CallbotError as exc:
            click.secho(f"\nThe turn failed: {exc}", fg="red", err=True)


# -- conversations -----------------------------------------------------------------------------


@cli.group()
def conversations() -> None:
    """Stored conversations."""


@conversations.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--persona", default=None)
@click.option("--status", type=click.Choice(["active", "ended"]), default=None)
def conversations_list(limit: int, persona: str | None, status: str | None) -> None:
    """Conversations, newest first, with their turns and mean TTFT."""
    from .transcripts import list_conversations

    rows = list_conversations(_store(), persona=persona, status=status, limit=limit)
    if not rows:
        click.echo("No conversations yet. Start one with `callbot chat`.")
        return
    click.echo(
        _table(
            [
                "id",
                "started",
                "persona",
                "user",
                "backend",
                "model",
                "status",
                "turns",
                "failed",
                "mean TTFT",
            ],
            [
                (
                    r.id,
                    r.started_at.strftime("%Y-%m-%d %H:%M"),
                    f"{r.persona_key}@{r.persona_version}",
                    r.username or "(cli)",
                    r.backend,
                    _one_line(r.model, 32),
                    r.status,
                    r.turns,
                    r.failed_turns,
                    _fmt_ms(r.mean_ttft_ms),
                )
                for r in rows
            ],
        )
    )


@conversations.command("show")
@click.argument("conversation_id", type=int)
def conversations_show(conversation_id: int) -> None:
    """One conversation in full, with each turn's metrics and the summaries."""
    from .transcripts import get_conversation

    detail = get_conversation(_store(), conversation_id)
    r = detail.row
    click.echo(
        f"Conversation {r.id} · {r.persona_key}@{r.persona_version} · {r.backend} ({r.model}) · {r.channel}"
        f" · {r.status} · started {r.started_at:%Y-%m-%d %H:%M:%S}"
    )
    for m in detail.messages:
        who = {"user": "caller", "assistant": "bot", "system": "system"}[m.role]
        click.echo(f"\n[{m.created_at:%H:%M:%S}] {who}: {m.text}")
        if m.error:
            click.secho(f"  (turn failed: {m.error})", fg="red")
        elif m.ttft_ms is not None:
            tps = "-" if m.tokens_per_s is None else f"{m.tokens_per_s:.0f} tok/s"
            click.secho(
                f"  TTFT {_fmt_ms(m.ttft_ms)} · {tps} · {m.completion_tokens} tokens · total {_fmt_ms(m.total_ms)}",
                dim=True,
            )
    if r.summary_short:
        click.echo(f"\nSummary (short): {r.summary_short}")
    if detail.summary_full:
        click.echo(f"\nSummary (full): {detail.summary_full}")


@cli.command("search")
@click.argument("query")
@click.option("--limit", default=20, show_default=True)
def search_cmd(query: str, limit: int) -> None:
    """Search messages and summaries."""
    from .transcripts import search

    hits = search(_store(), query, limit=limit)
    if not hits:
        click.echo(f"Nothing matches {query!r}.")
        return
    click.echo(
        _table(
            ["conversation", "where", "when", "snippet"],
            [(h.conversation_id, h.role or h.source, h.created_at.strftime("%Y-%m-%d %H:%M"), h.snippet) for h in hits],
        )
    )


# -- export ------------------------------------------------------------------------------------


@cli.group()
def export() -> None:
    """Export stored data."""


@export.command("conversations")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export_conversations_cmd(fmt: str, out: Path) -> None:
    """Write every conversation with its messages and metrics to a file."""
    from .transcripts import export_to_file

    count = export_to_file(_store(), fmt, out)
    click.echo(f"Exported {count} conversation(s) to {out}.")


# -- commands kept in their own modules ---------------------------------------------------------

from .cli_analytics import sql_cmd  # noqa: E402
from .cli_evals import eval_group  # noqa: E402
from .cli_reports import pipelines, report  # noqa: E402
from .cli_simulate import simulate_cmd  # noqa: E402

cli.add_command(sql_cmd)
cli.add_command(report)
cli.add_command(pipelines)
cli.add_command(eval_group)
cli.add_command(simulate_cmd)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point: engine errors become one clear line on stderr and exit status 1."""
    try:
        cli.main(args=list(argv) if argv is not None else None, standalone_mode=False)
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
