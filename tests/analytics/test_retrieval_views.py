"""The knowledge tables in the analytics snapshot, on SQLite and PostgreSQL: the `retrievals` view (one row per
passage a turn used), following the store when a chunk is deleted or the conversation goes, the `retrieval_evals`
view, and the leaderboard's latest-run-per-settings rule."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR as OP
from callbot_core.analytics import Analytics
from callbot_core.analytics import engine as engine_module
from callbot_core.analytics.leaderboard import leaderboard_data, retrieval_leaderboard
from callbot_core.analytics.views import RAW_TABLES_NOTE, VIEW_DOCS
from callbot_core.conversations.transcripts import delete_conversation
from callbot_core.store.models import (
    KnowledgeChunk,
    KnowledgeCollection,
    KnowledgeDocument,
    RetrievalEval,
    RetrievalEvalResult,
    TurnMetrics,
    TurnRetrieval,
)
from tests.analytics.test_analytics import add_conversation, at, version_of

T0 = datetime(2026, 3, 2, 9, 0, tzinfo=UTC)


@dataclass
class Knowledge:
    conversation: int
    other: int  # a second conversation whose turn used one passage, to show rows leave one conversation at a time
    turn: int
    chunks: list[int]
    document: int


def build(store) -> Knowledge:
    """A conversation with one turn whose prompt used two passages of the `clinic` collection (one found by
    keywords only: no similarity), and a second conversation whose turn used one."""
    with store.session() as s:
        coll = KnowledgeCollection(name="clinic", embedder="hash-64", dimensions=64, vector_name="clinic-x1")
        s.add(coll)
        s.flush()
        doc = KnowledgeDocument(collection_id=coll.id, source="fees.pdf", format="pdf", content_hash="h", size_bytes=10,
                                pages=3, chunk_count=2, chunk_size=400, chunk_overlap=50)  # fmt: skip
        s.add(doc)
        s.flush()
        chunks = [
            KnowledgeChunk(document_id=doc.id, collection_id=coll.id, position=0, text="passage 0", page=1,
                           heading="Fees", content_hash="c0"),
            KnowledgeChunk(document_id=doc.id, collection_id=coll.id, position=1, text="passage 1", page=2,
                           heading=None, content_hash="c1"),
        ]  # fmt: skip
        s.add_all(chunks)
        s.flush()
        rec = version_of(s, "receptionist")
        conv = add_conversation(
            s, rec, backend="embedded", model="m1", user=None, started=at(20, 9),
            turns=[("How much is a visit", at(20, 9, 0, 10), "Forty euros [1]", 100.0, 500.0, 4, 20.0)],
        )  # fmt: skip
        other = add_conversation(
            s, version_of(s, "support"), backend="ollama", model="m2", user=None, started=at(20, 10),
            turns=[("Do you bill insurers", at(20, 10, 0, 5), "Yes [1]", 90.0, 300.0, 2, 10.0)],
        )  # fmt: skip
        turn = s.scalar(select(TurnMetrics.id).where(TurnMetrics.conversation_id == conv.id))
        other_turn = s.scalar(select(TurnMetrics.id).where(TurnMetrics.conversation_id == other.id))
        s.add_all([
            TurnRetrieval(turn_metrics_id=turn, chunk_id=chunks[0].id, collection="clinic", source="fees.pdf", page=1,
                          heading="Fees", rank=1, similarity=0.82, low_relevance=False),
            TurnRetrieval(turn_metrics_id=turn, chunk_id=chunks[1].id, collection="clinic", source="fees.pdf", page=2,
                          heading=None, rank=2, similarity=None, low_relevance=False),
            TurnRetrieval(turn_metrics_id=other_turn, chunk_id=chunks[1].id, collection="clinic", source="fees.pdf",
                          page=2, heading=None, rank=1, similarity=0.31, low_relevance=True),
        ])  # fmt: skip
        return Knowledge(conv.id, other.id, turn, [c.id for c in chunks], doc.id)


def add_eval(store, *, k: int = 5, threshold: float = 0.35, created_at: datetime = T0, recall: float | None = 0.8,
             mrr: float | None = 0.7, flagged: int = 1, collection: str = "clinic", by: str | None = "rita",
             questions_file: str = "clinic.jsonl", chunk_size: int | None = 400) -> int:  # fmt: skip
    with store.session() as s:
        run = RetrievalEval(collection=collection, questions_file=questions_file, k=k, threshold=threshold,
                            embedder="hash-64", chunk_size=chunk_size, chunk_overlap=50, questions=6, answerable=4,
                            recall_at_k=recall, mrr=mrr, unanswerable_flagged=flagged, unanswerable=2,
                            created_at=created_at, created_by=by)  # fmt: skip
        s.add(run)
        s.flush()
        s.add_all([
            RetrievalEvalResult(retrieval_eval_id=run.id, question="How much is a visit?",
                                expected_sources=["fees.pdf"], retrieved_sources=["fees.pdf", "hours.md"],
                                first_relevant_rank=1, best_similarity=0.82, low_relevance=False),
            RetrievalEvalResult(retrieval_eval_id=run.id, question="Do you sell cars?", expected_sources=[],
                                retrieved_sources=["hours.md"], first_relevant_rank=None, best_similarity=0.1,
                                low_relevance=True),
        ])  # fmt: skip
        return run.id


@pytest.fixture
def an(store, tmp_path: Path) -> Analytics:
    return Analytics(store, tmp_path / "analytics.duckdb")


def rows(an: Analytics, sql: str) -> list[dict]:
    return an.query(sql, max_rows=10_000, actor=OP).to_df().to_dict("records")


def isna(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


# -- retrievals ----------------------------------------------------------------------------------------------


def test_the_retrievals_view_has_one_row_per_passage_a_turn_used(an: Analytics, store) -> None:
    k = build(store)
    got = rows(an, f"select * from retrievals where conversation_id = {k.conversation} order by rank")
    assert len(got) == 2
    first, second = got
    assert (first["turn_id"], first["conversation_id"]) == (k.turn, k.conversation)
    assert first["started_at"].to_pydatetime() == datetime(2026, 1, 20, 9, 0, 10)  # the turn's start, UTC
    assert (first["persona"], first["persona_version"]) == ("receptionist", 1)
    assert (first["backend"], first["model"], first["channel"]) == ("embedded", "m1", "text")
    assert (first["collection"], first["source"], first["page"], first["heading"]) == ("clinic", "fees.pdf", 1, "Fees")
    assert (first["chunk_id"], first["rank"], first["low_relevance"]) == (k.chunks[0], 1, False)
    assert first["similarity"] == pytest.approx(0.82)
    assert (second["rank"], second["page"], second["chunk_id"]) == (2, 2, k.chunks[1])
    assert isna(second["heading"]) and isna(second["similarity"])  # a keyword-only hit
    other = rows(an, f"select persona, backend, rank, low_relevance from retrievals where conversation_id = {k.other}")
    assert other == [{"persona": "support", "backend": "ollama", "rank": 1, "low_relevance": True}]
    # One query answers "which sources do flagged turns use?".
    per_source = rows(an, "select source, count(*) as n, count(*) filter (where low_relevance) as low "
                          "from retrievals group by 1")  # fmt: skip
    assert per_source == [{"source": "fees.pdf", "n": 3, "low": 1}]


def test_retrieval_rows_are_appended_and_leave_with_their_conversation(an: Analytics, store) -> None:
    k = build(store)
    first = an.refresh()
    assert first.copied["turn_retrievals"] == 3
    assert not an.refresh().changed

    # A new turn's passages are copied with the turn, and only they.
    with store.session() as s:
        conv = add_conversation(
            s, version_of(s, "tutor"), backend="embedded", model="m1", user=None, started=at(21, 8),
            turns=[("What are the fees", at(21, 8, 0, 5), "See [1]", 80.0, 200.0, 2, 30.0)],
        )  # fmt: skip
        turn = s.scalar(select(TurnMetrics.id).where(TurnMetrics.conversation_id == conv.id))
        s.add(TurnRetrieval(turn_metrics_id=turn, chunk_id=k.chunks[0], collection="clinic", source="fees.pdf", page=1,
                            heading="Fees", rank=1, similarity=0.9, low_relevance=False))  # fmt: skip
        new = conv.id
    stats = an.refresh()
    assert stats.copied == {"conversations": 1, "messages": 2, "turn_metrics": 1, "turn_retrievals": 1}
    assert rows(an, f"select persona, rank from retrievals where conversation_id = {new}") == [
        {"persona": "tutor", "rank": 1}
    ]

    # A deleted conversation's passages leave the snapshot with its turns; the others stay.
    delete_conversation(store, k.conversation, actor=OP)
    stats = an.refresh()
    assert stats.deleted == {"conversations": 1, "messages": 2, "turn_metrics": 1, "turn_retrievals": 2}
    assert rows(an, f"select count(*) as n from retrievals where conversation_id = {k.conversation}") == [{"n": 0}]
    assert rows(an, f"select count(*) as n from raw.turn_retrievals where turn_metrics_id = {k.turn}") == [{"n": 0}]
    assert rows(an, "select count(*) as n from retrievals") == [{"n": 2}]
    assert not an.refresh().changed


def test_a_deleted_chunk_unlinks_its_retrievals_in_the_snapshot(an: Analytics, store) -> None:
    # The store sets turn_retrievals.chunk_id to NULL when the chunk goes (a document re-ingested or deleted):
    # the one change to rows that are otherwise only ever appended.
    k = build(store)
    an.refresh()
    with store.session() as s:
        s.delete(s.get(KnowledgeChunk, k.chunks[1]))
    stats = an.refresh()
    assert stats.changed and stats.copied == {"turn_retrievals": 2}
    got = rows(an, "select turn_id, rank, chunk_id, source, page from retrievals order by turn_id, rank")
    assert [(r["rank"], None if isna(r["chunk_id"]) else r["chunk_id"]) for r in got] == [
        (1, k.chunks[0]),
        (2, None),
        (1, None),
    ]
    assert all(r["source"] == "fees.pdf" for r in got) and got[1]["page"] == 2  # what the turn was shown stays
    assert not an.refresh().changed
    # The whole document goes: its last chunk with it.
    with store.session() as s:
        s.delete(s.get(KnowledgeDocument, k.document))
    assert an.refresh().copied == {"turn_retrievals": 1}
    assert rows(an, "select count(chunk_id) as n from retrievals") == [{"n": 0}]


def test_bulk_and_row_by_row_copies_of_retrievals_agree(store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On PostgreSQL a big range is copied through DuckDB's postgres scanner, a small one over the store's own
    connection (on SQLite both read natively): the same rows either way, booleans and NULLs included."""
    build(store)
    native = Analytics(store, tmp_path / "native.duckdb")
    monkeypatch.setattr(engine_module, "NATIVE_MAX_ROWS", -1)  # every range counts as big
    bulk = Analytics(store, tmp_path / "bulk.duckdb")
    bulk.refresh()
    monkeypatch.undo()
    ordered = "select * from retrievals order by all"
    assert native.query(ordered, actor=OP).rows == bulk.query(ordered, actor=OP).rows
    assert len(bulk.query(ordered, actor=OP).rows) == 3


