"""Hybrid retrieval: keyword (BM25) and vector results fused by reciprocal rank.

Each ranking finds what the other misses: BM25 the exact words (a fee's name, a doctor's surname), vectors the
meaning ("can I come on the weekend?" → Saturday hours). Reciprocal rank fusion adds 1 / (60 + rank) from each
list, so neither list's raw scores, which are not comparable, decide alone.

Every hit carries its cosine similarity to the question (0–1, higher is better), also when only BM25 found it (its
vector comes from the embedding cache). The best similarity decides `low_relevance`: under the threshold, the
documents probably do not answer the question.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import select

from callbot_core.access.permissions import Actor, require
from callbot_core.errors import InvalidInput
from callbot_core.knowledge.index import KnowledgeBase, _unpack, check_collection_name
from callbot_core.store.models import EmbeddingCache, KnowledgeChunk, KnowledgeCollection, KnowledgeDocument

if TYPE_CHECKING:
    from callbot_core.store import Store

RRF_K = 60  # the constant of the original paper (Cormack et al. 2009); larger flattens the rank differences
MAX_K = 50
MAX_QUESTION_CHARS = 2000


@dataclass(frozen=True, slots=True)
class Hit:
    chunk_id: int
    source: str
    page: int | None
    heading: str | None
    text: str
    similarity: float | None  # cosine similarity 0..1 to the question; None when its vector is unknown
    rank: int  # 1 = best, after fusion
    vector_rank: int | None  # its place in each ranking (None: not in that one's candidates)
    keyword_rank: int | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "page": self.page,
            "heading": self.heading,
            "chunk_id": self.chunk_id,
            "similarity": None if self.similarity is None else round(self.similarity, 4),
            "rank": self.rank,
            "text": self.text,
        }


@dataclass(frozen=True, slots=True)
class Retrieval:
    collection: str
    question: str
    hits: list[Hit]
    best_similarity: float | None
    threshold: float
    low_relevance: bool

    def as_dict(self) -> dict[str, Any]:
        return {
            "collection": self.collection,
            "hits": [h.as_dict() for h in self.hits],
            "best_similarity": None if self.best_similarity is None else round(self.best_similarity, 4),
            "threshold": self.threshold,
            "low_relevance": self.low_relevance,
        }


# -- the keyword index --------------------------------------------------------------------------------------


class _KeywordIndex:
    """BM25 over one revision of a collection's chunks, built in memory on first use and when the revision moves."""

    def __init__(self, chunk_ids: list[int], texts: list[str]) -> None:
        import bm25s  # imported here: scipy and numpy are not needed by most commands

        self.chunk_ids = chunk_ids
        self._bm25: Any = None
        if texts:
            tokens = bm25s.tokenize(texts, stopwords="en", show_progress=False)
            self._bm25 = bm25s.BM25()
            self._bm25.index(tokens, show_progress=False)

    def search(self, question: str, k: int) -> list[int]:
        """Chunk ids best first; only chunks sharing a word with the question."""
        if self._bm25 is None:
            return []
        import bm25s

        words = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
        vocab = self._bm25.vocab_dict
        words = [w for w in words if w in vocab]
        if not words:
            return []
        import numpy as np

        # Scored here rather than by bm25s' retrieve(): that partitions all the scores, most of them exactly 0, which
        # took ~3 ms of a ~25 ms query at 100,000 passages; only the chunks sharing a word need ranking.
        scores = self._bm25.get_scores(words)
        found = np.flatnonzero(scores > 0)
        if len(found) > k:
            found = found[np.argpartition(scores[found], -k)[-k:]]
        best = found[np.argsort(-scores[found], kind="stable")]
        return [self.chunk_ids[int(i)] for i in best]


# By store and the collection's vector name, which is never reused: SQLite hands a deleted collection's id out again.
_indexes: dict[tuple[str, str], tuple[int, _KeywordIndex]] = {}
_indexes_lock = threading.Lock()  # guards the dict only
_build_locks: dict[tuple[str, str], threading.Lock] = {}


def keyword_index(store: Store, collection: KnowledgeCollection) -> _KeywordIndex:
    """The collection's BM25 index at its current revision. Building one takes seconds at 100,000 passages, so it is
    built under a lock of the collection's own: searches of other collections go on, and searches of this one keep
    the index they had (an older revision) until the new one is ready, rather than all waiting."""
    key = (store.url, collection.vector_name)
    with _indexes_lock:
        cached = _indexes.get(key)
        build_lock = _build_locks.setdefault(key, threading.Lock())
    if cached is not None and cached[0] == collection.revision:
        return cached[1]
    if cached is not None and not build_lock.acquire(blocking=False):
        return cached[1]  # another thread is building the new revision's index
    if cached is None:
        build_lock.acquire()
    try:
        with _indexes_lock:
            cached = _indexes.get(key)
        if cached is not None and cached[0] == collection.revision:
            return cached[1]
        with store.session() as session:
            rows = session.execute(
                select(KnowledgeChunk.id, KnowledgeChunk.heading, KnowledgeChunk.text)
                .where(KnowledgeChunk.collection_id == collection.id)
                .order_by(KnowledgeChunk.id)
            ).all()
        index = _KeywordIndex([r.id for r in rows], [f"{r.heading or ''}\n{r.text}" for r in rows])
        with _indexes_lock:
            _indexes[key] = (collection.revision, index)
        return index
    finally:
        build_lock.release()


