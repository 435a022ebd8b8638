"""Personas as OpenAI-compatible models: `GET /v1/models` and `POST /v1/chat/completions`, streaming and not, in
OpenAI's wire shapes, so any OpenAI client (the `openai` SDK, LangChain, a phone stack) can talk to a persona.

A model is a persona (`receptionist`: its production version, else its latest) or one version (`receptionist@2`);
see `personas/served.py`. A completion is one turn of a stored conversation (channel `api`) run by the engine with
the persona version's prompt and parameters; the request's sampling fields override them for that turn. Which
conversation a request continues is `conversations/continuation.py`'s rule; the answer names it in the
`X-Conversation-Id` header. A client's system messages are ignored: the persona's prompt rules.

Errors keep this API's shape, `{"error": {"code", "message"}}`: the OpenAI SDK reads `error.message` from it.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import AsyncIterator, Iterator
from functools import partial
from typing import Annotated, Any, Literal

import anyio
from fastapi import APIRouter, Header
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from callbot_core.access.permissions import require
from callbot_core.api.auth import Context, CurrentActor
from callbot_core.api.errors import ERROR_RESPONSES, ApiError, ErrorBody, engine_status
from callbot_core.api.streaming import ReplyReader
from callbot_core.conversations.continuation import MAX_STOP, Continued, send_continuing
from callbot_core.conversations.validation import clean_message
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.personas.fields import MAX_TOKENS, SEED, TEMPERATURE, TOP_P, FieldRange
from callbot_core.personas.served import UnknownModel, served_models

log = logging.getLogger("callbot.api")

router = APIRouter(tags=["openai"], responses=ERROR_RESPONSES)

CONVERSATION_HEADER = "X-Conversation-Id"
OWNED_BY = "callbot"
# Roles a client may send; system and developer messages are ignored (the persona's prompt rules).
IGNORED_ROLES = ("system", "developer")
_END = object()
_ID = re.compile(r"[1-9][0-9]{0,17}")  # ASCII only: str.isdigit takes "²", which int() refuses

_ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (404, "Unknown model (code model_not_found) or conversation"),
        (409, "The conversation named in X-Conversation-Id has ended or talks to another persona version"),
        (502, "The backend answered with an error"),
        (503, "The backend is down"),
        (504, "The backend timed out"),
    )
}


# -- models -----------------------------------------------------------------------------------------------------


class ModelOut(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = OWNED_BY


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelOut]


@router.get("/v1/models", response_model=ModelList)
async def list_models(ctx: Context, actor: CurrentActor) -> ModelList:
    """Every persona as a model: its key (the production version, else the latest) and each version as `key@N`.
    Archived personas are left out."""
    served = await run_in_threadpool(served_models, ctx.store)
    return ModelList(data=[ModelOut(id=m.id, created=int(m.created.timestamp())) for m in served])


@router.get("/v1/models/{model}", response_model=ModelOut, responses={404: _ERRORS[404]})
async def get_model(model: str, ctx: Context, actor: CurrentActor) -> ModelOut:
    """One model, as listed by `GET /v1/models`."""
    served = await run_in_threadpool(served_models, ctx.store)
    found = next((m for m in served if m.id == model), None)
    if found is None:
        keys = [m.id for m in served if "@" not in m.id]
        raise ApiError(404, "model_not_found", f"Unknown model {model[:100]!r}; available: {', '.join(keys) or 'none'}")
    return ModelOut(id=found.id, created=int(found.created.timestamp()))


# -- chat completions: the request ------------------------------------------------------------------------------


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: str = Field(max_length=64)
    text: str | None = None


class MessageIn(BaseModel):
    model_config = ConfigDict(extra="allow")  # name, tool_calls...: read below where they matter
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


def _range(field: FieldRange) -> dict[str, Any]:
    low = "minimum" if field.low_inclusive else "exclusiveMinimum"
    return {low: field.low} if field.high is None else {low: field.low, "maximum": field.high}


class ChatCompletionRequest(BaseModel):
    """OpenAI's chat completion request. Fields it has that personas do not use (penalties, logit_bias...) are
    ignored; those that would change the answer's shape (n > 1, tools) are refused."""

    model: str = Field(min_length=1, max_length=200, description="A persona key or key@version (GET /v1/models)")
    messages: list[MessageIn] = Field(min_length=1, max_length=2000)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    # Ranges are checked by the engine (`personas/fields.py`, one message everywhere); the schema only shows them.
    temperature: float | None = Field(None, json_schema_extra=_range(TEMPERATURE))
    top_p: float | None = Field(None, json_schema_extra=_range(TOP_P))
    max_tokens: int | None = Field(None, json_schema_extra=_range(MAX_TOKENS))
    max_completion_tokens: int | None = Field(None, json_schema_extra=_range(MAX_TOKENS))
    stop: str | list[str] | None = Field(None, description=f"Up to {MAX_STOP} sequences, added to the persona's own")
    seed: int | None = Field(None, json_schema_extra=_range(SEED))
    n: int | None = Field(None, description="Only 1")
    user: str | None = Field(None, max_length=200, description="Links calls: see X-Conversation-Id")
    tools: list[Any] | None = None
    functions: list[Any] | None = None


