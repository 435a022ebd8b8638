"""`callbot knowledge`: ingest documents, list and delete them, search a collection, evaluate retrieval."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from callbot_core.cli._common import acting_user, one_line, open_checked_store, table


def _kb():  # type: ignore[no-untyped-def]
    # Imported here: the knowledge base pulls in the embedder and the vector store, which most commands never need.
    from callbot_core.knowledge.index import KnowledgeBase
    from callbot_core.settings import get_settings

    store = open_checked_store()
    return KnowledgeBase(store, get_settings()), acting_user(store)


@click.group()
def knowledge() -> None:
    """Documents the personas answer from: collections, ingest, search, retrieval evaluation."""


@knowledge.command("ingest")
@click.argument("paths", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--collection", "-c", required=True, help="The collection to add to (created on first use).")
@click.option(
    "--chunk-size", type=int, default=None, help="Characters per passage (default CALLBOT_KNOWLEDGE_CHUNK_SIZE)."
)
@click.option("--overlap", type=int, default=None, help="Characters each passage repeats from the one before.")
def ingest_cmd(paths: tuple[Path, ...], collection: str, chunk_size: int | None, overlap: int | None) -> None:
    """Ingest files and folders (recursed): txt, md, html, pdf, docx, csv.

    A changed file replaces its passages; an unchanged one is skipped. Bad files are listed with the reason, the
    others are ingested, and the command exits 1 if any file was refused.
    """
    from callbot_core.knowledge.index import check_collection_name, files_from_paths

    check_collection_name(collection)  # a bad name is the first thing to hear, before any file is looked at
    kb, actor = _kb()
    files, refused = files_from_paths(paths)
    outcomes = list(refused)
    if files:
        with click.progressbar(length=len(files), label="Ingesting", file=sys.stderr, show_pos=True) as bar:

            def progress(done: int, total: int, current: str) -> None:
                bar.update(done - bar.pos)

            outcomes += kb.ingest(
                collection, files, actor=actor, chunk_size=chunk_size, overlap=overlap, progress=progress
            )
    elif not refused:
        raise click.ClickException("No files of a supported type (txt, md, html, pdf, docx, csv) were found")
    counts = {s: sum(o.status == s for o in outcomes) for s in ("ingested", "replaced", "unchanged", "refused")}
    for outcome in outcomes:
        if outcome.ok:
            click.echo(f"{outcome.status:9}  {outcome.source}  ({outcome.chunks} passages)")
    for outcome in outcomes:
        if not outcome.ok:
            click.secho(f"refused    {outcome.error}", fg="red", err=True)
    click.echo(", ".join(f"{n} {s}" for s, n in counts.items()) + f" into collection {collection!r}")
    if counts["refused"]:
        sys.exit(1)


@knowledge.command("collections")
def collections_cmd() -> None:
    """Collections with their embedder and size."""
    kb, actor = _kb()
    rows = kb.collections(actor=actor)
    if not rows:
        click.echo("No collections yet. Start one with `callbot knowledge ingest PATH --collection NAME`.")
        return
    click.echo(
        table(
            ["collection", "documents", "passages", "embedder", "created"],
            [
                (c.name, c.documents, c.chunks, f"{c.embedder} ({c.dimensions})", c.created_at.strftime("%Y-%m-%d"))
                for c in rows
            ],
        )
    )


@knowledge.command("list")
@click.option("--collection", "-c", required=True)
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def list_cmd(collection: str, fmt: str) -> None:
    """The documents of a collection."""
    kb, actor = _kb()
    docs = kb.documents(collection, actor=actor)
    if fmt == "json":
        click.echo(
            json.dumps(
                [
                    {
                        "source": d.source,
                        "format": d.format,
                        "size_bytes": d.size_bytes,
                        "pages": d.pages,
                        "chunks": d.chunks,
                        "chunk_size": d.chunk_size,
                        "chunk_overlap": d.chunk_overlap,
                        "ingested_at": d.ingested_at.isoformat(),
                        "ingested_by": d.ingested_by,
                    }
                    for d in docs
                ],
                indent=2,
            )
        )
        return
    if not docs:
        click.echo(f"Collection {collection!r} has no documents.")
        return
    click.echo(
        table(
            ["source", "format", "size", "pages", "passages", "ingested"],
            [
                (
                    d.source,
                    d.format,
                    f"{d.size_bytes:,} B",
                    d.pages or "",
                    d.chunks,
                    d.ingested_at.strftime("%Y-%m-%d %H:%M"),
                )
                for d in docs
            ],
        )
    )


@knowledge.command("delete")
@click.option("--collection", "-c", required=True)
@click.argument("sources", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Delete the whole collection.")
def delete_cmd(collection: str, sources: tuple[str, ...], everything: bool) -> None:
    """Delete documents (by source name, as `list` shows them), or the whole collection with --all."""
    kb, actor = _kb()
    if everything == bool(sources):
        raise click.UsageError("Name the documents to delete, or give --all (not both)")
    if everything:
        kb.delete_collection(collection, actor=actor)
        click.echo(f"Deleted collection {collection!r}")
        return
    for source in sources:
        info = kb.delete_document(collection, source, actor=actor)
        click.echo(f"Deleted {info.source} ({info.chunks} passages)")


@knowledge.command("search")
@click.argument("question")
@click.option("--collection", "-c", required=True)
@click.option("--k", "k", type=int, default=5, show_default=True, help="How many passages.")
@click.option("--threshold", type=float, default=None, help="Low-relevance threshold (default from settings).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def search_cmd(question: str, collection: str, k: int, threshold: float | None, fmt: str) -> None:
    """The passages of a collection that best answer QUESTION (keyword and vector ranks fused)."""
    from callbot_core.knowledge.retrieval import search

    kb, actor = _kb()
    result = search(kb, collection, question, k=k, threshold=threshold, actor=actor)
    if fmt == "json":
        data = result.as_dict()
        click.echo(json.dumps({"hits": data["hits"], "low_relevance": data["low_relevance"],
                               "best_similarity": data["best_similarity"], "threshold": data["threshold"]},
                              indent=2, ensure_ascii=False))  # fmt: skip
        return
    if result.low_relevance:
        click.secho(
            f"Low relevance: the best similarity is {result.best_similarity or 0:.2f}, under {result.threshold:.2f};"
            " the documents probably do not answer this.",
            fg="yellow",
        )
    if not result.hits:
        click.echo("No passages.")
        return
    click.echo(
        table(
            ["rank", "similarity", "source", "page", "heading", "text"],
            [
                (
                    h.rank,
                    "-" if h.similarity is None else f"{h.similarity:.2f}",
                    h.source,
                    h.page or "",
                    one_line(h.heading, 30),
                    one_line(h.text, 60),
                )
                for h in result.hits
            ],
        )
    )
    click.echo("similarity: cosine similarity of the passage and the question, 0-1, higher is better")


@knowledge.command("eval")
@click.argument("questions_file", type=click.Path(path_type=Path))
@click.option("--collection", "-c", required=True)
@click.option("--k", "k", type=int, default=5, show_default=True)
@click.option("--threshold", type=float, default=None, help="Low-relevance threshold (default from settings).")
@click.option("--format", "fmt", type=click.Choice(["table", "json"]), default="table", show_default=True)
def eval_cmd(questions_file: Path, collection: str, k: int, threshold: float | None, fmt: str) -> None:
    """Score retrieval on QUESTIONS_FILE (JSON Lines: question, expected_sources) and store the run.

    recall@k and MRR over the questions the documents answer; how many of the others were flagged low relevance.
    """
    from callbot_core.knowledge.evaluation import evaluate, load_questions

    kb, actor = _kb()
    questions = load_questions(questions_file)
    with click.progressbar(length=len(questions), label="Evaluating", file=sys.stderr, show_pos=True) as bar:

        def progress(done: int, total: int) -> None:
            bar.update(done - bar.pos)

        run = evaluate(kb, collection, questions, actor=actor, k=k, threshold=threshold,
                       questions_file=questions_file.name, progress=progress)  # fmt: skip
    if fmt == "json":
        click.echo(json.dumps(run.as_dict(), indent=2))
        return

    def number(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    click.echo(
        f"Retrieval evaluation #{run.id} of {collection!r} ({run.questions} questions, k={run.k},"
        f" threshold={run.threshold:g})\n"
        f"  recall@{run.k}: {number(run.recall_at_k)}   MRR: {number(run.mrr)}   ({run.answerable} answerable)\n"
        f"  unanswerable flagged low relevance: {run.unanswerable_flagged} of {run.unanswerable}"
    )
