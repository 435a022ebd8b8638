"""Collections and their documents: ingest (read → chunk → embed → store), list, delete.

A document's passages live in two places: their text and provenance in SQL (`knowledge_chunks`), their vectors in
the vector store under the chunk's id. Ingesting a file is all or nothing for that file: its SQL rows are written
in one transaction that commits only after its vectors were added; if adding the vectors fails, nothing of it is
stored, and if the commit fails, the vectors just added are removed again. Vectors of a replaced version are
deleted after the commit; one left behind by a crash names no chunk and retrieval drops it.

Embeddings are cached by the hash of the text embedded (`embedding_cache`), so re-ingesting a changed file embeds
only the passages that changed. A file whose bytes and chunk settings are unchanged is skipped.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
import secrets
import threading
from array import array
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from sqlalchemy import func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callbot_core.access.audit import record
from callbot_core.access.permissions import Actor, require
from callbot_core.backends.embeddings import Embedder, get_embedder
from callbot_core.backends.vectors import EmbedderMismatch, VectorStore, get_vector_store
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.knowledge.chunking import Chunk, chunk_document
from callbot_core.knowledge.documents import FORMATS, BadDocument, Document, read_document, read_path
from callbot_core.store.models import (
    EmbeddingCache,
    KnowledgeChunk,
    KnowledgeCollection,
    KnowledgeDocument,
)

if TYPE_CHECKING:
    from callbot_core.settings import Settings
    from callbot_core.store import Store

# Lower-case letters, digits, - and _; short enough that the vector store's name (plus a suffix) stays valid.
COLLECTION_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,47}$")
EMBED_BATCH = 64  # sentence-transformers' sweet spot on 2 cores; also bounds the memory one batch takes

Progress = Callable[[int, int, str], None]  # (files done, files in all, the file now being read)

# The revision of each collection whose vectors this process last saw, by (store URL, vector collection name): a
# revision moved by another process means its vectors changed behind this process's back (see `sync_vectors`).
_seen_revisions: dict[tuple[str, str], int] = {}
_seen_lock = threading.Lock()


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    embedder: str
    dimensions: int
    documents: int
    chunks: int
    created_at: datetime
    created_by: str | None


@dataclass(frozen=True, slots=True)
class DocumentInfo:
    id: int
    collection: str
    source: str
    format: str
    size_bytes: int
    pages: int | None
    chunks: int
    chunk_size: int
    chunk_overlap: int
    content_hash: str
    ingested_at: datetime
    ingested_by: str | None


@dataclass(frozen=True, slots=True)
class IngestOutcome:
    """What happened to one file: `ingested` (new), `replaced` (changed), `unchanged` (skipped), or `refused`
    (`error` is the one line saying why; nothing of it was stored)."""

    source: str
    status: str
    chunks: int = 0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.status != "refused"


@dataclass(frozen=True, slots=True)
class SourceFile:
    """A file to ingest: its source name (as listed and cited) and either its path or its bytes."""

    source: str
    path: Path | None = None
    data: bytes | None = None


def check_collection_name(name: object) -> str:
    if not isinstance(name, str) or not COLLECTION_PATTERN.match(name):
        raise InvalidInput(
            f"A collection name is 1-48 lower-case letters, digits, - or _ (starting with a letter or digit),"
            f" not {name!r}"
        )
    return name


def files_from_paths(paths: Iterable[Path]) -> tuple[list[SourceFile], list[IngestOutcome]]:
    """The files named, folders recursed (hidden files and folders left out). A folder's files are sourced by their
    path under it and only those of a supported type are taken; a file named directly is taken whatever its type
    (ingest refuses it with the reason). Returns the files and the refusals for paths that do not exist."""
    files: list[SourceFile] = []
    missing: list[IngestOutcome] = []
    for path in paths:
        if path.is_dir():
            for item in sorted(path.rglob("*")):
                relative = item.relative_to(path)
                if any(part.startswith(".") for part in relative.parts) or not item.is_file():
                    continue
                if item.suffix.lower().lstrip(".") in FORMATS:
                    files.append(SourceFile(relative.as_posix(), path=item))
        elif path.is_file():
            files.append(SourceFile(path.name, path=path))
        else:
            missing.append(IngestOutcome(str(path), "refused", error=f"{path}: no such file or folder"))
    return files, missing


def _hash_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def embedding_text(chunk_text: str, heading: str | None) -> str:
    """What is embedded for a passage: its heading gives a short passage the context it lacks ("Saturday" alone
    says little; "Opening hours > Saturday" does)."""
    return f"{heading}\n{chunk_text}" if heading else chunk_text


def _pack(vector: Sequence[float]) -> bytes:
    return array("f", vector).tobytes()


def _unpack(blob: bytes) -> list[float]:
    values = array("f")
    values.frombytes(blob)
    return values.tolist()


class KnowledgeBase:
    """Collections of documents over one store, embedder and vector store (by default the configured ones)."""

    def __init__(
        self,
        store: Store,
        settings: Settings,
        *,
        embedder: Embedder | None = None,
        vectors: VectorStore | None = None,
    ) -> None:
        self.store = store
        self.settings = settings
        self._embedder = embedder
        self._vectors = vectors
        self._lock = threading.Lock()

    @property
    def embedder(self) -> Embedder:
        if self._embedder is None:
            self._embedder = get_embedder(settings=self.settings)
        return self._embedder

    @property
    def vectors(self) -> VectorStore:
        if self._vectors is None:
            self._vectors = get_vector_store(settings=self.settings)
        return self._vectors

    # -- collections ----------------------------------------------------------------------------------------

    def collections(self, *, actor: Actor) -> list[CollectionInfo]:
        require(actor, "knowledge.read")
        documents = (
            select(KnowledgeDocument.collection_id, func.count().label("n"), func.sum(KnowledgeDocument.chunk_count))
            .group_by(KnowledgeDocument.collection_id)
            .subquery()
        )
        query = (
            select(KnowledgeCollection, documents.c.n, documents.c[2])
            .outerjoin(documents, documents.c.collection_id == KnowledgeCollection.id)
            .order_by(KnowledgeCollection.name)
        )
        with self.store.session() as session:
            return [
                CollectionInfo(c.name, c.embedder, c.dimensions, n or 0, chunks or 0, c.created_at, c.created_by)
                for c, n, chunks in session.execute(query)
            ]

    def collection(self, name: str, *, actor: Actor) -> CollectionInfo:
        name = check_collection_name(name)
        for info in self.collections(actor=actor):
            if info.name == name:
                return info
        raise NotFound(f"Unknown knowledge collection {name!r}")

    def _collection_row(self, session: Session, name: str) -> KnowledgeCollection:
        row = session.scalar(select(KnowledgeCollection).where(KnowledgeCollection.name == name))
        if row is None:
            raise NotFound(f"Unknown knowledge collection {name!r}")
        return row

    def sync_vectors(self, collection: KnowledgeCollection) -> None:
        """Before reading a collection's vectors: if another process changed them since this one last looked, have
        the vector store see the change (an embedded Chroma keeps a stale index in memory otherwise)."""
        key = (self.store.url, collection.vector_name)
        with _seen_lock:
            seen = _seen_revisions.get(key)
            _seen_revisions[key] = collection.revision
        if seen is not None and seen != collection.revision:
            reload = getattr(self.vectors, "reload", None)
            if reload is not None:
                reload()

    def saw_revision(self, vector_name: str, revision: int) -> None:
        """This process wrote the collection up to `revision`: its own change needs no reload."""
        with _seen_lock:
            _seen_revisions[(self.store.url, vector_name)] = revision

    def check_embedder(self, collection: KnowledgeCollection) -> None:
        """Refuse a collection made by another embedder than the configured one: its vectors and the query's would
        not be comparable."""
        embedder = self.embedder
        if (collection.embedder, collection.dimensions) != (embedder.name, embedder.dimensions):
            raise EmbedderMismatch(
                f"Collection {collection.name!r} was embedded by {collection.embedder} ({collection.dimensions}"
                f" dimensions); the configured embedder is {embedder.name} ({embedder.dimensions} dimensions)."
                " Re-ingest it into a new collection, or configure its embedder."
            )

    def _open_collection(self, name: str, actor: Actor) -> KnowledgeCollection:
        """The collection's row, created (with its vector collection) on first ingest."""
        with self.store.session() as session:
            row = session.scalar(select(KnowledgeCollection).where(KnowledgeCollection.name == name))
            if row is None:
                embedder = self.embedder
                row = KnowledgeCollection(
                    name=name,
                    embedder=embedder.name,
                    dimensions=embedder.dimensions,
                    vector_name=f"{name}-{secrets.token_hex(6)}",
                    revision=0,
                    created_by=actor.username,
                )
                session.add(row)
                record(session, "knowledge.collection_create", actor=actor.username, target=name)
                try:
                    session.flush()
                except IntegrityError:
                    session.rollback()  # created by someone else just now: theirs stands
                    row = self._collection_row(session, name)
            session.expunge(row)
        self.check_embedder(row)
        self.vectors.open_collection(row.vector_name, embedder=row.embedder, dimensions=row.dimensions)
        return row

    def delete_collection(self, name: str, *, actor: Actor) -> None:
        require(actor, "knowledge.edit")
        name = check_collection_name(name)
        with self.store.session() as session:
            row = self._collection_row(session, name)
            vector_name = row.vector_name
            session.delete(row)
            record(session, "knowledge.collection_delete", actor=actor.username, target=name)
        self.vectors.drop(vector_name)

    # -- documents ------------------------------------------------------------------------------------------

    def documents(self, collection: str, *, actor: Actor) -> list[DocumentInfo]:
        require(actor, "knowledge.read")
        collection = check_collection_name(collection)
        with self.store.session() as session:
            row = self._collection_row(session, collection)
            docs = session.scalars(
                select(KnowledgeDocument)
                .where(KnowledgeDocument.collection_id == row.id)
                .order_by(KnowledgeDocument.source)
            )
            return [_document_info(collection, d) for d in docs]

    def delete_document(self, collection: str, source: str, *, actor: Actor) -> DocumentInfo:
        require(actor, "knowledge.edit")
        collection = check_collection_name(collection)
        with self.store.session() as session:
            row = self._collection_row(session, collection)
            doc = session.scalar(
                select(KnowledgeDocument).where(
                    KnowledgeDocument.collection_id == row.id, KnowledgeDocument.source == source
                )
            )
            if doc is None:
                raise NotFound(f"Collection {collection!r} has no document {source!r}")
            info = _document_info(collection, doc)
            chunk_ids = list(session.scalars(select(KnowledgeChunk.id).where(KnowledgeChunk.document_id == doc.id)))
            session.delete(doc)
            revision = _bump(session, row.id)
            record(session, "knowledge.document_delete", actor=actor.username, target=f"{collection}/{source}")
            vector_name = row.vector_name
        self.vectors.delete(vector_name, [str(i) for i in chunk_ids])
        self.saw_revision(vector_name, revision)
        return info

    def ingest(
        self,
        collection: str,
        files: Sequence[SourceFile],
        *,
        actor: Actor,
        chunk_size: int | None = None,
        overlap: int | None = None,
        progress: Progress | None = None,
    ) -> list[IngestOutcome]:
        """Ingest each file on its own: good ones are stored, bad ones refused with one line each."""
        require(actor, "knowledge.edit")
        collection = check_collection_name(collection)
        size = self.settings.knowledge_chunk_size if chunk_size is None else chunk_size
        overlap = self.settings.knowledge_chunk_overlap if overlap is None else overlap
        _check_chunking(size, overlap)
        if not files:
            raise InvalidInput("No files to ingest")
        row = self._open_collection(collection, actor)
        outcomes: list[IngestOutcome] = []
        seen: set[str] = set()
        for done, file in enumerate(files):
            if progress is not None:
                progress(done, len(files), file.source)
            if file.source in seen:
                outcomes.append(_refused(file.source, "another file of this batch has the same name"))
                continue
            seen.add(file.source)
            outcomes.append(self._ingest_one(row, file, size, overlap, actor))
        if progress is not None:
            progress(len(files), len(files), "")
        return outcomes

    def _ingest_one(
        self, collection: KnowledgeCollection, file: SourceFile, size: int, overlap: int, actor: Actor
    ) -> IngestOutcome:
        max_bytes = int(self.settings.knowledge_max_file_mb * 1024 * 1024)
        try:
            if file.path is not None:
                document = read_path(file.path, max_bytes=max_bytes)
            else:
                document = read_document(file.source.rsplit("/", 1)[-1], file.data or b"", max_bytes=max_bytes)
        except BadDocument as exc:
            return _refused(file.source, exc.reason)
        except OSError as exc:
            return _refused(file.source, f"cannot be read ({exc.strerror or exc})")
        with self.store.session() as session:
            existing = session.scalar(
                select(KnowledgeDocument).where(
                    KnowledgeDocument.collection_id == collection.id, KnowledgeDocument.source == file.source
                )
            )
            if existing is not None and (existing.content_hash, existing.chunk_size, existing.chunk_overlap) == (
                document.content_hash,
                size,
                overlap,
            ):
                return IngestOutcome(file.source, "unchanged", existing.chunk_count)
        chunks = list(chunk_document(document, size=size, overlap=overlap))
        if not chunks:
            return _refused(file.source, "no text found")
        vectors = self._embed([embedding_text(c.text, c.heading) for c in chunks])
        size_bytes = file.path.stat().st_size if file.path is not None else len(file.data or b"")
        return self._store(collection, file.source, document, size_bytes, chunks, vectors, size, overlap, actor)

    def _store(
        self,
        collection: KnowledgeCollection,
        source: str,
        document: Document,
        size_bytes: int,
        chunks: list[Chunk],
        vectors: list[list[float]],
        size: int,
        overlap: int,
        actor: Actor,
    ) -> IngestOutcome:
        added: list[str] = []
        old_ids: list[int] = []
        try:
            with self.store.session() as session:
                existing = session.scalar(
                    select(KnowledgeDocument).where(
                        KnowledgeDocument.collection_id == collection.id, KnowledgeDocument.source == source
                    )
                )
                status = "ingested"
                if existing is not None:
                    status = "replaced"
                    old_ids = list(
                        session.scalars(select(KnowledgeChunk.id).where(KnowledgeChunk.document_id == existing.id))
                    )
                    session.delete(existing)
                    session.flush()
                pages = [s.page for s in document.sections if s.page is not None]
                doc = KnowledgeDocument(
                    collection_id=collection.id,
                    source=source,
                    format=document.format,
                    content_hash=document.content_hash,
                    size_bytes=size_bytes,
                    pages=max(pages) if pages else None,
                    chunk_count=len(chunks),
                    chunk_size=size,
                    chunk_overlap=overlap,
                    ingested_by=actor.username,
                )
                session.add(doc)
                session.flush()
                rows = [
                    KnowledgeChunk(
                        document_id=doc.id,
                        collection_id=collection.id,
                        position=chunk.position,
                        text=chunk.text,
                        page=chunk.page,
                        heading=chunk.heading[:500] if chunk.heading else None,
                        content_hash=_hash_text(embedding_text(chunk.text, chunk.heading)),
                    )
                    for chunk in chunks
                ]
                session.add_all(rows)
                session.flush()
                revision = _bump(session, collection.id)
                record(
                    session,
                    "knowledge.ingest",
                    actor=actor.username,
                    target=f"{collection.name}/{source}",
                    detail={"status": status, "chunks": len(rows), "content_hash": document.content_hash},
                )
                ids = [str(r.id) for r in rows]
                self.vectors.add(collection.vector_name, ids, vectors)
                added = ids
            # committed
        except IntegrityError:
            self._forget(collection.vector_name, added)
            # Another ingest of the same source committed first: theirs stands.
            raise Conflict(f"{source}: ingested by someone else at the same time; try again") from None
        except BaseException:
            self._forget(collection.vector_name, added)
            raise
        if old_ids:
            self._forget(collection.vector_name, [str(i) for i in old_ids])
        self.saw_revision(collection.vector_name, revision)
        return IngestOutcome(source, status, len(chunks))

    def _forget(self, vector_name: str, ids: list[str]) -> None:
        if not ids:
            return
        with contextlib.suppress(Exception):  # leftover vectors name no chunk; retrieval drops them
            self.vectors.delete(vector_name, ids)

    def _embed(self, texts: list[str]) -> list[list[float]]:
        """Vectors for `texts`, from the cache where it has them; the rest embedded in batches and cached."""
        embedder = self.embedder
        hashes = [_hash_text(t) for t in texts]
        cached: dict[str, list[float]] = {}
        unique = list(dict.fromkeys(hashes))
        with self.store.session() as session:
            for start in range(0, len(unique), 500):  # bounded IN lists
                batch = unique[start : start + 500]
                for content_hash, blob in session.execute(
                    select(EmbeddingCache.content_hash, EmbeddingCache.vector).where(
                        EmbeddingCache.embedder == embedder.name, EmbeddingCache.content_hash.in_(batch)
                    )
                ):
                    cached[content_hash] = _unpack(blob)
        missing = [(h, t) for h, t in zip(hashes, texts, strict=True) if h not in cached]
        missing = list({h: (h, t) for h, t in missing}.values())
        for start in range(0, len(missing), EMBED_BATCH):
            batch = missing[start : start + EMBED_BATCH]
            fresh = embedder.embed([t for _, t in batch])
            rows = []
            for (content_hash, _), vector in zip(batch, fresh, strict=True):
                cached[content_hash] = vector
                rows.append({"embedder": embedder.name, "content_hash": content_hash, "vector": _pack(vector)})
            self._cache(rows)
        return [cached[h] for h in hashes]

    def _cache(self, rows: list[dict[str, object]]) -> None:
        """Store new vectors in one statement; rows another ingest stored meanwhile are skipped (same text, same
        vector), so a race costs nothing."""
        if not rows:
            return
        table = EmbeddingCache.__table__
        if self.store.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            statement = pg_insert(table).on_conflict_do_nothing()
        else:
            statement = table.insert().prefix_with("OR IGNORE")
        with self.store.session() as session:
            session.execute(statement, rows)


