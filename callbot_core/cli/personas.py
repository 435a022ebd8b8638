"""`callbot personas` and `callbot persona …`: personas, versions, cards, the production label."""

from __future__ import annotations

from pathlib import Path

import click

from callbot_core.cli._common import acting_user, one_line, open_checked_store, table
from callbot_core.errors import InvalidInput

# -- personas ----------------------------------------------------------------------------------


@click.command("personas")
def personas_list() -> None:
    """List personas and their latest versions."""
    from callbot_core.personas.catalog import list_personas

    with open_checked_store().session() as session:
        rows = [(p.key, v, p.name, one_line(p.description, 70)) for p, v in list_personas(session)]
    click.echo(table(["key", "version", "name", "description"], rows))


@click.group("persona")
def persona_group() -> None:
    """Versions, diffs, the production label and Character Card V2 (JSON) import/export."""


@persona_group.command("import")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--key", default=None, help="Persona key (default: the card's callbot key, else from its name).")
def persona_import(file: Path, key: str | None) -> None:
    """Import a Character Card V2 JSON file as a new persona, or a new version of KEY."""
    from callbot_core.personas.cards import import_card

    store = open_checked_store()
    info = import_card(store, file.read_bytes(), actor=acting_user(store), key=key)
    click.echo(f"Imported {info.ref} ({info.name}).")


@persona_group.command("export")
@click.argument("ref")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None, help="Default: stdout.")
def persona_export(ref: str, out: Path | None) -> None:
    """Export KEY[@VERSION] as a Character Card V2 JSON document."""
    import json

    from callbot_core.personas.cards import export_card

    text = json.dumps(export_card(open_checked_store(), ref), indent=2, ensure_ascii=False) + "\n"
    if out is None:
        click.echo(text, nl=False)
    else:
        out.write_text(text, encoding="utf-8")
        click.echo(f"Wrote {out}", err=True)


@persona_group.command("versions")
@click.argument("key")
def persona_versions_cmd(key: str) -> None:
    """List the versions of KEY, oldest first; `*` marks production."""
    from callbot_core.personas.versions import list_versions

    rows = [
        (
            f"{v.version}{' *' if v.production else ''}",
            v.created_at.strftime("%Y-%m-%d %H:%M"),
            v.temperature,
            v.top_p,
            v.max_tokens,
            one_line(v.note, 40),
            one_line(v.system_prompt, 50),
        )
        for v in list_versions(open_checked_store(), key)
    ]
    click.echo(table(["version", "created", "temp", "top_p", "max_tok", "note", "system prompt"], rows))


@persona_group.command("diff")
@click.argument("ref_a")
@click.argument("ref_b")
def persona_diff(ref_a: str, ref_b: str) -> None:
    """Show the fields that differ between two versions (KEY@A KEY@B)."""
    from callbot_core.personas.versions import diff_versions

    diffs = diff_versions(open_checked_store(), ref_a, ref_b)
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
    from callbot_core.personas.versions import clone_persona, get_version

    store = open_checked_store()
    actor = acting_user(store)
    info = clone_persona(store, ref, new_key, name or f"{get_version(store, ref).name} (copy)", actor=actor)
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
@click.option(
    "--knowledge",
    "knowledge_collection",
    default=None,
    metavar="COLLECTION",
    help="Answer from this knowledge collection ('' for none).",
)
@click.option("--knowledge-k", type=int, default=None, help="Passages each turn retrieves.")
@click.option("--knowledge-threshold", type=float, default=None, help="Similarity under which a retrieval is flagged.")
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
    knowledge_collection: str | None,
    knowledge_k: int | None,
    knowledge_threshold: float | None,
    note: str,
) -> None:
    """Save a new version of KEY: the latest version with the given fields changed."""
    from callbot_core.personas.versions import save_version

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
        "knowledge_collection": knowledge_collection,
        "knowledge_k": knowledge_k,
        "knowledge_threshold": knowledge_threshold,
    }
    changes = {k: v for k, v in given.items() if v is not None}
    if not changes:
        raise InvalidInput("Nothing to change: give at least one of the options (see --help)")
    store = open_checked_store()
    info = save_version(store, key, changes, actor=acting_user(store), note=note)
    click.echo(f"Saved {info.ref}.")


@persona_group.command("promote")
@click.argument("ref")
def persona_promote(ref: str) -> None:
    """Move the production label of a persona to KEY@VERSION."""
    from callbot_core.personas.versions import set_production

    store = open_checked_store()
    info = set_production(store, ref, actor=acting_user(store))
    click.echo(f"{info.ref} is now production.")
