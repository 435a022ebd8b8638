"""Retrieval evaluation: a question set against a collection, scored and stored like everything else.

Each question names the files that answer it (`expected_sources`; empty when the documents do not). For the
answerable ones: recall@k (the share of a question's expected files among its k hits, averaged) and MRR (1 / the
rank of the first hit from an expected file, 0 when none, averaged). For the others: how many were flagged
`low_relevance`, which is what lets a bot say "I don't know" instead of answering from the wrong passage. Runs are
stored with their settings (`retrieval_evals`, one row per question in `retrieval_eval_results`), so a change of
chunking, k or threshold is compared with numbers, not by re-asking the questions by hand.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select

from callbot_core.access.audit import record
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import InvalidInput
from callbot_core.knowledge.index import KnowledgeBase, check_collection_name
from callbot_core.knowledge.retrieval import check_k, check_question, check_threshold, search
from callbot_core.store.models import KnowledgeDocument, RetrievalEval, RetrievalEvalResult

MAX_QUESTIONS = 5000


@dataclass(frozen=True, slots=True)
class EvalQuestion:
    question: str
    expected_sources: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class EvalQuestionResult:
    question: str
    expected_sources: tuple[str, ...]
    retrieved_sources: tuple[str, ...]
    first_relevant_rank: int | None
    best_similarity: float | None
    low_relevance: bool


@dataclass(frozen=True, slots=True)
class RetrievalEvalInfo:
    id: int
    collection: str
    questions_file: str
    k: int
    threshold: float
    embedder: str
    chunk_size: int | None
    chunk_overlap: int | None
    questions: int
    answerable: int
    recall_at_k: float | None
    mrr: float | None
    unanswerable_flagged: int
    unanswerable: int
    created_at: datetime
    created_by: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "collection": self.collection,
            "questions_file": self.questions_file,
            "k": self.k,
            "threshold": self.threshold,
            "embedder": self.embedder,
            "chunk_size": self.chunk_size,
            "chunk_overlap": self.chunk_overlap,
            "questions": self.questions,
            "answerable": self.answerable,
            f"recall_at_{self.k}": self.recall_at_k,
            "recall_at_k": self.recall_at_k,
            "mrr": self.mrr,
            "unanswerable_flagged": self.unanswerable_flagged,
            "unanswerable": self.unanswerable,
            "created_at": self.created_at.isoformat(),
            "created_by": self.created_by,
        }


def parse_questions(text: str, *, name: str = "questions") -> list[EvalQuestion]:
    """Questions from JSON Lines: one object per line with `question` and `expected_sources` (a list of file
    names, empty for a question the documents do not answer). Blank lines are skipped; errors name the line."""
    questions: list[EvalQuestion] = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            item = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidInput(f"{name} line {number}: not JSON ({exc.msg})") from None
        if not isinstance(item, dict):
            raise InvalidInput(f"{name} line {number}: expected an object with question and expected_sources")
        try:
            question = check_question(item.get("question"))
        except InvalidInput as exc:
            raise InvalidInput(f"{name} line {number}: {exc}") from None
        expected = item.get("expected_sources", [])
        if not isinstance(expected, list) or not all(isinstance(s, str) and s.strip() for s in expected):
            raise InvalidInput(f"{name} line {number}: expected_sources must be a list of file names (or [])")
        questions.append(EvalQuestion(question, tuple(s.strip() for s in expected)))
        if len(questions) > MAX_QUESTIONS:
            raise InvalidInput(f"{name}: more than {MAX_QUESTIONS} questions")
    if not questions:
        raise InvalidInput(f"{name}: no questions")
    return questions


def load_questions(path: Path) -> list[EvalQuestion]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InvalidInput(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"{path}: cannot be read as UTF-8 text ({exc})") from None
    return parse_questions(text, name=path.name)


def _matches(source: str, expected: str) -> bool:
    """A hit's source matches an expected file by name: "fees.pdf" matches "clinic/fees.pdf" too."""
    return source == expected or source.rsplit("/", 1)[-1] == expected


def score(results: Sequence[EvalQuestionResult]) -> dict[str, Any]:
    """recall@k, MRR and the low-relevance counts of a set of question results."""
    answerable = [r for r in results if r.expected_sources]
    unanswerable = [r for r in results if not r.expected_sources]
    recalls = [
        sum(any(_matches(s, e) for s in r.retrieved_sources) for e in r.expected_sources) / len(r.expected_sources)
        for r in answerable
    ]
    reciprocal = [1.0 / r.first_relevant_rank if r.first_relevant_rank else 0.0 for r in answerable]
    return {
        "questions": len(results),
        "answerable": len(answerable),
        "recall_at_k": sum(recalls) / len(recalls) if recalls else None,
        "mrr": sum(reciprocal) / len(reciprocal) if reciprocal else None,
        "unanswerable": len(unanswerable),
        "unanswerable_flagged": sum(r.low_relevance for r in unanswerable),
    }


