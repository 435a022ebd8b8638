"""Conversations and their turns: start, list, show, search, export, end, delete; send a turn and get the reply as
one JSON answer or as server-sent events (`event: token` per piece, then `event: turn` with the stored metrics, or
`event: error`).

Everything the engine refuses before a turn starts (the actor's role or key, an unknown or ended conversation, an
empty or over-long message, bad parameters) is a JSON error, never a stream: `send` refuses it before anything is
stored. A backend that fails before its first piece is a JSON error too (503/504/502), stored as a failed turn by the
engine. Once a stream has begun, a failure is an `error` event; a client that goes away leaves the turn stored as
interrupted (the stream is closed whatever ends the response).
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Path, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response, StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic_core import PydanticCustomError
from starlette.background import BackgroundTask

from callbot_core.access.permissions import Actor, require
from callbot_core.api.auth import Context, CurrentActor, client_addr
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import ERROR_RESPONSES, ApiError, ErrorBody, engine_status
from callbot_core.api.streaming import ReplyReader
from callbot_core.backends.llm import GenerationParams, llm_backends
from callbot_core.conversations import transcripts
from callbot_core.conversations.service import ConversationInfo, TurnResult, TurnStream
from callbot_core.conversations.turn import conversation_row
from callbot_core.conversations.validation import require_text
from callbot_core.errors import BackendError, CallbotError, InvalidInput
from callbot_core.personas.fields import MAX_TOKENS, SEED, TEMPERATURE, TOP_P, params_for
from callbot_core.store.models import CHANNELS, CONVERSATION_STATUSES

log = logging.getLogger(__name__)

router = APIRouter(tags=["conversations"], responses=ERROR_RESPONSES)

# Ids are 32-bit integers in the store (PostgreSQL INTEGER): a larger one names nothing, and would be a driver
# error rather than a 404 if it reached the database.
MAX_ID = 2_147_483_647
MAX_LIST = 500
MAX_EXPORT_IDS = 1000
MAX_STOP = 16


def plain_text(value: str) -> str:
    """Text a store column can hold: no NUL (PostgreSQL refuses it in text) and no unpaired surrogate (not UTF-8,
    which JSON's \\ud800 escapes can carry). Checked here for names and filters; messages are the engine's to clean."""
    if "\x00" in value:
        raise PydanticCustomError("plain_text", "must not contain NUL characters")
    try:
        require_text(value, "it")
    except InvalidInput:
        raise PydanticCustomError("plain_text", "holds characters that are not valid UTF-8 text") from None
    return value


def persona_ref(value: str) -> str:
    """`key` or `key@version` with a version the store can hold (a larger number would be a driver error, not a
    404); the engine checks the rest."""
    _, at, version = plain_text(value).partition("@")
    if at and version and not (version.isascii() and version.isdigit() and len(version) <= 9):
        raise PydanticCustomError(
            "persona_ref", "the version after '@' must be a whole number of at most 9 digits, as in receptionist@2"
        )
    return value


PlainText = Annotated[str, AfterValidator(plain_text)]
PersonaRefText = Annotated[str, AfterValidator(persona_ref)]
ConversationId = Annotated[int, Path(ge=1, le=MAX_ID, description="The conversation's id")]

NOT_FOUND = {404: {"model": ErrorBody, "description": "No conversation with this id"}}
ENDED = {409: {"model": ErrorBody, "description": "The conversation has ended"}}
BACKEND_DOWN = {
    502: {"model": ErrorBody, "description": "The backend answered with an error (the turn is stored as failed)"},
    503: {"model": ErrorBody, "description": "The backend is unreachable (the turn is stored as failed)"},
    504: {"model": ErrorBody, "description": "The backend timed out (the turn is stored as failed)"},
}


# -- models -------------------------------------------------------------------------------------------------


class ConversationCreate(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    persona: PersonaRefText = Field(
        min_length=1, max_length=100, description="`key` or `key@version`", examples=["receptionist"]
    )
    backend: PlainText | None = Field(
        None, min_length=1, max_length=40, description="An LLM backend (default: the version's)"
    )
    model: PlainText | None = Field(None, min_length=1, max_length=200, description="A model (default: the version's)")
    variables: dict[str, str] | None = Field(None, description="Values for `{{name}}` placeholders in the prompt")


class ConversationOut(BaseModel):
    id: int
    persona: str
    version: int
    backend: str
    model: str
    channel: str
    greeting: str
    status: str

    @classmethod
    def of(cls, info: ConversationInfo) -> ConversationOut:
        return cls(
            id=info.id, persona=info.persona_key, version=info.persona_version, backend=info.backend,
            model=info.model, channel=info.channel, greeting=info.greeting, status=info.status,
        )  # fmt: skip


class ConversationRowOut(BaseModel):
    id: int
    persona: str
    version: int
    username: str | None = Field(description="Who started it (null: the command line)")
    backend: str
    model: str
    channel: str
    status: str
    started_at: datetime
    ended_at: datetime | None
    turns: int
    failed_turns: int
    mean_ttft_ms: float | None
    summary_short: str | None

    @classmethod
    def of(cls, row: transcripts.ConversationRow) -> ConversationRowOut:
        return cls(
            id=row.id, persona=row.persona_key, version=row.persona_version, username=row.username,
            backend=row.backend, model=row.model, channel=row.channel, status=row.status,
            started_at=row.started_at, ended_at=row.ended_at, turns=row.turns, failed_turns=row.failed_turns,
            mean_ttft_ms=row.mean_ttft_ms, summary_short=row.summary_short,
        )  # fmt: skip


class ConversationPage(BaseModel):
    items: list[ConversationRowOut]
    limit: int
    offset: int
    next_offset: int | None = Field(description="The offset of the next page; null on the last one")


# Read straight off the engine's dataclasses (the same field names): one list of fields, not a copy per route.
READ_ATTRIBUTES = ConfigDict(from_attributes=True)


class MessageOut(BaseModel):
    model_config = READ_ATTRIBUTES

    id: int
    role: str
    text: str
    created_at: datetime
    token_count: int | None
    ttft_ms: float | None = Field(description="Set on a bot message: its turn's time to first token")
    total_ms: float | None
    tokens_per_s: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    error: str | None = Field(description="Set on the caller's message of a failed or interrupted turn")


class ConversationDetailOut(ConversationRowOut):
    system_prompt: str
    summary_full: str | None
    messages: list[MessageOut]


class SearchHitOut(BaseModel):
    model_config = READ_ATTRIBUTES

    conversation_id: int
    source: Literal["message", "summary"]
    message_id: int | None
    role: str | None
    snippet: str
    created_at: datetime


class EndOut(BaseModel):
    id: int
    status: str
    summary_short: str | None
    summary_full: str | None
    summary_error: str | None = Field(
        None, description="Why no summary was written: the conversation is ended all the same; end it again to retry"
    )


class TurnParams(BaseModel):
    """Sampling for this turn only; what is left out is the persona version's own."""

    model_config = ConfigDict(extra="forbid", strict=True)

    temperature: float | None = Field(None, ge=TEMPERATURE.low, le=TEMPERATURE.high)
    max_tokens: int | None = Field(None, ge=int(MAX_TOKENS.low), le=int(MAX_TOKENS.high or 4096))
    top_p: float | None = Field(None, gt=TOP_P.low, le=TOP_P.high)
    # No upper bound in the engine; 64 bits is what the store and the backends hold.
    seed: int | None = Field(None, ge=int(SEED.low), le=2**63 - 1)
    stop: list[Annotated[PlainText, Field(min_length=1, max_length=200)]] | None = Field(None, max_length=MAX_STOP)


class TurnRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    text: str = Field(description="What the caller says (CALLBOT_MAX_MESSAGE_CHARS at most)")
    params: TurnParams | None = None


class CitationOut(BaseModel):
    number: int = Field(description="How the reply cites it: [1], [2]...")
    source: str
    page: int | None
    heading: str | None
    similarity: float | None = Field(description="Cosine similarity to the question, 0-1, higher is better")
    text: str


class TurnOut(BaseModel):
    """One stored turn: the reply and its metrics (a failed or interrupted turn has `error` and no reply)."""

    conversation_id: int
    user_message_id: int
    assistant_message_id: int | None
    text: str
    ttft_ms: float | None
    total_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_s: float | None
    trimmed_messages: int
    error: str | None
    cached: bool = Field(False, description="The reply came from the response cache (CALLBOT_RESPONSE_CACHE)")
    citations: list[CitationOut] = Field(
        default_factory=list, description="The passages the prompt used, numbered from 1 as the reply cites them ([1])"
    )
    low_relevance: bool | None = Field(
        None, description="The best passage matched the question poorly; null when the persona retrieves nothing"
    )

    @classmethod
    def of(cls, conversation_id: int, result: TurnResult) -> TurnOut:
        return cls(
            conversation_id=conversation_id, user_message_id=result.user_message_id,
            assistant_message_id=result.assistant_message_id, text=result.text, ttft_ms=result.ttft_ms,
            total_ms=result.total_ms, prompt_tokens=result.prompt_tokens, completion_tokens=result.completion_tokens,
            tokens_per_s=result.tokens_per_s, trimmed_messages=result.trimmed_messages, error=result.error,
            cached=result.cached, low_relevance=result.low_relevance,
            citations=[CitationOut(number=n, source=h.source, page=h.page, heading=h.heading,
                                   similarity=h.similarity, text=h.text)
                       for n, h in enumerate(result.citations, start=1)],
        )  # fmt: skip


# -- conversations ------------------------------------------------------------------------------------------


@router.post("/v1/conversations", response_model=ConversationOut, status_code=201, responses={
    404: {"model": ErrorBody, "description": "No such persona or version"},
    503: {"model": ErrorBody, "description": "The backend cannot be reached to start with"},
})  # fmt: skip
async def start_conversation(body: ConversationCreate, ctx: Context, actor: CurrentActor) -> ConversationOut:
    """Start a conversation (channel `api`) with a persona version; its greeting is the first message."""
    if body.backend is not None and body.backend not in llm_backends.names():
        raise ApiError(
            422, "invalid_input", f"Unknown backend {body.backend!r}; known: {', '.join(llm_backends.names())}"
        )
    info = await run_in_threadpool(
        ctx.service.start, body.persona, actor=actor, backend=body.backend, model=body.model, channel="api",
        variables=body.variables,
    )  # fmt: skip
    return ConversationOut.of(info)


def _utc(value: datetime | None, name: str) -> datetime | None:
    """In UTC, as the store keeps times; a date or time without a zone is read as UTC."""
    if value is None:
        return None
    try:
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)
    except OverflowError:  # 0001-01-01 in a zone east of UTC: before the first representable moment
        raise ApiError(422, "invalid_request", f"{name}: {value.isoformat()} is out of range in UTC") from None