def _text_of(index: int, message: MessageIn) -> str:
    content = message.content
    if content is None:
        raise InvalidInput(f"messages[{index}] ({message.role}) has no content")
    if isinstance(content, str):
        return content
    texts = []
    for number, part in enumerate(content):
        if part.type != "text" or part.text is None:
            raise InvalidInput(
                f"messages[{index}].content[{number}] is a {part.type!r} part: personas take text parts only"
            )
        texts.append(part.text)
    return "\n".join(texts)


def split_messages(messages: list[MessageIn], *, max_chars: int) -> tuple[list[tuple[str, str]], str]:
    """The earlier user and assistant messages, and the last message's text, cleaned as the engine cleans a turn's
    message; `InvalidInput` naming a bad one by its place in `messages`."""
    last = len(messages) - 1
    if messages[last].role != "user":
        raise InvalidInput(f"messages[{last}] is a {messages[last].role} message: the last message must be the user's")
    earlier: list[tuple[str, str]] = []
    for index, message in enumerate(messages):
        if message.role in ("tool", "function") or getattr(message, "tool_calls", None):
            raise InvalidInput(f"messages[{index}] holds a tool call or result: personas do not call tools")
        if message.role in IGNORED_ROLES:
            continue
        text = _text_of(index, message)
        try:
            text = clean_message(text, max_chars=max_chars)
        except InvalidInput as exc:
            raise InvalidInput(f"messages[{index}] ({message.role}): {exc}") from None
        earlier.append((message.role, text))
    return earlier[:-1], earlier[-1][1]


def overrides_of(body: ChatCompletionRequest) -> dict[str, Any]:
    if body.n not in (None, 1):
        raise InvalidInput(f"n must be 1, not {body.n}: a persona gives one reply per turn")
    if body.tools or body.functions:
        raise InvalidInput("tools are not supported: personas answer in text")
    max_tokens = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    if body.max_tokens is not None and max_tokens != body.max_tokens:
        raise InvalidInput("max_tokens and max_completion_tokens differ: give one of them")
    given = {"temperature": body.temperature, "top_p": body.top_p, "max_tokens": max_tokens, "seed": body.seed}
    return {name: value for name, value in given.items() if value is not None}


def _conversation_id(header: str | None) -> int | None:
    if header is None or not header.strip():
        return None
    value = header.strip()
    if not _ID.fullmatch(value):
        raise InvalidInput(f"{CONVERSATION_HEADER} must be a conversation id (a whole number), not {value[:40]!r}")
    return int(value)


# -- chat completions: the answer -------------------------------------------------------------------------------


