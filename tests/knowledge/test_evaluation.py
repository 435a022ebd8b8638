"""Retrieval evaluation: the question file, the scores' arithmetic, and the stored runs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.errors import InvalidInput, PermissionDenied
from callbot_core.knowledge.evaluation import (
    EvalQuestion,
    EvalQuestionResult,
    eval_results,
    evaluate,
    list_evals,
    load_questions,
    parse_questions,
    score,
)
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.store.models import RetrievalEval


def _result(expected: tuple[str, ...], got: tuple[str, ...], first: int | None, low: bool) -> EvalQuestionResult:
    return EvalQuestionResult("q", expected, got, first, 0.5, low)


def test_scores_by_hand() -> None:
    results = [
        _result(("a.pdf",), ("a.pdf", "b.md"), 1, False),  # recall 1, RR 1
        _result(("b.md",), ("a.pdf", "docs/b.md"), 2, False),  # a source under a folder matches by name: RR 1/2
        _result(("a.pdf", "c.txt"), ("a.pdf",), 1, False),  # half the expected files: recall 0.5
        _result(("c.txt",), ("a.pdf",), None, True),  # missed: recall 0, RR 0
        _result((), ("a.pdf",), None, True),  # unanswerable, flagged
        _result((), ("a.pdf",), None, False),  # unanswerable, not flagged
    ]
    scores = score(results)
    assert scores["answerable"] == 4 and scores["unanswerable"] == 2 and scores["unanswerable_flagged"] == 1
    assert scores["recall_at_k"] == pytest.approx((1 + 1 + 0.5 + 0) / 4)
    assert scores["mrr"] == pytest.approx((1 + 0.5 + 1 + 0) / 4)
    only_unanswerable = score([_result((), (), None, True)])
    assert only_unanswerable["recall_at_k"] is None and only_unanswerable["mrr"] is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "no questions"),
        ('{"question": "a", "expected_sources": []}\nnot json\n', "line 2: not JSON"),
        ('["a"]\n', "line 1: expected an object"),
        ('{"question": "  "}\n', "line 1: The question is empty"),
        ('{"question": "a", "expected_sources": "a.pdf"}\n', "line 1: expected_sources must be a list"),
        ('{"question": "a", "expected_sources": [""]}\n', "line 1: expected_sources must be a list"),
    ],
)
def test_bad_question_files_name_the_line(text: str, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        parse_questions(text, name="q.jsonl")


def test_load_questions(tmp_path: Path) -> None:
    path = tmp_path / "q.jsonl"
    path.write_text('\n{"question": "Saturday?", "expected_sources": ["hours.md"]}\n\n{"question": "Weather?"}\n')
    assert load_questions(path) == [EvalQuestion("Saturday?", ("hours.md",)), EvalQuestion("Weather?", ())]
    with pytest.raises(InvalidInput, match="no such file"):
        load_questions(tmp_path / "missing.jsonl")
    (tmp_path / "bin.jsonl").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(InvalidInput, match="cannot be read as UTF-8"):
        load_questions(tmp_path / "bin.jsonl")


def test_an_evaluation_is_scored_and_stored(clinic: KnowledgeBase) -> None:
    questions = [
        EvalQuestion("Is the clinic open on Saturday?", ("hours.md",)),
        EvalQuestion("How much is the no-show fee for a missed appointment?", ("fees.txt",)),
        EvalQuestion("Is there parking for bicycles?", ("parking.txt",)),
        EvalQuestion("quarterly dividend stock forecast", ()),
    ]
    progress: list[tuple[int, int]] = []
    run = evaluate(clinic, "clinic", questions, actor=LOCAL_OPERATOR, k=2, threshold=0.3, questions_file="q.jsonl",
                   progress=lambda done, total: progress.append((done, total)))  # fmt: skip
    assert progress[0] == (0, 4) and progress[-1] == (4, 4)
    assert (run.questions, run.answerable, run.unanswerable) == (4, 3, 1)
    assert run.recall_at_k == 1.0 and run.mrr == 1.0 and run.unanswerable_flagged == 1
    assert (run.k, run.threshold, run.embedder, run.chunk_size) == (2, 0.3, "test-bow", 800)
    assert run.as_dict()["recall_at_2"] == 1.0

    per_question = eval_results(clinic, run.id, actor=LOCAL_OPERATOR)
    assert [r.first_relevant_rank for r in per_question] == [1, 1, 1, None]
    assert per_question[-1].low_relevance and not per_question[0].low_relevance
    assert [r.id for r in list_evals(clinic, actor=LOCAL_OPERATOR, collection="clinic")] == [run.id]
    with clinic.store.session() as session:
        assert session.scalar(select(RetrievalEval.created_by)) == "cli"


def test_evaluating_needs_the_permission(clinic: KnowledgeBase) -> None:
    viewer = OperatorActor(username="vera", role="viewer")
    with pytest.raises(PermissionDenied, match="may not run retrieval evaluations"):
        evaluate(clinic, "clinic", [EvalQuestion("hours?", ())], actor=viewer)
    assert list_evals(clinic, actor=viewer) == []  # reading is for everyone
