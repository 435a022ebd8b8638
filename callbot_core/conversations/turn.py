"""A turn as a list of stages (pipecat-style): validate → prompt → generate → persist, each timed by one clock.

Each stage reads and fills one `TurnContext`. A new capability (transcribe, retrieve, speak...) is a new stage
inserted in the list; the others do not change. Stages do the work; observers (`observers.py`) receive the events
and write the metrics.

How a turn runs, so that no turn is ever lost:
- `ConversationService.send` runs the stages before the first streaming one (validate, prompt): everything that
  can refuse a turn does so there, raised by `send` itself, before anything is stored.
- Then the turn starts: the caller's message is stored in its own short transaction, with a `running_turns` row
  naming the process that runs it ("host:pid"). From here on the message is never lost, whatever happens to
  the process.
- Iterating the returned `TurnStream` runs the rest: generate streams text to the caller as it arrives, then
  persist writes the turn's end into one transaction, in which observers add their rows (`turn_metrics`,
  `turn_stages`) and the running row is deleted; it is committed after the last stage, so an end is stored
  whole or not at all.
- When a stage fails (the backend is down, the reply is empty, the caller stops reading), the stages after it
  are skipped except those marked `after_failure` (persist), so the failure is stored, with the error on the
  failing stage's row; then the error is raised to the caller. If storing the end fails itself, the turn is
  still stored as failed, without its stage rows, when the store allows it.
- A turn that does not finish is stored as interrupted: when the caller closes the stream or drops it (`close()`,
  `with`, or the last reference going: the stream's generator does not refer back to it, so that is immediate,
  not left to the garbage collector), when its conversation is ended (`mark_ended` stores it at once; the
  stream, if it goes on, finds its end stored and raises `Conflict`), and when its process died
  (`reconcile_turns`, run by `ConversationService` when it is built and when it opens a conversation, with the
  rule report runs use: `callbot_core.jobs.runs.why_dead`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import delete, func, select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from callbot_core.access.permissions import require_owner
from callbot_core.backends.llm import ChatMessage, GenerationParams, LLMBackend, Usage
from callbot_core.conversations.observers import MAX_ERROR_CHARS, ObserverList
from callbot_core.conversations.prompt import PastMessage, build_prompt
from callbot_core.conversations.timing import StageTiming, TurnClock
from callbot_core.conversations.validation import clean_message
from callbot_core.errors import BackendError, CallbotError, Conflict, InvalidInput, NotFound
from callbot_core.jobs.runs import why_dead, worker_id
from callbot_core.personas.fields import params_for
from callbot_core.personas.variables import default_variables, render_system_prompt
from callbot_core.store.models import Conversation, Message, PersonaVersion, RunningTurn, TurnMetrics, utcnow

if TYPE_CHECKING:
    from callbot_core.access.permissions import Actor
    from callbot_core.knowledge.retrieval import Hit
    from callbot_core.settings import Settings
    from callbot_core.store import Store

BackendResolver = Callable[[str | None], LLMBackend]

log = logging.getLogger(__name__)

INTERRUPTED = "interrupted: the reply was not read to the end"
ENDED_WHILE_STREAMING = "interrupted: the conversation ended while the reply streamed"
# A turn still running after this long is taken as lost even when its process cannot be asked (another host): a
# reply takes seconds to minutes (max_tokens at the slowest backend), and an hour leaves room for a stalled one.
TURN_MAX_AGE = timedelta(hours=1)


@dataclass(frozen=True, slots=True)
class TurnResult:
    user_message_id: int
    assistant_message_id: int | None
    text: str
    ttft_ms: float | None
    total_ms: float | None
    prompt_tokens: int | None
    completion_tokens: int | None
    tokens_per_s: float | None
    trimmed_messages: int
    error: str | None = None
    cached: bool = False  # the reply came from the response cache (cache.py), not the backend
    # Retrieval (knowledge/stage.py): the passages the prompt used, numbered from 1 as the reply cites them, and
    # whether the best of them matched the question poorly. None: the persona retrieves nothing.
    citations: tuple[Hit, ...] = ()
    low_relevance: bool | None = None


class EmptyReply(BackendError):
    """The model streamed nothing but whitespace: a failed turn, never an empty bot message."""

    stored_error = "the model returned an empty reply"

    def __init__(self, backend: LLMBackend, model: str) -> None:
        super().__init__(
            f"{backend.name} model {model} returned an empty reply", backend=backend.name, where=backend.where
        )


class TurnAlreadyEnded(Conflict):
    """The turn's end was stored while its reply streamed, by someone else: its conversation was ended, or the turn
    was reconciled as interrupted. What was stored stands; the stream stores nothing more."""


def error_text(exc: BaseException) -> str:
    """What a failed turn stores: the engine's own message, or the type and message of anything unexpected."""
    stored = getattr(exc, "stored_error", None)
    if isinstance(stored, str):
        return stored
    return str(exc) if isinstance(exc, CallbotError) else f"{type(exc).__name__}: {exc}"


