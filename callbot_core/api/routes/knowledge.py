"""Knowledge: collections, their documents (upload, list, delete), search, and retrieval evaluations.

Uploads are multipart/form-data (`files`, one or more), with a body limit of their own (CALLBOT_API_MAX_UPLOAD_BYTES).
Each file is ingested on its own: the answer lists every file's outcome; when every file was refused it is a 422
naming each one. Permissions are the engine's: reading is `knowledge.read`, changing `knowledge.edit`, evaluating
`knowledge.eval`.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Body, File, Path, Query, UploadFile
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, Field

from callbot_core.api.auth import Context, CurrentActor
from callbot_core.api.errors import ERROR_RESPONSES, ErrorBody
from callbot_core.api.routes.conversations import PlainText
from callbot_core.errors import InvalidInput
from callbot_core.knowledge.evaluation import EvalQuestion, evaluate, list_evals
from callbot_core.knowledge.index import KnowledgeBase, SourceFile
from callbot_core.knowledge.retrieval import MAX_K, MAX_QUESTION_CHARS, search

router = APIRouter(tags=["knowledge"], responses=ERROR_RESPONSES)

# Document uploads: the request-size middleware gives these paths the upload limit.
UPLOAD_PATHS = re.compile(r"^/v1/knowledge/[^/]+/documents/?$")
NOT_FOUND = {404: {"model": ErrorBody, "description": "No such collection or document"}}

CollectionName = Annotated[
    str,
    Path(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$", description="A collection name", examples=["clinic"]),
]


def _kb(ctx: Any) -> KnowledgeBase:
    return KnowledgeBase(ctx.store, ctx.settings)


class CollectionOut(BaseModel):
    name: str
    embedder: str
    dimensions: int
    documents: int
    chunks: int = Field(description="Passages in all")
    created_at: datetime
    created_by: str | None


class DocumentOut(BaseModel):
    source: str = Field(description="The file's name (its path under the folder ingested)")
    format: str
    size_bytes: int
    pages: int | None
    chunks: int
    chunk_size: int
    chunk_overlap: int
    content_hash: str
    ingested_at: datetime
    ingested_by: str | None


class OutcomeOut(BaseModel):
    source: str
    status: str = Field(description="ingested, replaced, unchanged or refused")
    chunks: int
    error: str | None = Field(description="Why a refused file was refused (one line naming it)")


class IngestOut(BaseModel):
    collection: str
    files: list[OutcomeOut]
    refused: int


class HitOut(BaseModel):
    source: str
    page: int | None
    heading: str | None
    chunk_id: int
    similarity: float | None = Field(description="Cosine similarity to the question, 0-1, higher is better")
    rank: int = Field(description="1 = best, after fusing keyword and vector ranks")
    text: str


class SearchIn(BaseModel):
    question: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 5
    threshold: Annotated[float | None, Field(ge=0, le=1, description="Low-relevance threshold")] = None


class SearchOut(BaseModel):
    collection: str
    hits: list[HitOut]
    best_similarity: float | None
    threshold: float
    low_relevance: bool = Field(description="The best similarity is under the threshold: probably not answered")


class QuestionIn(BaseModel):
    question: Annotated[str, Field(min_length=1, max_length=MAX_QUESTION_CHARS)]
    expected_sources: list[Annotated[str, Field(min_length=1, max_length=500)]] = Field(
        default_factory=list, description="File names that answer it; empty for a question the documents do not"
    )


class EvalIn(BaseModel):
    questions: Annotated[list[QuestionIn], Field(min_length=1, max_length=5000)]
    k: Annotated[int, Field(ge=1, le=MAX_K)] = 5
    threshold: Annotated[float | None, Field(ge=0, le=1)] = None
    name: Annotated[str, Field(min_length=1, max_length=200)] = "api"


class EvalOut(BaseModel):
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


@router.get("/v1/knowledge", response_model=list[CollectionOut])
async def list_collections(ctx: Context, actor: CurrentActor) -> list[CollectionOut]:
    """Every collection with its embedder and size."""
    found = await run_in_threadpool(lambda: _kb(ctx).collections(actor=actor))
    return [CollectionOut(**{f: getattr(c, f) for f in CollectionOut.model_fields}) for c in found]


@router.delete("/v1/knowledge/{collection}", status_code=204, responses=NOT_FOUND)
async def delete_collection(collection: CollectionName, ctx: Context, actor: CurrentActor) -> None:
    """Delete a collection, its documents and its vectors."""
    await run_in_threadpool(lambda: _kb(ctx).delete_collection(collection, actor=actor))


@router.get("/v1/knowledge/{collection}/documents", response_model=list[DocumentOut], responses=NOT_FOUND)
async def list_documents(collection: CollectionName, ctx: Context, actor: CurrentActor) -> list[DocumentOut]:
    """The documents of a collection, by source name."""
    docs = await run_in_threadpool(lambda: _kb(ctx).documents(collection, actor=actor))
    return [DocumentOut(chunks=d.chunks, **{f: getattr(d, f) for f in DocumentOut.model_fields if f != "chunks"})
            for d in docs]  # fmt: skip


@router.post("/v1/knowledge/{collection}/documents", response_model=IngestOut)
async def upload_documents(
    collection: CollectionName,
    ctx: Context,
    actor: CurrentActor,
    files: Annotated[list[UploadFile], File(description="One or more files: txt, md, html, pdf, docx, csv")],
    chunk_size: Annotated[int | None, Query(ge=100, le=20_000, description="Characters per passage")] = None,
    overlap: Annotated[int | None, Query(ge=0, le=5_000, description="Characters repeated between passages")] = None,
) -> IngestOut:
    """Ingest uploaded files into the collection (created on first use). A changed file replaces its passages, an
    unchanged one is skipped; a bad one is refused with the reason and stores nothing."""
    limit = int(ctx.settings.knowledge_max_file_mb * 1024 * 1024)
    sources: list[SourceFile] = []
    refused: list[OutcomeOut] = []
    for upload in files:
        name = (upload.filename or "").replace("\\", "/").rsplit("/", 1)[-1].strip()
        if not name or "\x00" in name:
            raise InvalidInput("Every uploaded file needs a file name")
        # Read one byte over the limit, not the whole file: the engine names the size, and memory stays bounded.
        data = await upload.read(limit + 1)
        if len(data) > limit:
            size = upload.size if upload.size is not None else len(data)
            refused.append(OutcomeOut(source=name, status="refused", chunks=0,
                                      error=f"{name}: too large ({size / 1048576:.1f} MB; the limit is"
                                            f" {ctx.settings.knowledge_max_file_mb:g} MB)"))  # fmt: skip
            continue
        sources.append(SourceFile(name, data=data))
    outcomes = []
    if sources:
        done = await run_in_threadpool(
            lambda: _kb(ctx).ingest(collection, sources, actor=actor, chunk_size=chunk_size, overlap=overlap)
        )
        outcomes = [OutcomeOut(source=o.source, status=o.status, chunks=o.chunks, error=o.error) for o in done]
    outcomes = refused + outcomes
    bad = [o for o in outcomes if o.status == "refused"]
    if bad and len(bad) == len(outcomes):
        raise InvalidInput("; ".join(o.error or o.source for o in bad))
    return IngestOut(collection=collection, files=outcomes, refused=len(bad))


@router.delete("/v1/knowledge/{collection}/documents/{source:path}", response_model=DocumentOut, responses=NOT_FOUND)
async def delete_document(
    collection: CollectionName,
    source: Annotated[PlainText, Path(min_length=1, max_length=500)],
    ctx: Context,
    actor: CurrentActor,
) -> DocumentOut:
    """Delete one document (by source name) and its passages."""
    d = await run_in_threadpool(lambda: _kb(ctx).delete_document(collection, source, actor=actor))
    return DocumentOut(chunks=d.chunks, **{f: getattr(d, f) for f in DocumentOut.model_fields if f != "chunks"})


@router.post("/v1/knowledge/{collection}/search", response_model=SearchOut, responses=NOT_FOUND)
async def search_collection(
    collection: CollectionName,
    ctx: Context,
    actor: CurrentActor,
    body: Annotated[SearchIn, Body(examples=[{"question": "Are you open on Saturday?", "k": 5}])],
) -> SearchOut:
    """The passages that best answer the question: keyword and vector ranks fused, each with its similarity."""
    result = await run_in_threadpool(
        lambda: search(_kb(ctx), collection, body.question, k=body.k, threshold=body.threshold, actor=actor)
    )
    return SearchOut.model_validate(result.as_dict())


@router.post("/v1/knowledge/{collection}/evals", response_model=EvalOut, status_code=201, responses=NOT_FOUND)
async def run_eval(collection: CollectionName, ctx: Context, actor: CurrentActor, body: EvalIn) -> EvalOut:
    """Score retrieval on a question set (recall@k, MRR, unanswerable questions flagged) and store the run."""
    questions = [EvalQuestion(q.question.strip(), tuple(s.strip() for s in q.expected_sources)) for q in body.questions]
    run = await run_in_threadpool(
        lambda: evaluate(_kb(ctx), collection, questions, actor=actor, k=body.k, threshold=body.threshold,
                         questions_file=body.name)
    )  # fmt: skip
    return EvalOut(**{f: getattr(run, f) for f in EvalOut.model_fields})


@router.get("/v1/knowledge-evals", response_model=list[EvalOut])
async def list_eval_runs(
    ctx: Context,
    actor: CurrentActor,
    collection: Annotated[str | None, Query(pattern=r"^[a-z0-9][a-z0-9_-]{0,47}$")] = None,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> list[EvalOut]:
    """Stored retrieval evaluations, newest first."""
    runs = await run_in_threadpool(lambda: list_evals(_kb(ctx), actor=actor, collection=collection, limit=limit))
    return [EvalOut(**{f: getattr(r, f) for f in EvalOut.model_fields}) for r in runs]
