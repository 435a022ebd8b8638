"""`callbot models` and `callbot chat`: a backend's health, and talking to a persona."""

from __future__ import annotations

import sys

import click

from callbot_core.cli._common import acting_user, fmt_ms, open_checked_store, open_service, parse_assignments
from callbot_core.errors import CallbotError, InvalidInput

# -- backends ----------------------------------------------------------------------------------


@click.command("models")
@click.option("--backend", default=None, help="embedded, ollama or openai (default: configured).")
def models(backend: str | None) -> None:
    """Check a backend's health and list its models."""
    from callbot_core.backends.llm import get_backend

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
        f"[TTFT {fmt_ms(r.ttft_ms)} · {tps} · {r.completion_tokens or 0} tokens"  # type: ignore[attr-defined]
        f" · total {fmt_ms(r.total_ms)}]"  # type: ignore[attr-defined]
    )


def _stream_reply(service: object, conversation_id: int, text: str, actor: object) -> None:
    # `with`: Ctrl-C or a closed terminal mid-reply stores the turn as interrupted before the command goes.
    with service.send(conversation_id, text, actor=actor) as turn:  # type: ignore[attr-defined]
        click.echo("bot> ", nl=False)
        for piece in turn:
            click.echo(piece, nl=False)
    click.echo()
    click.secho(_metrics_line(turn.result), dim=True)
    _print_sources(turn)


def _print_sources(turn: object) -> None:
    """For a persona that answers from documents: the retrieval's time and the passages, numbered as cited."""
    result = turn.result  # type: ignore[attr-defined]
    if result is None or result.low_relevance is None:
        return
    timing = turn.turn.timing("retrieve")  # type: ignore[attr-defined]
    took = f"retrieval {fmt_ms(timing.ms)}" if timing is not None and timing.ms is not None else "retrieval"
    flag = " · low relevance: the documents probably do not answer this" if result.low_relevance else ""
    click.secho(f"[{took}{flag}]", dim=True)
    for number, hit in enumerate(result.citations, start=1):
        where = hit.source if hit.page is None else f"{hit.source}, page {hit.page}"
        similarity = "" if hit.similarity is None else f" (similarity {hit.similarity:.2f})"
        click.secho(f"  [{number}] {where}{similarity}", dim=True)


def _print_summaries(summaries: object) -> None:
    click.echo("\nSummary (short):")
    click.echo(summaries.short)  # type: ignore[attr-defined]
    click.echo("\nSummary (full):")
    click.echo(summaries.full)  # type: ignore[attr-defined]


@click.command()
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
    from callbot_core.conversations.validation import clean_message
    from callbot_core.settings import get_settings

    if message is not None:
        # Refuse a bad --message before the conversation is opened, so a refusal leaves nothing stored.
        clean_message(message, max_chars=get_settings().max_message_chars)
    given = parse_assignments(variables, error="--var {raw} is not NAME=VALUE, e.g. --var caller_name=Ann")
    store = open_checked_store()
    service = open_service(store)
    actor = acting_user(store)
    info = service.start(persona, actor=actor, backend=backend, model=model, channel="text", variables=given)
    click.secho(
        f"Conversation {info.id} with {info.persona_key}@{info.persona_version} on {info.backend} ({info.model})",
        dim=True,
    )
    if message is not None:
        _stream_reply(service, info.id, message, actor)
        if end_after:
            _print_summaries(service.end(info.id, actor=actor))
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
            _print_summaries(service.end(info.id, actor=actor))
            return
        try:
            _stream_reply(service, info.id, text, actor)
        except InvalidInput as exc:
            click.secho(f"Not sent: {exc}", fg="yellow", err=True)
        except CallbotError as exc:
            click.secho(f"\nThe turn failed: {exc}", fg="red", err=True)