@dataclass(eq=False)
class TurnContext:
    """Everything one turn knows, filled in by its stages in order.

    Rows read by validate (`conversation`, `persona_version`) are detached copies: read them, do not change them.
    Stages that need to pass something the built-ins do not know about put it in `notes`.
    """

    # Given to `send`.
    conversation_id: int
    text: object  # as given; `user_text` is the cleaned message
    requested_params: GenerationParams | None
    actor: Actor
    store: Store
    settings: Settings
    backends: BackendResolver
    clock: TurnClock = field(default_factory=TurnClock)
    # validate
    user_text: str = ""
    conversation: Conversation | None = None
    persona_version: PersonaVersion | None = None
    history: list[PastMessage] = field(default_factory=list)  # the conversation so far, failed turns left out
    backend: LLMBackend | None = None
    model: str = ""
    params: GenerationParams | None = None
    # Stages before prompt (retrieve...): text the prompt adds after the persona's system prompt.
    context: list[str] = field(default_factory=list)
    # prompt
    system_prompt: str = ""
    messages: list[ChatMessage] = field(default_factory=list)
    trimmed: int = 0
    user_tokens: int | None = None
    # generate
    pieces: list[str] = field(default_factory=list)
    reply_text: str = ""
    usage: Usage | None = None
    cached: bool = False  # the reply was replayed from the response cache (cache.py); the backend was not called
    # stored when the turn starts (after the stages that may refuse it)
    user_message_id: int | None = None
    # persist
    assistant_message_id: int | None = None
    # The run: the first failure, each stage's timing, and what the caller gets.
    error: str | None = None
    timings: list[StageTiming] = field(default_factory=list)
    result: TurnResult | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    _session: Session | None = field(default=None, repr=False)
    _transaction: ExitStack | None = field(default=None, repr=False)
    _end_stored: bool = field(default=False, repr=False)  # this stream stored the turn's end
    _claim_failed: bool = field(default=False, repr=False)  # someone else stored it first

    @property
    def started_at(self) -> datetime:
        """When the caller's message arrived: its stored time (the caller spoke before the bot answered)."""
        return self.clock.started_at

    def timing(self, stage: str) -> StageTiming | None:
        return next((t for t in self.timings if t.name == stage), None)

    # The turn's figures. TTFT and total are the generate stage's, measured from the start of generation.

    @property
    def ttft_ms(self) -> float | None:
        generate = self.timing("generate")
        return generate.first_output_ms if generate else None

    @property
    def total_ms(self) -> float | None:
        generate = self.timing("generate")
        return generate.ms if generate else None

    @property
    def completion_tokens(self) -> int:
        """Tokens in the reply: the backend's count, else the pieces that arrived."""
        if self.usage is not None and self.usage.completion_tokens is not None:
            return self.usage.completion_tokens
        return len(self.pieces)

    @property
    def tokens_per_s(self) -> float | None:
        generate = self.timing("generate")
        return generate.rate_after_first(self.completion_tokens) if generate else None

    def transaction(self) -> Session:
        """The turn's write transaction, opened on first use; rolled back if anything fails before its commit.

        Before the turn starts, it is the one that stores the caller's message when the turn starts (a stage before
        generation that writes, writes with it). After, it is the one that stores the turn's end, committed after
        the last stage with the observers' rows; opening it claims the turn's running row, and raises
        `TurnAlreadyEnded` (or `NotFound`, the conversation was deleted) when someone else stored the end first.
        """
        if self._session is None:
            stack = ExitStack()
            self._session = stack.enter_context(self.store.session())
            self._transaction = stack
            if self.user_message_id is not None:
                try:
                    _claim(self._session, self)
                except BaseException as exc:
                    self._claim_failed = isinstance(exc, TurnAlreadyEnded | NotFound)
                    self._rollback(exc)
                    raise
        return self._session

    def _commit(self, observers: ObserverList | None = None) -> None:
        session = self.transaction()  # the end's transaction claims the turn even when no stage wrote
        stack = self._transaction
        assert stack is not None
        self._transaction = self._session = None
        with stack:  # leaving it commits; an error in an observer's rows rolls everything back
            if observers is not None:
                observers.persist(self, session)

    def _rollback(self, exc: BaseException) -> None:
        stack = self._transaction
        self._transaction = self._session = None
        if stack is not None:
            stack.__exit__(type(exc), exc, exc.__traceback__)


