"""Ingest: collections, documents, skip and replace, bad files store nothing, the embedding cache, permissions."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.backends.vectors import EmbedderMismatch
from callbot_core.errors import InvalidInput, NotFound, PermissionDenied
from callbot_core.knowledge.index import KnowledgeBase, SourceFile, files_from_paths
from callbot_core.store.models import AuditLog, EmbeddingCache, KnowledgeChunk, KnowledgeDocument
from tests.knowledge.conftest import CLINIC_TEXTS, text_file

VIEWER = OperatorActor(username="vera", role="viewer")


def _count(kb: KnowledgeBase, model: type) -> int:
    with kb.store.session() as session:
        return session.scalar(select(func.count()).select_from(model)) or 0


def test_ingest_lists_documents_with_their_passages(clinic: KnowledgeBase) -> None:
    docs = {d.source: d for d in clinic.documents("clinic", actor=LOCAL_OPERATOR)}
    assert sorted(docs) == ["fees.txt", "hours.md", "parking.txt"]
    assert docs["hours.md"].format == "md" and docs["hours.md"].chunks >= 2  # one per heading section at least
    assert docs["fees.txt"].size_bytes == len(CLINIC_TEXTS["fees.txt"].encode())
    [info] = clinic.collections(actor=LOCAL_OPERATOR)
    assert (info.name, info.embedder, info.dimensions, info.documents) == ("clinic", "test-bow", 256, 3)
    assert info.chunks == sum(d.chunks for d in docs.values()) == _count(clinic, KnowledgeChunk)
    # Every passage has its vector under its chunk id.
    assert clinic.vectors.count(_vector_name(clinic)) == info.chunks


def _vector_name(kb: KnowledgeBase, name: str = "clinic") -> str:
    from callbot_core.store.models import KnowledgeCollection

    with kb.store.session() as session:
        return session.scalar(select(KnowledgeCollection.vector_name).where(KnowledgeCollection.name == name))


def test_headings_and_positions_are_kept(clinic: KnowledgeBase) -> None:
    with clinic.store.session() as session:
        rows = session.execute(
            select(KnowledgeChunk.heading, KnowledgeChunk.position, KnowledgeChunk.text)
            .join(KnowledgeDocument)
            .where(KnowledgeDocument.source == "hours.md")
            .order_by(KnowledgeChunk.position)
        ).all()
    assert [r.position for r in rows] == list(range(len(rows)))
    saturday = next(r for r in rows if "Saturday the clinic" in r.text)
    assert saturday.heading == "Opening hours > Saturday"


def test_unchanged_file_is_skipped_and_changed_file_replaced(clinic: KnowledgeBase, bow) -> None:  # noqa: ANN001
    before = _count(clinic, KnowledgeChunk)
    calls = len(bow.calls)
    [again] = clinic.ingest("clinic", [text_file("fees.txt", CLINIC_TEXTS["fees.txt"])], actor=LOCAL_OPERATOR)
    assert again.status == "unchanged" and len(bow.calls) == calls  # nothing read into the model
    assert _count(clinic, KnowledgeChunk) == before

    changed = CLINIC_TEXTS["fees.txt"].replace("80 euros", "95 euros")
    [replaced] = clinic.ingest("clinic", [text_file("fees.txt", changed)], actor=LOCAL_OPERATOR)
    assert replaced.status == "replaced"
    with clinic.store.session() as session:
        texts = " ".join(session.scalars(select(KnowledgeChunk.text)))
        assert session.scalar(select(func.count()).select_from(KnowledgeDocument)) == 3
    assert "95 euros" in texts and "80 euros" not in texts
    assert _count(clinic, KnowledgeChunk) == before
    # The old passages' vectors went with them.
    assert clinic.vectors.count(_vector_name(clinic)) == before


def test_changed_chunk_settings_reingest(clinic: KnowledgeBase) -> None:
    [outcome] = clinic.ingest(
        "clinic", [text_file("fees.txt", CLINIC_TEXTS["fees.txt"])], actor=LOCAL_OPERATOR, chunk_size=100, overlap=10
    )
    assert outcome.status == "replaced" and outcome.chunks >= 2


def test_embedding_cache_embeds_only_new_passages(kb: KnowledgeBase, bow) -> None:  # noqa: ANN001
    paragraphs = [f"Paragraph {i} about topic number {i} of the clinic handbook." for i in range(6)]
    kb.ingest("hb", [text_file("a.txt", "\n\n".join(paragraphs))], actor=LOCAL_OPERATOR, chunk_size=100, overlap=0)
    cached = _count(kb, EmbeddingCache)
    assert cached >= 6
    bow.calls.clear()
    paragraphs[2] = "A rewritten second paragraph, entirely new words here."
    kb.ingest("hb", [text_file("a.txt", "\n\n".join(paragraphs))], actor=LOCAL_OPERATOR, chunk_size=100, overlap=0)
    assert sum(bow.calls) == 1  # only the changed passage was embedded
    assert _count(kb, EmbeddingCache) == cached + 1


def test_bad_files_are_refused_one_line_each_and_store_nothing(kb: KnowledgeBase) -> None:
    files = [
        SourceFile("empty.txt", data=b""),
        SourceFile("photo.pdf", data=b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 64),
        SourceFile("word.docx", data=b"PK\x03\x04" + b"\x00" * 40),
        SourceFile("noise.txt", data=bytes(range(256)) * 8),
        SourceFile("good.txt", data=b"The pharmacy next door opens at nine."),
        SourceFile("notes.xyz", data=b"hello"),
    ]
    outcomes = kb.ingest("mixed", files, actor=LOCAL_OPERATOR)
    by_source = {o.source: o for o in outcomes}
    assert by_source["good.txt"].status == "ingested"
    refused = [o for o in outcomes if o.status == "refused"]
    assert {o.source for o in refused} == {"empty.txt", "photo.pdf", "word.docx", "noise.txt", "notes.xyz"}
    for o in refused:
        assert o.error and o.error.startswith(f"{o.source}: ") and "\n" not in o.error and "Traceback" not in o.error
    assert "empty" in by_source["empty.txt"].error
    assert "JPEG" in by_source["photo.pdf"].error
    docs = kb.documents("mixed", actor=LOCAL_OPERATOR)
    assert [d.source for d in docs] == ["good.txt"]


def test_size_limit(kb: KnowledgeBase) -> None:
    kb.settings = kb.settings.model_copy(update={"knowledge_max_file_mb": 0.001})
    [outcome] = kb.ingest("big", [SourceFile("big.txt", data=b"word " * 1000)], actor=LOCAL_OPERATOR)
    assert outcome.status == "refused" and "too large" in (outcome.error or "")


def test_nothing_half_stored_when_the_vector_store_fails(kb: KnowledgeBase, monkeypatch: pytest.MonkeyPatch) -> None:
    kb.ingest("c", [text_file("one.txt", "First document text here.")], actor=LOCAL_OPERATOR)
    chunks = _count(kb, KnowledgeChunk)

    def broken(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(kb.vectors, "add", broken)
    with pytest.raises(OSError, match="disk full"):
        kb.ingest("c", [text_file("two.txt", "Second document text here.")], actor=LOCAL_OPERATOR)
    assert [d.source for d in kb.documents("c", actor=LOCAL_OPERATOR)] == ["one.txt"]
    assert _count(kb, KnowledgeChunk) == chunks


def test_delete_document_and_collection(clinic: KnowledgeBase) -> None:
    deleted = clinic.delete_document("clinic", "parking.txt", actor=LOCAL_OPERATOR)
    assert deleted.source == "parking.txt"
    assert [d.source for d in clinic.documents("clinic", actor=LOCAL_OPERATOR)] == ["fees.txt", "hours.md"]
    assert clinic.vectors.count(_vector_name(clinic)) == _count(clinic, KnowledgeChunk)
    with pytest.raises(NotFound, match="no document 'parking.txt'"):
        clinic.delete_document("clinic", "parking.txt", actor=LOCAL_OPERATOR)
    vector_name = _vector_name(clinic)
    clinic.delete_collection("clinic", actor=LOCAL_OPERATOR)
    assert clinic.collections(actor=LOCAL_OPERATOR) == []
    assert vector_name not in clinic.vectors.collections()
    assert _count(clinic, KnowledgeChunk) == 0
    with clinic.store.session() as session:
        actions = set(session.scalars(select(AuditLog.action).where(AuditLog.action.startswith("knowledge."))))
    assert {"knowledge.ingest", "knowledge.document_delete", "knowledge.collection_delete"} <= actions


def test_permissions_are_the_engines(clinic: KnowledgeBase) -> None:
    assert [d.source for d in clinic.documents("clinic", actor=VIEWER)]  # viewers read
    with pytest.raises(PermissionDenied, match="may not ingest or delete knowledge documents"):
        clinic.ingest("clinic", [text_file("x.txt", "text")], actor=VIEWER)
    with pytest.raises(PermissionDenied):
        clinic.delete_document("clinic", "fees.txt", actor=VIEWER)


@pytest.mark.parametrize("name", ["", "Clinic", "a b", "-x", "x" * 49, "../etc", "_transcripts", 3])
def test_bad_collection_names(kb: KnowledgeBase, name: object) -> None:
    with pytest.raises(InvalidInput, match="collection name"):
        kb.ingest(name, [text_file("a.txt", "text")], actor=LOCAL_OPERATOR)  # type: ignore[arg-type]


@pytest.mark.parametrize(("size", "overlap", "message"), [(50, 0, "chunk size"), (500, 500, "overlap"),
                                                          (500, -1, "overlap"), ("500", 0, "chunk size")])  # fmt: skip
def test_bad_chunk_settings(kb: KnowledgeBase, size: object, overlap: object, message: str) -> None:
    with pytest.raises(InvalidInput, match=message):
        kb.ingest("c", [text_file("a.txt", "text")], actor=LOCAL_OPERATOR, chunk_size=size, overlap=overlap)  # type: ignore[arg-type]


def test_a_collection_refuses_another_embedder(clinic: KnowledgeBase) -> None:
    other = KnowledgeBase(clinic.store, clinic.settings.model_copy(update={"embedder": "minilm"}))

    class Other:
        name, dimensions = "other", 8

        def embed(self, texts):  # type: ignore[no-untyped-def]
            return [[1.0] * 8 for _ in texts]

    other._embedder = Other()
    with pytest.raises(EmbedderMismatch, match="embedded by test-bow .256 dimensions.*other .8 dimensions"):
        other.ingest("clinic", [text_file("x.txt", "text")], actor=LOCAL_OPERATOR)


def test_files_from_paths_recurses_folders(tmp_path: Path) -> None:
    (tmp_path / "docs" / "sub").mkdir(parents=True)
    (tmp_path / "docs" / "a.md").write_text("# A\n\ntext")
    (tmp_path / "docs" / "sub" / "b.txt").write_text("text")
    (tmp_path / "docs" / "sub" / "image.png").write_bytes(b"\x89PNG")
    (tmp_path / "docs" / ".hidden.txt").write_text("secret")
    (tmp_path / "c.pdf").write_bytes(b"%PDF-1.4")
    files, missing = files_from_paths([tmp_path / "docs", tmp_path / "c.pdf", tmp_path / "nope"])
    assert [f.source for f in files] == ["a.md", "sub/b.txt", "c.pdf"]
    assert len(missing) == 1 and "no such file" in (missing[0].error or "")


def test_a_chroma_server_holds_the_vectors_when_configured(store, kb_settings, bow, chroma_url: str) -> None:  # noqa: ANN001
    from callbot_core.knowledge.retrieval import search

    kb = KnowledgeBase(store, kb_settings.model_copy(update={"chroma_url": chroma_url}))
    assert kb.vectors.where == chroma_url
    kb.ingest("served", [text_file(n, t) for n, t in CLINIC_TEXTS.items()], actor=LOCAL_OPERATOR)
    assert kb.vectors.count(_vector_name(kb, "served")) == _count(kb, KnowledgeChunk)
    assert search(kb, "served", "Is the clinic open on Saturday?", k=1).hits[0].source == "hours.md"
    kb.delete_collection("served", actor=LOCAL_OPERATOR)
    assert all(not name.startswith("served-") for name in kb.vectors.collections())
