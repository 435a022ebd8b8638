"""Retrieval in turns: a persona version naming a collection gets a timed `retrieve` stage, its passages in the prompt
within the context budget, numbered citations on the result, and `turn_retrievals` rows stored with the turn."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm import llm_backends
from callbot_core.conversations.service import ConversationService
from callbot_core.conversations.transcripts import get_conversation
from callbot_core.errors import InvalidInput, NotFound
from callbot_core.experiments.evals.assertions import evaluate as check
from callbot_core.experiments.evals.suite import Assertion
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.stage import INSTRUCTION, LOW_RELEVANCE
from callbot_core.personas.versions import get_version, save_version
from callbot_core.store.models import TurnMetrics, TurnRetrieval, TurnStage
from tests.engine.scripted import Scripted


@pytest.fixture
def backend() -> Iterator[Scripted]:
    fake = Scripted()
    fake.pieces = ("We open", " at 9 on Saturday [1].")
    llm_backends.register("scripted", lambda settings: fake)
    yield fake
    llm_backends.unregister("scripted")


@pytest.fixture
def service(clinic: KnowledgeBase, backend: Scripted) -> ConversationService:
    settings = clinic.settings.model_copy(update={"llm_backend": "scripted"})
    save_version(clinic.store, "receptionist", {"knowledge_collection": "clinic", "knowledge_k": 2},
                 actor=LOCAL_OPERATOR)  # fmt: skip
    return ConversationService(clinic.store, settings)


def _stage_names(store, conversation_id: int) -> list[str]:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return list(
            session.scalars(
                select(TurnStage.stage)
                .join(TurnMetrics, TurnMetrics.id == TurnStage.turn_metrics_id)
                .where(TurnMetrics.conversation_id == conversation_id)
                .order_by(TurnStage.position)
            )
        )


def test_a_turn_retrieves_cites_and_stores_what_it_used(service: ConversationService, backend: Scripted) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "Are you open on Saturday?", actor=LOCAL_OPERATOR)
    assert turn.text() == "We open at 9 on Saturday [1]."
    result = turn.result
    assert result is not None and result.low_relevance is False
    assert len(result.citations) == 2 and result.citations[0].source == "hours.md"

    system = backend.requests[-1][0].content
    assert system.index("You are") < system.index(INSTRUCTION)  # the persona's prompt first, then the passages
    assert "[1] (hours.md) " in system and "9:00 to 13:00" in system and LOW_RELEVANCE not in system

    assert _stage_names(service.store, info.id) == ["validate", "retrieve", "prompt", "generate", "persist"]
    with service.store.session() as session:
        rows = session.scalars(select(TurnRetrieval).order_by(TurnRetrieval.rank)).all()
        assert [(r.rank, r.source, r.collection) for r in rows][0] == (1, "hours.md", "clinic")
        assert len(rows) == 2 and all(r.similarity is not None and not r.low_relevance for r in rows)

    # The transcript carries the citations and the retrieval time for the pages.
    reply = get_conversation(service.store, info.id).messages[-1]
    assert reply.role == "assistant" and reply.citations[0].label == "hours.md"
    assert reply.citations[0].text and "Saturday" in reply.citations[0].text
    assert reply.low_relevance is False and reply.retrieve_ms is not None and reply.retrieve_ms > 0

    # Suite assertions read the same citations.
    said = "Are you open on Saturday?"
    assert check(Assertion("retrieved", {"source": "hours.md"}, 1), said, result).passed
    assert check(Assertion("cites", {"source": "hours.md"}, 1), said, result).passed
    missing = check(Assertion("retrieved", {"source": "parking.txt"}, 1), said, result)
    assert not missing.passed and "not retrieved" in missing.detail
    assert not check(Assertion("cites", {"source": "fees.txt"}, 1), said, result).passed


def test_a_question_the_documents_do_not_answer_says_so(service: ConversationService, backend: Scripted) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    result = service.send(info.id, "quarterly dividend forecast stock", actor=LOCAL_OPERATOR)
    result.text()
    assert result.result is not None and result.result.low_relevance is True
    assert LOW_RELEVANCE in backend.requests[-1][0].content
    assert get_conversation(service.store, info.id).messages[-1].low_relevance is True


def test_a_persona_without_documents_skips_retrieval(clinic: KnowledgeBase, backend: Scripted) -> None:
    service = ConversationService(clinic.store, clinic.settings.model_copy(update={"llm_backend": "scripted"}))
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "Are you open on Saturday?", actor=LOCAL_OPERATOR)
    turn.text()
    assert turn.result is not None and turn.result.citations == () and turn.result.low_relevance is None
    assert _stage_names(clinic.store, info.id) == ["validate", "prompt", "generate", "persist"]
    assert INSTRUCTION not in backend.requests[-1][0].content
    no = check(Assertion("retrieved", {"source": "hours.md"}, 1), "x", turn.result)
    assert not no.passed and "retrieved nothing" in no.detail


def test_passages_are_kept_within_the_context_budget(service: ConversationService, backend: Scripted) -> None:
    backend.context_window = lambda model=None: 420  # type: ignore[method-assign]
    save_version(service.store, "receptionist", {"knowledge_k": 3, "max_tokens": 64}, actor=LOCAL_OPERATOR)
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "Saturday opening hours and the no-show fee?", actor=LOCAL_OPERATOR)
    turn.text()
    assert turn.result is not None
    used = len(turn.result.citations)
    assert used < 3  # the window leaves room for fewer than k passages
    system = backend.requests[-1][0].content
    assert system.count("] (") == used


def test_a_version_naming_a_missing_collection_refuses_the_turn(service: ConversationService) -> None:
    save_version(service.store, "receptionist", {"knowledge_collection": "gone"}, actor=LOCAL_OPERATOR)
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    before = get_conversation(service.store, info.id).messages  # the greeting
    with pytest.raises(NotFound, match="Unknown knowledge collection 'gone'"):
        service.send(info.id, "hello", actor=LOCAL_OPERATOR)
    assert get_conversation(service.store, info.id).messages == before  # refused before anything was stored


def test_retrieval_settings_are_part_of_the_version(service: ConversationService) -> None:
    version = get_version(service.store, "receptionist")
    assert (version.knowledge_collection, version.knowledge_k, version.knowledge_threshold) == ("clinic", 2, None)
    with pytest.raises(InvalidInput, match="knowledge_k must be a whole number from 1 to 20"):
        save_version(service.store, "receptionist", {"knowledge_k": 0}, actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match="knowledge_threshold must be between 0 and 1"):
        save_version(service.store, "receptionist", {"knowledge_threshold": 2}, actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match="collection name"):
        save_version(service.store, "receptionist", {"knowledge_collection": "Bad Name"}, actor=LOCAL_OPERATOR)
    cleared = save_version(service.store, "receptionist", {"knowledge_collection": ""}, actor=LOCAL_OPERATOR)
    assert cleared.knowledge_collection is None