class Stage(Protocol):
    """One step of a turn: reads and fills the `TurnContext`.

    `run` returns None, or (a streaming stage) an iterator of text pieces for the caller. Stages before the first
    streaming one run inside `send`; it and the stages after it run as the caller iterates. `after_failure`
    stages still run once an earlier stage has failed (persist: the failure is stored). A stage may also have
    `applies(turn) -> bool`: when it says False the stage is skipped for that turn, untimed and unrecorded
    (retrieve, for a persona with no documents).
    """

    name: ClassVar[str]
    streams: ClassVar[bool] = False
    after_failure: ClassVar[bool] = False

    def run(self, turn: TurnContext) -> Iterator[str] | None: ...


# -- the built-in stages ------------------------------------------------------------------------------------


class Validate(Stage):
    """Clean the message, check the conversation can take a turn and load it (its persona version and history),
    pick the backend and the sampling."""

    name = "validate"

    def run(self, turn: TurnContext) -> None:
        turn.user_text = clean_message(turn.text, max_chars=turn.settings.max_message_chars)
        # One read for everything later stages need: a second session per turn was measurable in
        # bench/turn_overhead.py.
        with turn.store.session() as session:
            conversation = conversation_row(session, turn.conversation_id)
            require_owner(turn.actor, conversation.user_id, f"conversation {turn.conversation_id}")
            if conversation.status != "active":
                raise Conflict(f"Conversation {turn.conversation_id} has ended; start a new one to go on")
            version = conversation.persona_version
            version.persona  # noqa: B018 - loaded now, so prompt can read it once the session is closed
            turn.history = load_history(session, conversation.id)
        turn.conversation, turn.persona_version = conversation, version
        turn.backend = turn.backends(conversation.backend)
        turn.model = conversation.model
        turn.params = turn.requested_params or params_for(version)


class BuildPrompt(Stage):
    """The persona version's system prompt (+ context from earlier stages) + trimmed history + the message."""

    name = "prompt"

    def run(self, turn: TurnContext) -> None:
        conversation, version, llm = turn.conversation, turn.persona_version, turn.backend
        assert conversation is not None and version is not None and llm is not None and turn.params is not None
        # Conversations from before variables were stored (NULL) get today's defaults, as they always did.
        variables = {**default_variables(version.persona.name), **(conversation.variables or {})}
        system_prompt = "\n\n".join(
            part for part in (render_system_prompt(version.system_prompt, variables), *turn.context) if part
        )
        model = turn.model
        turn.user_tokens = llm.count_tokens(turn.user_text, model)
        history = [h if h.tokens >= 0 else replace(h, tokens=llm.count_tokens(h.text, model)) for h in turn.history]
        turn.system_prompt = system_prompt
        turn.messages, turn.trimmed = build_prompt(
            system_prompt,
            llm.count_tokens(system_prompt, model),
            history,
            turn.user_text,
            turn.user_tokens,
            context_window=llm.context_window(model),
            reply_tokens=turn.params.max_tokens,
        )


class Generate(Stage):
    """Stream the reply from the backend; its first output is the first token (TTFT)."""

    name = "generate"
    streams = True

    def run(self, turn: TurnContext) -> Iterator[str]:
        llm = turn.backend
        assert llm is not None and turn.params is not None
        stream = llm.stream(turn.messages, turn.params, model=turn.model)
        try:
            for token in stream:
                if token.usage is not None:
                    turn.usage = token.usage
                if token.text:
                    turn.pieces.append(token.text)
                    yield token.text
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        text = "".join(turn.pieces).strip()
        if not text:
            raise EmptyReply(llm, turn.model)
        turn.reply_text = text


