"""Hybrid retrieval: fused ranks, similarities, the low-relevance flag, bad input."""

from __future__ import annotations

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.errors import InvalidInput, NotFound, PermissionDenied
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.retrieval import RRF_K, search
from tests.knowledge.conftest import text_file


def test_best_passage_first_with_source_heading_and_similarity(clinic: KnowledgeBase) -> None:
    result = search(clinic, "clinic", "Is the clinic open on Saturday?", k=3, actor=LOCAL_OPERATOR)
    best = result.hits[0]
    assert best.source == "hours.md" and best.heading == "Opening hours > Saturday"
    assert "9:00 to 13:00" in best.text
    assert [h.rank for h in result.hits] == [1, 2, 3]
    assert all(h.similarity is not None and 0 <= h.similarity <= 1 for h in result.hits)
    assert best.similarity == max(h.similarity for h in result.hits)  # type: ignore[type-var]
    assert result.best_similarity == best.similarity and not result.low_relevance
    assert best.vector_rank == 1 and best.keyword_rank == 1


def test_fusion_rewards_agreement(clinic: KnowledgeBase) -> None:
    result = search(clinic, "clinic", "no-show fee for a missed appointment", k=5, threshold=0.0)
    assert result.hits[0].source == "fees.txt"
    # A hit found by both rankings outranks one found by a single ranking at the same place.
    both = [h for h in result.hits if h.vector_rank and h.keyword_rank]
    single = [h for h in result.hits if not (h.vector_rank and h.keyword_rank)]
    if both and single:
        assert max(h.rank for h in both) < min(h.rank for h in single) or RRF_K


def test_unanswerable_question_is_flagged_low_relevance(clinic: KnowledgeBase) -> None:
    result = search(clinic, "clinic", "stock price quarterly dividend forecast", k=3, threshold=0.35)
    assert result.low_relevance
    assert result.best_similarity is None or result.best_similarity < 0.35
    strict = search(clinic, "clinic", "Is the clinic open on Saturday?", k=3, threshold=0.99)
    assert strict.low_relevance and strict.threshold == 0.99


def test_k_caps_the_hits(clinic: KnowledgeBase) -> None:
    assert len(search(clinic, "clinic", "clinic", k=1).hits) == 1
    assert len(search(clinic, "clinic", "clinic", k=50).hits) <= 50


def test_search_sees_changes_at_once(clinic: KnowledgeBase) -> None:
    before = search(clinic, "clinic", "helicopter landing pad on the roof", k=2, threshold=0.3)
    assert before.low_relevance
    clinic.ingest("clinic", [text_file("roof.txt", "The helicopter landing pad is on the roof.")], actor=LOCAL_OPERATOR)
    after = search(clinic, "clinic", "helicopter landing pad on the roof", k=2, threshold=0.3)
    assert after.hits[0].source == "roof.txt" and not after.low_relevance
    clinic.delete_document("clinic", "roof.txt", actor=LOCAL_OPERATOR)
    assert all(h.source != "roof.txt" for h in search(clinic, "clinic", "helicopter landing pad roof", k=5).hits)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"question": "   "}, "question is empty"),
        ({"question": "x" * 2001}, "limit is 2000"),
        ({"question": "hours", "k": 0}, "k must be"),
        ({"question": "hours", "k": 51}, "k must be"),
        ({"question": "hours", "k": True}, "k must be"),
        ({"question": "hours", "threshold": 1.5}, "threshold"),
    ],
)
def test_bad_input(clinic: KnowledgeBase, kwargs: dict, message: str) -> None:
    options = dict(kwargs)  # the parameter's dict is shared by the SQLite and PostgreSQL runs
    question = options.pop("question")
    with pytest.raises(InvalidInput, match=message):
        search(clinic, "clinic", question, **options)


def test_unknown_collection_and_permissions(clinic: KnowledgeBase) -> None:
    with pytest.raises(NotFound, match="Unknown knowledge collection 'nope'"):
        search(clinic, "nope", "hours")
    viewer = OperatorActor(username="vera", role="viewer")
    assert search(clinic, "clinic", "hours", actor=viewer).hits
    keyed = type("Keyed", (), {"username": "bot", "role": "viewer", "scopes": frozenset({"chat"})})()
    with pytest.raises(PermissionDenied, match="needs the 'read' scope"):
        search(clinic, "clinic", "hours", actor=keyed)


def test_as_dict_is_the_cli_shape(clinic: KnowledgeBase) -> None:
    data = search(clinic, "clinic", "parking for bicycles", k=2).as_dict()
    assert set(data) >= {"hits", "low_relevance"}
    assert set(data["hits"][0]) == {"source", "page", "heading", "chunk_id", "similarity", "rank", "text"}
