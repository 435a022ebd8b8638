"""`callbot conversations`, `callbot search`, `callbot export`: stored transcripts."""

from __future__ import annotations

from pathlib import Path

import click

from callbot_core.cli._common import acting_user, fmt_ms, one_line, open_checked_store, table

# -- conversations -----------------------------------------------------------------------------


@click.group()
def conversations() -> None:
    """Stored conversations."""


@conversations.command("list")
@click.option("--limit", default=50, show_default=True)
@click.option("--persona", default=None)
@click.option("--status", type=click.Choice(["active", "ended"]), default=None)
def conversations_list(limit: int, persona: str | None, status: str | None) -> None:
    """Conversations, newest first, with their turns and mean TTFT."""
    from callbot_core.conversations.transcripts import list_conversations

    rows = list_conversations(open_checked_store(), persona=persona, status=status, limit=limit)
    if not rows:
        click.echo("No conversations yet. Start one with `callbot chat`.")
        return
    click.echo(
        table(
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
                    one_line(r.model, 32),
                    r.status,
                    r.turns,
                    r.failed_turns,
                    fmt_ms(r.mean_ttft_ms),
                )
                for r in rows
            ],
        )
    )


@conversations.command("show")
@click.argument("conversation_id", type=int)
def conversations_show(conversation_id: int) -> None:
    """One conversation in full, with each turn's metrics and the summaries."""
    from callbot_core.conversations.transcripts import get_conversation

    detail = get_conversation(open_checked_store(), conversation_id)
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
                f"  TTFT {fmt_ms(m.ttft_ms)} · {tps} · {m.completion_tokens} tokens · total {fmt_ms(m.total_ms)}",
                dim=True,
            )
    if r.summary_short:
        click.echo(f"\nSummary (short): {r.summary_short}")
    if detail.summary_full:
        click.echo(f"\nSummary (full): {detail.summary_full}")


@click.command("search")
@click.argument("query")
@click.option("--limit", default=20, show_default=True)
@click.option("--semantic", is_flag=True, help="Find messages by meaning (the embedder), not by their words.")
def search_cmd(query: str, limit: int, semantic: bool) -> None:
    """Search messages and summaries (by words), or messages by meaning with --semantic."""
    from callbot_core.conversations.transcripts import search

    if semantic:
        _semantic(query, limit)
        return
    hits = search(open_checked_store(), query, limit=limit)
    if not hits:
        click.echo(f"Nothing matches {query!r}.")
        return
    click.echo(
        table(
            ["conversation", "where", "when", "snippet"],
            [(h.conversation_id, h.role or h.source, h.created_at.strftime("%Y-%m-%d %H:%M"), h.snippet) for h in hits],
        )
    )


def _semantic(query: str, limit: int) -> None:
    import sys

    from callbot_core.knowledge.index import KnowledgeBase
    from callbot_core.knowledge.semantic import semantic_search
    from callbot_core.settings import get_settings

    store = open_checked_store()
    kb = KnowledgeBase(store, get_settings())
    with click.progressbar(length=1, label="Indexing new messages", file=sys.stderr) as bar:

        def progress(done: int, total: int) -> None:
            bar.length = total
            bar.update(done - bar.pos)

        hits = semantic_search(kb, query, actor=acting_user(store), limit=limit, progress=progress)
    if not hits:
        click.echo("No messages yet.")
        return
    click.echo(
        table(
            ["similarity", "conversation", "persona", "who", "when", "text"],
            [
                (f"{h.similarity:.2f}", h.conversation_id, h.persona, h.role, h.created_at.strftime("%Y-%m-%d %H:%M"),
                 one_line(h.text, 70))
                for h in hits
            ],
        )
    )  # fmt: skip


# -- export ------------------------------------------------------------------------------------


@click.group()
def export() -> None:
    """Export stored data."""


@export.command("conversations")
@click.option("--format", "fmt", type=click.Choice(["jsonl", "csv"]), default="jsonl", show_default=True)
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True)
def export_conversations_cmd(fmt: str, out: Path) -> None:
    """Write every conversation with its messages and metrics to a file."""
    from callbot_core.conversations.transcripts import export_to_file

    count = export_to_file(open_checked_store(), fmt, out)
    click.echo(f"Exported {count} conversation(s) to {out}.")