class Persist(Stage):
    """Open the transaction that stores the turn's end (claiming the turn) and, when the turn succeeded, add the bot
    message to it. The caller's message was stored when the turn started.

    A failed turn stores no bot message: partial reply text would read as if the bot had said it.
    """

    name = "persist"
    after_failure = True

    def run(self, turn: TurnContext) -> None:
        session = turn.transaction()
        if turn.error is not None:
            return
        bot = Message(
            conversation_id=turn.conversation_id,
            role="assistant",
            text=turn.reply_text,
            token_count=turn.completion_tokens,
        )
        session.add(bot)
        session.flush()
        turn.assistant_message_id = bot.id


def default_stages() -> list[Stage]:
    # Imported here: knowledge builds on this package (its stage and observer), not the other way round.
    from callbot_core.knowledge.stage import Retrieve

    return [Validate(), Retrieve(), BuildPrompt(), Generate(), Persist()]


def _applies(stage: Stage, turn: TurnContext) -> bool:
    applies = getattr(stage, "applies", None)
    return applies is None or bool(applies(turn))


# -- running a turn -----------------------------------------------------------------------------------------


def start_turn(turn: TurnContext, stages: Sequence[Stage], observers: ObserverList) -> TurnStream:
    """Run the stages before the first streaming one, then start the turn (store the caller's message as running).

    Refusals are raised here, with nothing stored.
    """
    observers.notify("turn_started", turn)
    split = next((i for i, stage in enumerate(stages) if getattr(stage, "streams", False)), len(stages))
    for position, stage in enumerate(stages[:split]):
        try:
            if not _applies(stage, turn):
                continue
        except BaseException as exc:
            turn.error = error_text(exc)
            turn._rollback(exc)
            observers.notify("turn_failed", turn, turn.error)
            raise
        timing = _begin(turn, position, stage, observers)
        try:
            pieces = stage.run(turn)
            for piece in pieces or ():  # a non-streaming stage may still yield; nobody is listening yet
                _output(turn, timing, piece, observers)
        except BaseException as exc:
            turn.error = error_text(exc)
            _end(turn, timing, observers, turn.error)
            turn._rollback(exc)  # a refused turn stores nothing, whatever an earlier stage began to write
            observers.notify("turn_failed", turn, turn.error)
            raise
        _end(turn, timing, observers)
    try:
        _store_start(turn)
    except BaseException as exc:
        turn.error = error_text(exc)
        turn._rollback(exc)
        observers.notify("turn_failed", turn, turn.error)
        raise
    return TurnStream(turn, list(enumerate(stages))[split:], observers)