# -- retrieval evaluations ------------------------------------------------------------------------------------


def test_the_retrieval_evals_view_and_its_raw_results(an: Analytics, store) -> None:
    assert rows(an, "select * from retrieval_evals") == []
    run = add_eval(store, recall=0.75, mrr=0.625, flagged=1)
    got = rows(an, "select * from retrieval_evals")
    assert len(got) == 1
    row = got[0]
    assert row["id"] == run
    assert {key: row[key] for key in ("collection", "questions_file", "k", "embedder", "chunk_size", "chunk_overlap",
                                      "questions", "answerable", "unanswerable_flagged", "unanswerable", "created_by")}\
        == {"collection": "clinic", "questions_file": "clinic.jsonl", "k": 5, "embedder": "hash-64",
            "chunk_size": 400, "chunk_overlap": 50, "questions": 6, "answerable": 4, "unanswerable_flagged": 1,
            "unanswerable": 2, "created_by": "rita"}  # fmt: skip
    assert row["threshold"] == pytest.approx(0.35)
    assert row["recall_at_k"] == pytest.approx(0.75) and row["mrr"] == pytest.approx(0.625)
    assert row["created_at"].to_pydatetime() == T0.replace(tzinfo=None)
    # Its questions, JSON lists as JSON text, joined on the run's id.
    results = rows(an, "select r.question, r.expected_sources, r.retrieved_sources, r.first_relevant_rank, "
                       "r.low_relevance from retrieval_evals e join raw.retrieval_eval_results r "
                       "on r.retrieval_eval_id = e.id order by r.id")  # fmt: skip
    assert [json.loads(r["expected_sources"]) for r in results] == [["fees.pdf"], []]
    assert json.loads(results[0]["retrieved_sources"]) == ["fees.pdf", "hours.md"]
    assert [r["low_relevance"] for r in results] == [False, True] and isna(results[1]["first_relevant_rank"])
    # Recall@5 per collection and settings is one query.
    per_settings = rows(
        an, "select collection, k, chunk_size, avg(recall_at_k) as recall from retrieval_evals group by all"
    )
    assert per_settings == [{"collection": "clinic", "k": 5, "chunk_size": 400, "recall": 0.75}]

    # A run deleted in the store (its results by cascade) leaves the snapshot.
    with store.session() as s:
        s.delete(s.get(RetrievalEval, run))
    assert rows(an, "select count(*) as n from raw.retrieval_eval_results") == [{"n": 0}]
    assert rows(an, "select count(*) as n from retrieval_evals") == [{"n": 0}]