# -- search ---------------------------------------------------------------------------------------------------


def _cosine(a: Sequence[float], b: Sequence[float]) -> float:
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norm = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(0.0, min(1.0, dot / norm)) if norm else 0.0


def check_question(question: object) -> str:
    if not isinstance(question, str) or not question.strip():
        raise InvalidInput("The question is empty")
    question = question.strip()
    if len(question) > MAX_QUESTION_CHARS:
        raise InvalidInput(f"The question is {len(question)} characters; the limit is {MAX_QUESTION_CHARS}")
    return question


def check_k(k: object) -> int:
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= MAX_K:
        raise InvalidInput(f"k must be a whole number from 1 to {MAX_K}, not {k!r}")
    return k


def check_threshold(threshold: object) -> float:
    if isinstance(threshold, bool) or not isinstance(threshold, int | float) or not 0 <= threshold <= 1:
        raise InvalidInput(f"The relevance threshold must be a number from 0 to 1, not {threshold!r}")
    return float(threshold)


def search(
    kb: KnowledgeBase,
    collection: str,
    question: str,
    *,
    k: int = 5,
    threshold: float | None = None,
    actor: Actor | None = None,
) -> Retrieval:
    """The `k` best passages of `collection` for `question`. `actor` None: the caller checked permission already
    (a turn's retrieval runs under the chat permission)."""
    if actor is not None:
        require(actor, "knowledge.read")
    collection = check_collection_name(collection)
    question = check_question(question)
    k = check_k(k)
    threshold = check_threshold(kb.settings.knowledge_low_relevance if threshold is None else threshold)
    store = kb.store
    with store.session() as session:
        row = kb._collection_row(session, collection)
        session.expunge(row)
    kb.check_embedder(row)
    kb.sync_vectors(row)
    candidates = max(k * 4, 20)
    query_vector = kb.embedder.embed([question])[0]
    vector_hits = kb.vectors.query(row.vector_name, query_vector, candidates)
    keyword_ids = keyword_index(store, row).search(question, candidates)

    vector_rank: dict[int, int] = {}
    similarity: dict[int, float] = {}
    for position, hit in enumerate(vector_hits, start=1):
        try:
            chunk_id = int(hit.id)
        except ValueError:
            continue
        vector_rank.setdefault(chunk_id, position)
        similarity.setdefault(chunk_id, hit.similarity)
    keyword_rank = {chunk_id: position for position, chunk_id in enumerate(keyword_ids, start=1)}
    fused: dict[int, float] = {}
    for ranks in (vector_rank, keyword_rank):
        for chunk_id, position in ranks.items():
            fused[chunk_id] = fused.get(chunk_id, 0.0) + 1.0 / (RRF_K + position)
    order = sorted(fused, key=lambda c: (-fused[c], c))

    hits: list[Hit] = []
    with store.session() as session:
        # Fetch a few more than k: a vector left behind by a crash names no chunk and is dropped here.
        wanted = order[: k * 2]
        rows = {
            r.id: r
            for r in session.execute(
                select(
                    KnowledgeChunk.id,
                    KnowledgeChunk.text,
                    KnowledgeChunk.page,
                    KnowledgeChunk.heading,
                    KnowledgeChunk.content_hash,
                    KnowledgeDocument.source,
                )
                .join(KnowledgeDocument, KnowledgeDocument.id == KnowledgeChunk.document_id)
                .where(KnowledgeChunk.id.in_(wanted), KnowledgeChunk.collection_id == row.id)
            )
        }
        kept = [c for c in wanted if c in rows][:k]
        # Keyword-only hits: their similarity from the cached vector of the text that was embedded.
        unknown = {rows[c].content_hash: c for c in kept if c not in similarity}
        if unknown:
            for content_hash, blob in session.execute(
                select(EmbeddingCache.content_hash, EmbeddingCache.vector).where(
                    EmbeddingCache.embedder == row.embedder, EmbeddingCache.content_hash.in_(list(unknown))
                )
            ):
                similarity[unknown[content_hash]] = _cosine(query_vector, _unpack(blob))
    for rank, chunk_id in enumerate(kept, start=1):
        r = rows[chunk_id]
        hits.append(
            Hit(
                chunk_id=chunk_id,
                source=r.source,
                page=r.page,
                heading=r.heading,
                text=r.text,
                similarity=similarity.get(chunk_id),
                rank=rank,
                vector_rank=vector_rank.get(chunk_id),
                keyword_rank=keyword_rank.get(chunk_id),
            )
        )
    known = [h.similarity for h in hits if h.similarity is not None]
    best = max(known) if known else None
    return Retrieval(
        collection=collection,
        question=question,
        hits=hits,
        best_similarity=best,
        threshold=threshold,
        low_relevance=best is None or best < threshold,
    )