class TurnStream:
    """The reply to one turn: iterate it for text as it streams; `result` is set once its end is stored.

    The caller's message is stored already (as running). Iterating is what runs the rest of the turn. If the
    backend fails, the failure is stored first and the `BackendError` is raised to the caller. A stream that is
    not read to the end stores the turn as interrupted as soon as it is closed: `close()`, leaving a `with` block
    (also on a `BaseException` such as Ctrl-C or a stopped Streamlit script), or dropping the last reference.
    """

    def __init__(self, turn: TurnContext, stages: list[tuple[int, Stage]], observers: ObserverList) -> None:
        self.turn = turn
        self._stages = stages
        self._observers = observers
        self._iter: Iterator[str] | None = None

    @property
    def result(self) -> TurnResult | None:
        return self.turn.result

    def __iter__(self) -> Iterator[str]:
        if self._iter is None:
            # `_run` must not refer back to this stream: then dropping the stream frees the generator at once (and
            # closing a suspended generator stores the interruption) instead of waiting for the garbage collector
            # to find a cycle.
            self._iter = _run(self.turn, self._stages, self._observers)
        return self._iter

    def __next__(self) -> str:
        return next(iter(self))

    def text(self) -> str:
        """Run the turn to the end and return the whole reply."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.text

    def close(self) -> None:
        """Stop reading: a turn not read to the end is stored as interrupted now. Harmless after the end or twice."""
        if self._iter is None:
            # Never read: run only the stages that record (persist), which yield nothing.
            self._iter = _run(self.turn, self._stages, self._observers, abandoned=True)
            for _ in self._iter:
                pass
        else:
            self._iter.close()  # type: ignore[attr-defined]

    def __enter__(self) -> TurnStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> None:
        if exc is None:
            self.close()
            return
        try:
            self.close()
        except Exception:  # the exception already on its way out says more than a failure to store the interruption
            log.exception("Storing the interrupted turn %s failed", self.turn.user_message_id)

    def __del__(self) -> None:
        # Dropped before it was read. Once read, the generator is left alone: the caller may still hold it (`for
        # piece in service.send(...)` drops the stream at once) and it stores the interruption itself when its own
        # last reference goes.
        if self._iter is not None:
            return
        try:
            self.close()
        except Exception:
            log.exception("Storing the dropped turn %s failed", self.turn.user_message_id)


def _run(
    turn: TurnContext, stages: list[tuple[int, Stage]], observers: ObserverList, *, abandoned: bool = False
) -> Iterator[str]:
    """Run the stages from the first streaming one, yielding its text; store the end; raise a failure after that.

    `abandoned`: the stream was closed before it was read, so only the stages that record run.
    """
    failure: BaseException | None = None  # raised to the caller once the turn is stored
    if abandoned:
        turn.error, failure = INTERRUPTED, GeneratorExit()
    try:
        for position, stage in stages:
            recorder = getattr(stage, "after_failure", False)
            if failure is not None and not recorder:
                continue
            if not recorder and not _applies(stage, turn):
                continue
            timing = _begin(turn, position, stage, observers)
            pieces: Iterator[str] | None = None
            error: str | None = None
            try:
                pieces = stage.run(turn)
                for piece in pieces or ():
                    _output(turn, timing, piece, observers)
                    if failure is None:  # after a failure the caller may be gone: nothing more reaches it
                        yield piece
            except Exception as exc:
                error = error_text(exc)
                if recorder:  # the stage that would record the failure failed
                    turn.error = turn.error or error
                    raise
                failure = exc
            except BaseException as exc:  # GeneratorExit: the caller stopped reading; Ctrl-C: the process stops
                error = INTERRUPTED
                if recorder:
                    turn.error = turn.error or error
                    raise
                failure = exc
            finally:
                # Ended before the stream is closed: closing an abandoned stream is not the stage's time.
                _end(turn, timing, observers, error)
                _close(pieces)
            if error is not None and turn.error is None:
                turn.error = error
        turn._commit(observers)
    except BaseException as exc:
        turn._rollback(exc)
        turn.error = turn.error or (error_text(exc) if isinstance(exc, Exception) else INTERRUPTED)
        if not turn._claim_failed:
            _store_failed_end(turn)
        observers.notify("turn_failed", turn, turn.error)
        if isinstance(failure, GeneratorExit) and turn._claim_failed:
            return  # abandoned, and its end stored by someone else already: nothing to tell whoever closed it
        raise
    turn._end_stored = True
    turn.result = _result(turn)
    if failure is None:
        observers.notify("turn_finished", turn)
        return
    turn.notes["failure"] = failure  # for observers that count errors by class: no exception is being handled here
    observers.notify("turn_failed", turn, turn.error or error_text(failure))
    if isinstance(failure, GeneratorExit):
        return  # what closing a generator expects; a stream closed before it was read just ends
    raise failure


def _begin(turn: TurnContext, position: int, stage: Stage, observers: ObserverList) -> StageTiming:
    # Numbered among the stages that ran: a stage that does not apply to this turn leaves no gap.
    timing = StageTiming(stage.name, len(turn.timings), turn.clock.now())
    turn.timings.append(timing)
    observers.notify("stage_started", turn, timing)
    return timing


def _output(turn: TurnContext, timing: StageTiming, piece: str, observers: ObserverList) -> None:
    if timing.output(turn.clock.now()):
        observers.notify("stage_first_output", turn, timing)
    observers.notify("token", turn, timing, piece)


def _end(turn: TurnContext, timing: StageTiming, observers: ObserverList, error: str | None = None) -> None:
    timing.ended = turn.clock.now()
    timing.error = error
    observers.notify("stage_ended", turn, timing)


def _close(pieces: object) -> None:
    close = getattr(pieces, "close", None)
    if close is not None:
        close()


def _result(turn: TurnContext) -> TurnResult | None:
    if not turn._end_stored or turn.user_message_id is None:  # the turn's end was not stored by this stream
        return None
    if turn.error is not None:
        return TurnResult(
            user_message_id=turn.user_message_id,
            assistant_message_id=None,
            text="",
            ttft_ms=turn.ttft_ms,
            total_ms=turn.total_ms,
            prompt_tokens=None,
            completion_tokens=None,
            tokens_per_s=None,
            trimmed_messages=turn.trimmed,
            error=turn.error,
        )
    return TurnResult(
        user_message_id=turn.user_message_id,
        assistant_message_id=turn.assistant_message_id,
        text=turn.reply_text,
        ttft_ms=turn.ttft_ms,
        total_ms=turn.total_ms,
        prompt_tokens=turn.usage.prompt_tokens if turn.usage else None,
        completion_tokens=turn.completion_tokens,
        tokens_per_s=turn.tokens_per_s,
        trimmed_messages=turn.trimmed,
        cached=turn.cached,
        **_retrieval_fields(turn),
    )


def _retrieval_fields(turn: TurnContext) -> dict[str, Any]:
    retrieval = turn.notes.get("retrieval")
    if retrieval is None:
        return {}
    return {"citations": tuple(turn.notes.get("retrieval_used") or ()), "low_relevance": retrieval.low_relevance}


# -- rows the stages read -----------------------------------------------------------------------------------


def conversation_row(session: Session, conversation_id: object) -> Conversation:
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
        raise InvalidInput(f"A conversation id must be a whole number, not {conversation_id!r}")
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound(f"Unknown conversation id {conversation_id}")
    return conversation


def load_history(session: Session, conversation_id: int) -> list[PastMessage]:
    """The conversation so far, without failed or interrupted turns (their user messages got no reply) and without
    turns still running (theirs may never come)."""
    failed = select(TurnMetrics.user_message_id).where(
        TurnMetrics.conversation_id == conversation_id, TurnMetrics.error.is_not(None)
    )
    running = select(RunningTurn.user_message_id).where(RunningTurn.conversation_id == conversation_id)
    rows = session.execute(
        select(Message.role, Message.text, func.coalesce(Message.token_count, -1))
        .where(Message.conversation_id == conversation_id, Message.id.not_in(failed), Message.id.not_in(running))
        .order_by(Message.id)
    )
    return [PastMessage(role, text, tokens) for role, text, tokens in rows]


# -- a turn's start and end in the store ---------------------------------------------------------------------


def _store_start(turn: TurnContext) -> None:
    """Store the caller's message with the turn's running row, in one short transaction of its own."""
    conversation_id = turn.conversation_id
    session = turn.transaction()
    user = Message(
        conversation_id=conversation_id,
        role="user",
        text=turn.user_text,
        token_count=turn.user_tokens,
        created_at=turn.started_at,
    )
    session.add(user)
    try:
        session.flush()
    except IntegrityError as exc:  # the conversation was deleted since validate read it
        raise NotFound(f"Unknown conversation id {conversation_id}") from exc
    # Read after the first write, inside the write transaction (SQLite: after taking the write lock), and FOR SHARE
    # on PostgreSQL: `mark_ended` writes the conversation first and reads its running turns after, so either it
    # sees this turn, or it ended the conversation first and this sees that. A turn never starts in an ended
    # conversation; turns starting at once in one conversation do not wait on each other.
    status = session.scalar(
        select(Conversation.status).where(Conversation.id == conversation_id).with_for_update(read=True)
    )
    if status != "active":
        raise Conflict(f"Conversation {conversation_id} has ended; start a new one to go on")
    session.add(
        RunningTurn(
            user_message_id=user.id,
            conversation_id=conversation_id,
            backend=_backend_name(turn),
            model=turn.model,
            worker=worker_id(),
            started_at=turn.started_at,
        )
    )
    turn._commit()
    turn.user_message_id = user.id


def _backend_name(turn: TurnContext) -> str:
    return turn.backend.name if turn.backend is not None else ""


def _claim(session: Session, turn: TurnContext) -> None:
    """Take the turn's running row, so this stream alone stores its end; raise when someone else stored it."""
    conversation_id = turn.conversation_id
    if _delete_running(session, turn.user_message_id):  # type: ignore[arg-type]
        return
    status = session.scalar(select(Conversation.status).where(Conversation.id == conversation_id))
    if status is None:
        raise NotFound(f"Conversation {conversation_id} was deleted while the reply streamed")
    if status != "active":
        raise TurnAlreadyEnded(f"Conversation {conversation_id} ended while the reply streamed")
    stored = session.scalar(select(TurnMetrics.error).where(TurnMetrics.user_message_id == turn.user_message_id))
    raise TurnAlreadyEnded(f"Conversation {conversation_id}: this turn was already stored as {stored or 'ended'}")