@router.get("/v1/conversations", response_model=ConversationPage)
async def list_conversations(
    ctx: Context,
    actor: CurrentActor,
    persona: Annotated[PlainText | None, Query(min_length=1, max_length=64, description="A persona key")] = None,
    status: Annotated[Literal[CONVERSATION_STATUSES] | None, Query()] = None,  # type: ignore[valid-type]
    channel: Annotated[Literal[CHANNELS] | None, Query()] = None,  # type: ignore[valid-type]
    username: Annotated[PlainText | None, Query(min_length=1, max_length=64)] = None,
    since: Annotated[
        datetime | None, Query(description="Started at or after (ISO date or time; UTC if no zone)")
    ] = None,
    until: Annotated[datetime | None, Query(description="Started before (ISO date or time; UTC if no zone)")] = None,
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> ConversationPage:
    """Conversations, newest first, with their turn counts and mean TTFT. Everyone who may read conversations sees
    everyone's (as on the app's Conversations page)."""

    start, end = _utc(since, "since"), _utc(until, "until")

    def _list() -> list[transcripts.ConversationRow]:
        require(actor, "conversation.read")
        return transcripts.list_conversations(
            ctx.store, persona=persona, username=username, status=status, channel=channel, since=start, until=end,
            limit=limit + 1, offset=offset,
        )  # fmt: skip

    rows = await run_in_threadpool(_list)
    more = len(rows) > limit
    return ConversationPage(
        items=[ConversationRowOut.of(r) for r in rows[:limit]],
        limit=limit,
        offset=offset,
        next_offset=offset + limit if more else None,
    )


# Declared before /v1/conversations/{conversation_id}, which would otherwise take "search" and "export" for ids.
@router.get("/v1/conversations/search", response_model=list[SearchHitOut])
async def search_conversations(
    ctx: Context,
    actor: CurrentActor,
    q: Annotated[PlainText, Query(min_length=1, max_length=200, description="Words to find in messages and summaries")],
    limit: Annotated[int, Query(ge=1, le=MAX_LIST)] = 50,
) -> list[SearchHitOut]:
    """Messages and summaries matching `q`, newest first (full-text on PostgreSQL, substring on SQLite)."""

    def _search() -> list[transcripts.SearchHit]:
        require(actor, "conversation.read")
        return transcripts.search(ctx.store, q, limit=limit)

    hits = await run_in_threadpool(_search)
    return [SearchHitOut.model_validate(h) for h in hits]


class SemanticHitOut(BaseModel):
    model_config = READ_ATTRIBUTES

    conversation_id: int
    message_id: int
    role: str
    text: str
    created_at: datetime
    persona: str
    similarity: float = Field(description="Cosine similarity to the query, 0-1, higher is closer in meaning")


@router.get("/v1/conversations/semantic-search", response_model=list[SemanticHitOut])
async def semantic_search_conversations(
    ctx: Context,
    actor: CurrentActor,
    q: Annotated[PlainText, Query(min_length=1, max_length=2000, description="What the messages should mean")],
    limit: Annotated[int, Query(ge=1, le=200)] = 20,
) -> list[SemanticHitOut]:
    """Messages closest in meaning to `q` (the embedder), best first; new messages are indexed on the way."""
    from callbot_core.knowledge.index import KnowledgeBase
    from callbot_core.knowledge.semantic import semantic_search

    hits = await run_in_threadpool(
        lambda: semantic_search(KnowledgeBase(ctx.store, ctx.settings), q, actor=actor, limit=limit)
    )
    return [SemanticHitOut.model_validate(h) for h in hits]


EXPORT_TYPES = {"jsonl": "application/jsonl", "csv": "text/csv; charset=utf-8"}


def _parse_ids(ids: str | None) -> list[int] | None:
    if ids is None:
        return None
    parsed = [int(part) for part in ids.split(",")]
    if len(parsed) > MAX_EXPORT_IDS:
        raise ApiError(422, "invalid_request", f"ids: at most {MAX_EXPORT_IDS} conversations per export")
    if any(not 1 <= i <= MAX_ID for i in parsed):
        raise ApiError(422, "invalid_request", "ids: each id must be a whole number from 1 to 2147483647")
    return list(dict.fromkeys(parsed))


@router.get(
    "/v1/conversations/export",
    response_class=Response,
    responses={
        200: {
            "description": "A download: JSONL (one conversation a line) or CSV (one message a row)",
            "content": {
                "application/jsonl": {"schema": {"type": "string"}},
                "text/csv": {"schema": {"type": "string"}},
            },
        },
        **NOT_FOUND,
    },
)
async def export_conversations(
    ctx: Context,
    actor: CurrentActor,
    format: Annotated[Literal["jsonl", "csv"], Query(description="jsonl or csv")] = "jsonl",
    ids: Annotated[str | None, Query(pattern=r"^[0-9]{1,10}(,[0-9]{1,10})*$", max_length=12_000,
                                     description="Comma-separated conversation ids (default: all)")] = None,
) -> Response:  # fmt: skip
    """Conversations with their messages and metrics as a file. Written whole before it is sent, so an unknown id
    is a 404 rather than a cut-off download."""
    wanted = _parse_ids(ids)

    def _export() -> str:
        require(actor, "conversation.read")
        fd, path = tempfile.mkstemp(prefix="callbot-export-", suffix=f".{format}")
        os.close(fd)
        try:
            transcripts.export_to_file(ctx.store, format, path, ids=wanted)  # type: ignore[arg-type]
        except BaseException:
            os.unlink(path)
            raise
        return path

    path = await run_in_threadpool(_export)
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return FileResponse(
        path,
        media_type=EXPORT_TYPES[format],
        filename=f"conversations-{stamp}.{format}",
        background=BackgroundTask(os.unlink, path),
    )


@router.get("/v1/conversations/{conversation_id}", response_model=ConversationDetailOut, responses=NOT_FOUND)
async def show_conversation(
    conversation_id: ConversationId, ctx: Context, actor: CurrentActor
) -> ConversationDetailOut:
    """One conversation: its messages in order, each bot message with its turn's metrics, failed turns marked."""

    def _get() -> transcripts.ConversationDetail:
        require(actor, "conversation.read")
        return transcripts.get_conversation(ctx.store, conversation_id)

    detail = await run_in_threadpool(_get)
    row = ConversationRowOut.of(detail.row)
    messages = [MessageOut.model_validate(m) for m in detail.messages]
    return ConversationDetailOut(
        **row.model_dump(), system_prompt=detail.system_prompt, summary_full=detail.summary_full, messages=messages
    )


@router.post("/v1/conversations/{conversation_id}/end", response_model=EndOut, responses=NOT_FOUND)
async def end_conversation(conversation_id: ConversationId, ctx: Context, actor: CurrentActor) -> EndOut:
    """End the conversation and write its short and full summaries with its backend. A reply still streaming is
    stored as interrupted. If the summariser fails, the conversation is ended all the same: the answer says why in
    `summary_error` (ending again retries the summaries)."""
    try:
        summaries = await run_in_threadpool(ctx.service.end, conversation_id, actor=actor)
    except BackendError as exc:
        # Raised only by the summariser, after the conversation was ended: the call is over either way.
        return EndOut(id=conversation_id, status="ended", summary_short=None, summary_full=None,
                      summary_error=_one_line(str(exc)))  # fmt: skip
    return EndOut(id=conversation_id, status="ended", summary_short=summaries.short, summary_full=summaries.full)


@router.delete("/v1/conversations/{conversation_id}", status_code=204, responses=NOT_FOUND)
async def delete_conversation(
    conversation_id: ConversationId, request: Request, ctx: Context, actor: CurrentActor
) -> None:
    """Delete a conversation with its messages and metrics (admins; audited)."""
    await run_in_threadpool(
        transcripts.delete_conversation, ctx.store, conversation_id, actor=actor, client_addr=client_addr(request)
    )


# -- turns --------------------------------------------------------------------------------------------------


def _one_line(message: str) -> str:
    lines = [line for line in message.strip().splitlines() if line.strip()]
    return lines[0] if lines else message


def _turn_params(ctx: ApiContext, conversation_id: int, given: TurnParams | None) -> GenerationParams | None:
    """The persona version's sampling with this turn's overrides on top (checked against the engine's ranges);
    None when nothing is overridden, so the engine uses the version's own."""
    if given is None:
        return None
    overrides = given.model_dump(exclude_none=True, exclude={"stop"})
    if not overrides and given.stop is None:
        return None
    with ctx.store.session() as session:
        params = params_for(conversation_row(session, conversation_id).persona_version, overrides)
    return params if given.stop is None else replace(params, stop=tuple(given.stop))


def _start_turn(ctx: ApiContext, conversation_id: int, body: TurnRequest, actor: Actor) -> TurnStream:
    require(actor, "chat")  # before reading anything for the parameters: a viewer hears "no", not "not found"
    params = _turn_params(ctx, conversation_id, body.params)
    return ctx.service.send(conversation_id, body.text, actor=actor, params=params)


def _whole_turn(ctx: ApiContext, conversation_id: int, body: TurnRequest, actor: Actor) -> TurnResult:
    with _start_turn(ctx, conversation_id, body, actor) as stream:
        stream.text()
        assert stream.result is not None
        return stream.result


_END = object()


def _pull(stream: TurnStream) -> Any:
    """The next piece, or `_END`: StopIteration cannot cross a thread boundary into a coroutine."""
    try:
        return next(stream)
    except StopIteration:
        return _END


def _close(stream: TurnStream) -> None:
    try:
        stream.close()
    except Exception:  # the turn's own failure was already told to the client; this is only for the log
        log.exception("Closing turn %s failed", stream.turn.user_message_id)


def _sse(event: str, data: dict[str, Any]) -> bytes:
    return f"event: {event}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n".encode()


async def _events(stream: TurnStream, reader: ReplyReader, first: Any, conversation_id: int) -> AsyncIterator[bytes]:
    try:
        if first is not _END:
            yield _sse("token", {"text": first})
            async for batch in reader.batches():
                yield b"".join(_sse("token", {"text": piece}) for piece in batch)
        result = stream.result
        assert result is not None
        yield _sse("turn", TurnOut.of(conversation_id, result).model_dump())
    except CallbotError as exc:
        # The engine stored the failure before raising it; the stored turn (when this stream stored it) comes along.
        _, code = engine_status(exc)
        stored = stream.result
        yield _sse("error", {
            "code": code, "message": _one_line(str(exc)),
            "turn": TurnOut.of(conversation_id, stored).model_dump() if stored is not None else None,
        })  # fmt: skip
    except Exception:
        log.exception("Turn %s failed while streaming", stream.turn.user_message_id)
        yield _sse("error", {"code": "internal_error", "message": "Unexpected error while streaming", "turn": None})


class TurnEvents(StreamingResponse):
    """Server-sent events of one turn. The turn is closed however the response ends (finished, failed, the client
    gone): a turn not read to the end is then stored as interrupted at once, not when the generator is collected."""

    def __init__(self, stream: TurnStream, first: Any, conversation_id: int) -> None:
        self.reader = ReplyReader(stream, lambda: _close(stream))
        super().__init__(
            _events(stream, self.reader, first, conversation_id),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.reader.stop()


def _wants_stream(stream: bool | None, accept: str | None) -> bool:
    if stream is not None:
        return stream
    return "text/event-stream" in (accept or "").lower()


@router.post(
    "/v1/conversations/{conversation_id}/turns",
    response_model=TurnOut,
    responses={
        200: {
            "description": "The stored turn as JSON; or, with `?stream=true` or `Accept: text/event-stream`, "
            "server-sent events: `token` ({text}) per piece, then `turn` (this JSON) or `error` "
            "({code, message, turn})",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **NOT_FOUND,
        **ENDED,
        **BACKEND_DOWN,
    },
)
async def send_turn(
    conversation_id: ConversationId,
    body: TurnRequest,
    request: Request,
    ctx: Context,
    actor: CurrentActor,
    stream: Annotated[
        bool | None, Query(description="Stream the reply as server-sent events (default: when Accept asks for them)")
    ] = None,
) -> Any:
    """Say something in the conversation and get the bot's reply with the turn's metrics (TTFT, total time,
    tokens, tokens/s). `params` override the persona version's sampling for this turn only."""
    if not _wants_stream(stream, request.headers.get("accept")):
        result = await run_in_threadpool(_whole_turn, ctx, conversation_id, body, actor)
        return TurnOut.of(conversation_id, result)
    turn = await run_in_threadpool(_start_turn, ctx, conversation_id, body, actor)
    # The first piece is awaited before the response starts, so a backend that is down is a JSON error status.
    try:
        first = await anyio.to_thread.run_sync(_pull, turn)
    except BaseException:
        with anyio.CancelScope(shield=True):
            await anyio.to_thread.run_sync(_close, turn)
        raise
    return TurnEvents(turn, first, conversation_id)