def test_the_leaderboard_shows_the_latest_run_per_settings(an: Analytics, store) -> None:
    assert retrieval_leaderboard(an).empty
    add_eval(store, created_at=T0, recall=0.5, mrr=0.4, flagged=0, by="rita")
    newer = add_eval(store, created_at=T0 + timedelta(hours=1), recall=0.8, mrr=0.7, flagged=2, by="ada")
    wider = add_eval(store, k=10, created_at=T0 - timedelta(days=1), recall=0.9, mrr=0.7, by=None)
    other_chunks = add_eval(store, chunk_size=None, created_at=T0, recall=0.6, by="rita")
    elsewhere = add_eval(store, collection="shop", created_at=T0, recall=None, mrr=None, flagged=1)

    board = retrieval_leaderboard(an)
    records = board.to_dict("records")
    assert [r["retrieval_eval_id"] for r in records] == [wider, newer, other_chunks, elsewhere]
    assert list(board.columns) == [
        "collection", "questions_file", "k", "threshold", "chunk_size", "chunk_overlap", "embedder", "recall_at_k",
        "mrr", "unanswerable_flagged", "questions", "answerable", "runs", "created_at", "created_by",
        "retrieval_eval_id",
    ]  # fmt: skip
    latest = records[1]
    assert (latest["k"], latest["recall_at_k"], latest["mrr"]) == (5, pytest.approx(0.8), pytest.approx(0.7))
    assert (latest["unanswerable_flagged"], latest["runs"], latest["created_by"]) == ("2/2", 2, "ada")
    assert latest["created_at"].to_pydatetime() == (T0 + timedelta(hours=1)).replace(tzinfo=None)
    assert (records[0]["k"], records[0]["runs"], records[0]["unanswerable_flagged"]) == (10, 1, "1/2")
    assert isna(records[0]["created_by"])
    assert isna(records[2]["chunk_size"]) and records[2]["runs"] == 1  # unknown chunking is a setting of its own
    assert records[3]["collection"] == "shop" and isna(records[3]["recall_at_k"])

    # A rerun of the same settings replaces the one shown, also when it scores worse.
    rerun = add_eval(store, created_at=T0 + timedelta(days=1), recall=0.2, mrr=0.1, by="rita")
    again = {r["retrieval_eval_id"]: r for r in retrieval_leaderboard(an).to_dict("records")}
    assert set(again) == {wider, rerun, other_chunks, elsewhere}
    assert again[rerun]["runs"] == 3 and again[rerun]["recall_at_k"] == pytest.approx(0.2)

    # The page's two tables come from one refresh.
    data = leaderboard_data(an)
    assert set(data) == {"personas", "retrieval"} and len(data["retrieval"]) == 4 and data["personas"].empty


# -- documentation -------------------------------------------------------------------------------------------


def test_the_new_views_and_tables_are_documented() -> None:
    docs = {d.name: d for d in VIEW_DOCS}
    assert [c for c, _ in docs["retrievals"].columns] == [
        "turn_id", "conversation_id", "started_at", "persona", "persona_version", "backend", "model", "channel",
        "collection", "source", "page", "heading", "chunk_id", "rank", "similarity", "low_relevance",
    ]  # fmt: skip
    assert "recall_at_k" in [c for c, _ in docs["retrieval_evals"].columns]
    for table in ("raw.turn_retrievals", "raw.retrieval_evals", "raw.retrieval_eval_results"):
        assert table in RAW_TABLES_NOTE