def _delete_running(session: Session, user_message_id: int) -> bool:
    """Delete one running row; False when it was gone. Two deleting at once (a stream storing its end, `mark_ended`,
    a reconciler) are serialised by the row's lock: exactly one of them gets True."""
    result = session.execute(
        delete(RunningTurn)
        .where(RunningTurn.user_message_id == user_message_id)
        .execution_options(synchronize_session=False)
    )
    return bool(result.rowcount)  # type: ignore[attr-defined]


def _end_running(session: Session, row: Any, error: str, at: datetime) -> bool:
    """Store a running turn's end as failed with `error` (no reply, no stage rows); False when it had ended."""
    if not _delete_running(session, row.user_message_id):
        return False
    session.add(
        TurnMetrics(
            conversation_id=row.conversation_id,
            user_message_id=row.user_message_id,
            assistant_message_id=None,
            backend=row.backend,
            model=row.model,
            trimmed_messages=0,
            error=error,
            created_at=at,
        )
    )
    return True


def _store_failed_end(turn: TurnContext) -> None:
    """Last resort when storing a turn's end failed: store it as failed without its stage rows, so it does not read
    as running. If this fails too, the running row stays, and `reconcile_turns` ends it once the process is gone."""
    if turn.user_message_id is None:
        return
    row = _RunningRow(turn.user_message_id, turn.conversation_id, _backend_name(turn), turn.model)
    try:
        with turn.store.session() as session:
            _end_running(session, row, (turn.error or "its end could not be stored")[:MAX_ERROR_CHARS], utcnow())
    except Exception:
        log.exception("Could not store the failure of turn %s; it stays running until reconciled", row.user_message_id)