def _check_chunking(size: object, overlap: object) -> None:
    if isinstance(size, bool) or not isinstance(size, int) or not 100 <= size <= 20_000:
        raise InvalidInput(f"chunk size must be a whole number of characters from 100 to 20000, not {size!r}")
    if isinstance(overlap, bool) or not isinstance(overlap, int) or not 0 <= overlap < size:
        raise InvalidInput(f"overlap must be a whole number from 0 to below the chunk size ({size}), not {overlap!r}")


def _refused(source: str, reason: str) -> IngestOutcome:
    return IngestOutcome(source, "refused", error=f"{source}: {reason}")


def _bump(session: Session, collection_id: int) -> int:
    """Move the collection's revision (in the caller's transaction); returns the new one."""
    session.execute(
        update(KnowledgeCollection)
        .where(KnowledgeCollection.id == collection_id)
        .values(revision=KnowledgeCollection.revision + 1)
    )
    return int(session.scalar(select(KnowledgeCollection.revision).where(KnowledgeCollection.id == collection_id)))


def _document_info(collection: str, d: KnowledgeDocument) -> DocumentInfo:
    return DocumentInfo(
        id=d.id,
        collection=collection,
        source=d.source,
        format=d.format,
        size_bytes=d.size_bytes,
        pages=d.pages,
        chunks=d.chunk_count,
        chunk_size=d.chunk_size,
        chunk_overlap=d.chunk_overlap,
        content_hash=d.content_hash,
        ingested_at=d.ingested_at,
        ingested_by=d.ingested_by,
    )