def evaluate(
    kb: KnowledgeBase,
    collection: str,
    questions: Sequence[EvalQuestion],
    *,
    actor: Actor,
    k: int = 5,
    threshold: float | None = None,
    questions_file: str = "questions",
    progress: Callable[[int, int], None] | None = None,
) -> RetrievalEvalInfo:
    """Ask every question, score the hits, store the run and its per-question rows; returns the stored run."""
    require(actor, "knowledge.eval")
    collection = check_collection_name(collection)
    k = check_k(k)
    threshold = check_threshold(kb.settings.knowledge_low_relevance if threshold is None else threshold)
    if not questions:
        raise InvalidInput("No questions to evaluate")
    results: list[EvalQuestionResult] = []
    for done, item in enumerate(questions):
        if progress is not None:
            progress(done, len(questions))
        retrieval = search(kb, collection, item.question, k=k, threshold=threshold)
        sources = tuple(h.source for h in retrieval.hits)
        first = next(
            (h.rank for h in retrieval.hits if any(_matches(h.source, e) for e in item.expected_sources)), None
        )
        results.append(
            EvalQuestionResult(
                item.question, item.expected_sources, sources, first, retrieval.best_similarity, retrieval.low_relevance
            )
        )
    if progress is not None:
        progress(len(questions), len(questions))
    scores = score(results)
    with kb.store.session() as session:
        row = kb._collection_row(session, collection)
        settings = Counter(
            session.execute(
                select(KnowledgeDocument.chunk_size, KnowledgeDocument.chunk_overlap).where(
                    KnowledgeDocument.collection_id == row.id
                )
            ).all()
        ).most_common(1)
        chunk_size, chunk_overlap = settings[0][0] if settings else (None, None)
        run = RetrievalEval(
            collection=collection,
            questions_file=questions_file[:500],
            k=k,
            threshold=threshold,
            embedder=row.embedder,
            chunk_size=chunk_size,
            chunk_overlap=chunk_overlap,
            created_by=actor.username,
            **scores,
        )
        session.add(run)
        session.flush()
        session.add_all(
            RetrievalEvalResult(
                retrieval_eval_id=run.id,
                question=r.question,
                expected_sources=list(r.expected_sources),
                retrieved_sources=list(r.retrieved_sources),
                first_relevant_rank=r.first_relevant_rank,
                best_similarity=r.best_similarity,
                low_relevance=r.low_relevance,
            )
            for r in results
        )
        record(session, "knowledge.eval", actor=actor.username, target=collection, detail={"eval_id": run.id})
        session.flush()
        return _info(run)


def _info(run: RetrievalEval) -> RetrievalEvalInfo:
    return RetrievalEvalInfo(
        id=run.id,
        collection=run.collection,
        questions_file=run.questions_file,
        k=run.k,
        threshold=run.threshold,
        embedder=run.embedder,
        chunk_size=run.chunk_size,
        chunk_overlap=run.chunk_overlap,
        questions=run.questions,
        answerable=run.answerable,
        recall_at_k=run.recall_at_k,
        mrr=run.mrr,
        unanswerable_flagged=run.unanswerable_flagged,
        unanswerable=run.unanswerable,
        created_at=run.created_at,
        created_by=run.created_by,
    )


def list_evals(
    kb: KnowledgeBase, *, actor: Actor, collection: str | None = None, limit: int = 100
) -> list[RetrievalEvalInfo]:
    """Stored retrieval evaluations, newest first."""
    require(actor, "knowledge.read")
    query = select(RetrievalEval).order_by(RetrievalEval.id.desc()).limit(limit)
    if collection is not None:
        query = query.where(RetrievalEval.collection == check_collection_name(collection))
    with kb.store.session() as session:
        return [_info(r) for r in session.scalars(query)]


def eval_results(kb: KnowledgeBase, eval_id: int, *, actor: Actor) -> list[EvalQuestionResult]:
    require(actor, "knowledge.read")
    with kb.store.session() as session:
        rows = session.scalars(
            select(RetrievalEvalResult)
            .where(RetrievalEvalResult.retrieval_eval_id == eval_id)
            .order_by(RetrievalEvalResult.id)
        )
        return [
            EvalQuestionResult(
                r.question,
                tuple(r.expected_sources),
                tuple(r.retrieved_sources),
                r.first_relevant_rank,
                r.best_similarity,
                r.low_relevance,
            )
            for r in rows
        ]