class UsageOut(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class Choice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: Literal["stop", "length"]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[Choice]
    usage: UsageOut


def finish_reason(continued: Continued) -> Literal["stop", "length"]:
    """The backend's reason when it gives one; else "length" when the reply used every token it was allowed."""
    turn = continued.stream.turn
    reason = turn.usage.finish_reason if turn.usage is not None else None
    if reason == "length" or (reason is None and turn.completion_tokens >= continued.params.max_tokens):
        return "length"
    return "stop"


def usage_of(continued: Continued) -> UsageOut:
    """Token counts of the stored turn; the prompt counted with the backend's tokenizer when it reported none.
    Blocking (a tokenizer): call it off the event loop."""
    turn = continued.stream.turn
    result = continued.stream.result
    prompt = result.prompt_tokens if result is not None else None
    if prompt is None and turn.backend is not None:
        prompt = sum(turn.backend.count_tokens(m.content, turn.model) for m in turn.messages)
    completion = (result.completion_tokens if result is not None else None) or 0
    return UsageOut(prompt_tokens=prompt or 0, completion_tokens=completion, total_tokens=(prompt or 0) + completion)


def _completion_id(continued: Continued) -> str:
    return f"chatcmpl-{continued.conversation_id}-{continued.stream.turn.user_message_id}"


def _run_to_end(continued: Continued) -> tuple[str, UsageOut]:
    with continued.stream as stream:
        text = stream.text()
    return text, usage_of(continued)


def _sse(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, separators=(",", ":"), ensure_ascii=False).encode() + b"\n\n"


def _error_event(exc: BaseException) -> bytes:
    if isinstance(exc, CallbotError):
        _, code = engine_status(exc)
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else code
    else:
        log.exception("Unexpected error while streaming a chat completion", exc_info=exc)
        code, message = "internal_error", "Unexpected error while streaming the reply"
    return _sse({"error": {"code": code, "message": message}})


async def _close(continued: Continued) -> None:
    # Shielded: when the client went away this runs inside a cancelled scope, and the interrupted turn must still
    # be stored.
    with anyio.CancelScope(shield=True):
        await run_in_threadpool(continued.stream.close)


async def _chunks(
    continued: Continued, pieces: Iterator[str], first: object, include_usage: bool
) -> AsyncIterator[bytes]:
    reader = ReplyReader(pieces, continued.stream.close)
    base = {
        "id": _completion_id(continued),
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": continued.ref,
    }
    extra = {"usage": None} if include_usage else {}

    def chunk(delta: dict[str, str], reason: str | None = None) -> bytes:
        return _sse({**base, "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}],
                     **extra})  # fmt: skip

    try:
        yield chunk({"role": "assistant", "content": ""})
        if first is not _END:
            yield chunk({"content": first})  # type: ignore[dict-item]
            async for batch in reader.batches():
                yield b"".join(chunk({"content": piece}) for piece in batch)
        usage = await run_in_threadpool(usage_of, continued)
        yield chunk({}, finish_reason(continued))
        if include_usage:
            yield _sse({**base, "choices": [], "usage": usage.model_dump()})
        yield b"data: [DONE]\n\n"
    except Exception as exc:  # headers are sent: the failure travels as an event (the SDK raises it as APIError)
        yield _error_event(exc)
    finally:
        await reader.stop()  # closes the stream, on the reader's thread or here if it never started


@router.post(
    "/v1/chat/completions",
    response_model=ChatCompletion,
    responses={
        200: {
            "description": "A chat.completion object, or with `stream: true` server-sent chat.completion.chunk "
            "events ending with `data: [DONE]`",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
            "headers": {CONVERSATION_HEADER: {"description": "The stored conversation", "schema": {"type": "integer"}}},
        },
        **_ERRORS,
    },
)
async def chat_completions(
    body: ChatCompletionRequest,
    ctx: Context,
    actor: CurrentActor,
    x_conversation_id: Annotated[str | None, Header(max_length=40, description="Continue this conversation")] = None,
) -> Response:
    """One turn with a persona, as OpenAI's chat completions: the last message (the user's) is sent to the
    conversation this call continues (`X-Conversation-Id`, or `user` with the history resent), else to a new one
    holding the earlier messages. The answer's `X-Conversation-Id` header names the conversation."""
    require(actor, "chat")
    earlier, text = split_messages(body.messages, max_chars=ctx.settings.max_message_chars)
    call = partial(
        send_continuing, ctx.service, body.model, earlier, text, actor=actor, overrides=overrides_of(body),
        stop=body.stop, conversation_id=_conversation_id(x_conversation_id), user_tag=body.user or None,
    )  # fmt: skip
    try:
        continued = await run_in_threadpool(call)
    except UnknownModel as exc:
        raise ApiError(404, "model_not_found", str(exc)) from None
    headers = {CONVERSATION_HEADER: str(continued.conversation_id)}

    if not body.stream:
        try:
            reply, usage = await run_in_threadpool(_run_to_end, continued)
        finally:
            await _close(continued)
        completion = ChatCompletion(
            id=_completion_id(continued),
            created=int(time.time()),
            model=continued.ref,
            choices=[Choice(message=AssistantMessage(content=reply), finish_reason=finish_reason(continued))],
            usage=usage,
        )
        return JSONResponse(completion.model_dump(mode="json"), headers=headers)

    # The first piece is read before the answer starts, so a backend that is down gets a plain error status.
    pieces = iter(continued.stream)
    try:
        first = await run_in_threadpool(next, pieces, _END)
    except BaseException:
        await _close(continued)
        raise
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    return StreamingResponse(
        _chunks(continued, pieces, first, include_usage),
        media_type="text/event-stream",
        headers={**headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