@dataclass(frozen=True, slots=True)
class _RunningRow:
    user_message_id: int
    conversation_id: int
    backend: str
    model: str


_RUNNING_COLUMNS = (RunningTurn.user_message_id, RunningTurn.conversation_id, RunningTurn.backend, RunningTurn.model)


def interrupt_running_turns(session: Session, conversation_id: int, error: str = ENDED_WHILE_STREAMING) -> list[int]:
    """Store every running turn of a conversation as interrupted, in `session`; returns their user message ids.

    Used when a conversation ends: a stream still going finds its end stored and stores nothing more.
    """
    rows = session.execute(select(*_RUNNING_COLUMNS).where(RunningTurn.conversation_id == conversation_id)).all()
    now = utcnow()
    return [row.user_message_id for row in rows if _end_running(session, row, error, now)]


def reconcile_turns(store: Store, *, max_age: timedelta = TURN_MAX_AGE, now: datetime | None = None) -> list[int]:
    """Store as interrupted every running turn whose process is gone; returns their user message ids.

    The rule is report runs' (`why_dead`): at once when the process was on this host and no longer exists;
    otherwise once the turn is older than `max_age`. The running table holds only turns in flight, so this is
    cheap enough to run whenever a front end starts or a conversation is opened.
    """
    now = now or utcnow()
    ended: list[int] = []
    with store.session() as session:
        rows = session.execute(select(*_RUNNING_COLUMNS, RunningTurn.worker, RunningTurn.started_at)).all()
        for row in rows:
            reason = why_dead(row.worker, row.started_at, now, max_age, what="turn")
            # Stored at its start: when a dead process's turn ended is not known, and its start is when it last lived.
            if reason is not None and _end_running(session, row, reason, row.started_at):
                ended.append(row.user_message_id)
    return ended
