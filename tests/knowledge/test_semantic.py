"""Semantic transcript search: messages found by meaning, indexed as they arrive, gone with their conversation."""

from __future__ import annotations

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.conversations.transcripts import delete_conversation
from callbot_core.errors import InvalidInput, PermissionDenied
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.semantic import index_messages, semantic_search
from callbot_core.store.models import Conversation, Message, PersonaVersion


def _conversation(kb: KnowledgeBase, *texts: str) -> int:
    """A stored conversation with these messages (caller and bot alternating), written as the engine stores them."""
    with kb.store.session() as session:
        version = session.query(PersonaVersion).first()
        assert version is not None
        conversation = Conversation(persona_version_id=version.id, backend="scripted", model="m")
        session.add(conversation)
        session.flush()
        for i, text in enumerate(texts):
            session.add(Message(conversation_id=conversation.id, role="user" if i % 2 == 0 else "assistant", text=text))
        return conversation.id


def test_messages_are_found_by_meaning_and_indexed_as_they_arrive(kb: KnowledgeBase) -> None:
    first = _conversation(kb, "I need to cancel my dentist appointment tomorrow", "Of course, it is cancelled.")
    _conversation(kb, "What is the weather like in Hamburg?", "I cannot tell the weather, sorry.")
    hits = semantic_search(kb, "cancel appointment", actor=LOCAL_OPERATOR, limit=2)
    assert hits[0].conversation_id == first and hits[0].role == "user" and "dentist" in hits[0].text
    assert hits[0].similarity >= hits[-1].similarity and 0 <= hits[-1].similarity <= 1
    assert hits[0].persona and hits[0].message_id > 0

    assert index_messages(kb) == 0  # nothing new: nothing embedded again
    later = _conversation(kb, "Please move my appointment to Friday, cancel the Monday one")
    progress: list[tuple[int, int]] = []
    assert index_messages(kb, lambda done, total: progress.append((done, total))) == 1 and progress == [(1, 1)]
    ids = {h.conversation_id for h in semantic_search(kb, "cancel appointment", actor=LOCAL_OPERATOR, limit=5)}
    assert {first, later} <= ids

    delete_conversation(kb.store, first, actor=LOCAL_OPERATOR)
    after = semantic_search(kb, "cancel appointment", actor=LOCAL_OPERATOR, limit=5)
    assert first not in {h.conversation_id for h in after}


def test_empty_store_and_bad_input(kb: KnowledgeBase) -> None:
    assert semantic_search(kb, "anything", actor=LOCAL_OPERATOR) == []
    with pytest.raises(InvalidInput, match="empty"):
        semantic_search(kb, "  ", actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match="limit must be"):
        semantic_search(kb, "x", actor=LOCAL_OPERATOR, limit=0)
    nobody = type("Keyed", (), {"username": "k", "role": "viewer", "scopes": frozenset({"chat"})})()
    with pytest.raises(PermissionDenied):
        semantic_search(kb, "x", actor=nobody)
    assert semantic_search(kb, "x", actor=OperatorActor("vera", "viewer")) == []
