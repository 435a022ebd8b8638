"""Semantic transcript search: find stored messages by meaning through the same embedder and vector store.

Messages are indexed on demand: each search first embeds the messages stored since the last one (newest ids only;
messages never change once stored), through the embedding cache, into a vector collection of their own. Its row in
`knowledge_collections` is named `_transcripts` (a name no user collection can take) and its `revision` is the
highest message id indexed. Hits are joined back to the store, so a deleted conversation's messages never show,
and reading them is `conversation.read`, as for the full-text search.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select, update
from sqlalchemy.exc import IntegrityError

from callbot_core.access.permissions import Actor, require
from callbot_core.errors import InvalidInput
from callbot_core.knowledge.index import KnowledgeBase
from callbot_core.knowledge.retrieval import check_question
from callbot_core.store.models import Conversation, KnowledgeCollection, Message, Persona, PersonaVersion

TRANSCRIPTS = "_transcripts"
INDEX_BATCH = 256
MAX_LIMIT = 200
# A message is embedded for its meaning; a whole page of text says little more than its start, and costs more.
MAX_EMBED_CHARS = 2000

_index_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class SemanticHit:
    conversation_id: int
    message_id: int
    role: str
    text: str
    created_at: datetime
    persona: str
    similarity: float  # cosine similarity 0..1 to the query, higher is better


def _vector_id(message_id: int, text: str) -> str:
    return f"{message_id}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}"


def _collection(kb: KnowledgeBase) -> KnowledgeCollection:
    embedder = kb.embedder
    with kb.store.session() as session:
        row = session.scalar(select(KnowledgeCollection).where(KnowledgeCollection.name == TRANSCRIPTS))
        if row is None:
            row = KnowledgeCollection(
                name=TRANSCRIPTS,
                embedder=embedder.name,
                dimensions=embedder.dimensions,
                vector_name=f"transcripts-{secrets.token_hex(6)}",
                revision=0,
                created_by="system",
            )
            session.add(row)
            try:
                session.flush()
            except IntegrityError:
                session.rollback()
                row = session.scalar(select(KnowledgeCollection).where(KnowledgeCollection.name == TRANSCRIPTS))
        assert row is not None
        session.expunge(row)
    kb.check_embedder(row)
    kb.vectors.open_collection(row.vector_name, embedder=row.embedder, dimensions=row.dimensions)
    return row


def index_messages(kb: KnowledgeBase, progress: Callable[[int, int], None] | None = None) -> int:
    """Embed the messages stored since the last call; returns how many were added."""
    with _index_lock:  # two searches at once would embed the same new messages twice
        row = _collection(kb)
        kb.sync_vectors(row)  # another process may have indexed messages since
        with kb.store.session() as session:
            pending = session.scalar(select(Message.id).where(Message.id > row.revision).limit(1))
            if pending is None:
                return 0
            total = session.query(Message).filter(Message.id > row.revision).count()
        added = 0
        last = row.revision
        while True:
            with kb.store.session() as session:
                batch = session.execute(
                    select(Message.id, Message.text).where(Message.id > last).order_by(Message.id).limit(INDEX_BATCH)
                ).all()
            if not batch:
                break
            vectors = kb._embed([text[:MAX_EMBED_CHARS] for _, text in batch])
            kb.vectors.add(row.vector_name, [_vector_id(mid, text) for mid, text in batch], vectors)
            last = batch[-1][0]
            with kb.store.session() as session:
                session.execute(
                    update(KnowledgeCollection).where(KnowledgeCollection.id == row.id).values(revision=last)
                )
            kb.saw_revision(row.vector_name, last)
            added += len(batch)
            if progress is not None:
                progress(added, total)
        return added


def semantic_search(
    kb: KnowledgeBase,
    query: str,
    *,
    actor: Actor,
    limit: int = 20,
    progress: Callable[[int, int], None] | None = None,
) -> list[SemanticHit]:
    """Messages closest in meaning to `query`, best first."""
    require(actor, "conversation.read")
    query = check_question(query)
    if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise InvalidInput(f"limit must be a whole number from 1 to {MAX_LIMIT}, not {limit!r}")
    index_messages(kb, progress)
    row = _collection(kb)
    kb.sync_vectors(row)
    vector = kb.embedder.embed([query])[0]
    found = kb.vectors.query(row.vector_name, vector, limit * 2)
    similarity: dict[int, float] = {}
    tagged: dict[int, str] = {}
    for hit in found:
        mid, _, tag = hit.id.partition(":")
        if mid.isdigit():
            similarity.setdefault(int(mid), hit.similarity)
            tagged.setdefault(int(mid), hit.id)
    if not similarity:
        return []
    with kb.store.session() as session:
        rows = session.execute(
            select(Message.id, Message.conversation_id, Message.role, Message.text, Message.created_at, Persona.key)
            .join(Conversation, Conversation.id == Message.conversation_id)
            .join(PersonaVersion, PersonaVersion.id == Conversation.persona_version_id)
            .join(Persona, Persona.id == PersonaVersion.persona_id)
            .where(Message.id.in_(list(similarity)))
        ).all()
    # A vector whose message id now names another text (SQLite hands a deleted conversation's ids out again) is
    # left out rather than shown with a similarity that belongs to the old text.
    hits = [
        SemanticHit(r.conversation_id, r.id, r.role, r.text, r.created_at, r.key, similarity[r.id])
        for r in rows
        if tagged[r.id] == _vector_id(r.id, r.text)
    ]
    hits.sort(key=lambda h: (-h.similarity, -h.message_id))
    return hits[:limit]
