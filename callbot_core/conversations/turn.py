"""A turn as a list of stages (pipecat-style): validate → prompt → generate → persist, each timed by one clock.

Each stage reads and fills one `TurnContext`. A new capability (transcribe, retrieve, speak...) is a new stage
inserted in the list; the others do not change. Stages do the work; observers (`observers.py`) receive the events
and write the metrics.

How a turn runs:
- `ConversationService.send` runs the stages before the first streaming one (validate, prompt): everything that
  can refuse a turn does so there, raised by `send` itself, before anything is stored.
- Iterating the returned `TurnStream` runs the rest: generate streams text to the caller as it arrives, then
  persist writes the turn into one transaction, in which observers add their rows (`turn_metrics`,
  `turn_stages`); the transaction is committed after the last stage, so a turn is stored whole or not at all.
- When a stage fails (the backend is down, the reply is empty, the caller stops reading), the stages after it
  are skipped except those marked `after_failure` (persist), so the failure is stored, with the error on the
  failing stage's row; then the error is raised to the caller. A stage marked `after_failure` that fails
  itself rolls the turn back: there is nothing left to record it with.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any, ClassVar, Protocol

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from callbot_core.backends.llm import ChatMessage, GenerationParams, LLMBackend, Usage
from callbot_core.conversations.observers import ObserverList
from callbot_core.conversations.prompt import PastMessage, build_prompt
from callbot_core.conversations.timing import StageTiming, TurnClock
from callbot_core.conversations.validation import clean_message
from callbot_core.errors import BackendError, CallbotError, Conflict, InvalidInput, NotFound
from callbot_core.personas.fields import params_for
from callbot_core.personas.variables import default_variables, render_system_prompt
from callbot_core.store.models import Conversation, Message, PersonaVersion, TurnMetrics

if TYPE_CHECKING:
    from callbot_core.access.permissions import Actor
    from callbot_core.settings import Settings
    from callbot_core.store import Store

BackendResolver = Callable[[str | None], LLMBackend]

INTERRUPTED = "interrupted: the reply was not read to the end"


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


class EmptyReply(BackendError):
    """The model streamed nothing but whitespace: a failed turn, never an empty bot message."""

    stored_error = "the model returned an empty reply"

    def __init__(self, backend: LLMBackend, model: str) -> None:
        super().__init__(
            f"{backend.name} model {model} returned an empty reply", backend=backend.name, where=backend.where
        )


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
    # persist
    user_message_id: int | None = None
    assistant_message_id: int | None = None
    # The run: the first failure, each stage's timing, and what the caller gets.
    error: str | None = None
    timings: list[StageTiming] = field(default_factory=list)
    result: TurnResult | None = None
    notes: dict[str, Any] = field(default_factory=dict)
    _session: Session | None = field(default=None, repr=False)
    _transaction: ExitStack | None = field(default=None, repr=False)

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
        """The turn's one write transaction, opened on first use and committed after the last stage (with the
        observers' rows); rolled back if anything fails before that."""
        if self._session is None:
            stack = ExitStack()
            self._session = stack.enter_context(self.store.session())
            self._transaction = stack
        return self._session

    def _commit(self, observers: ObserverList) -> None:
        stack, session = self._transaction, self._session
        if stack is None or session is None:
            return
        self._transaction = self._session = None
        with stack:  # leaving it commits; an error in an observer's rows rolls everything back
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
    stages still run once an earlier stage has failed (persist: the failure is stored).
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
    """Add the user message and (when the turn succeeded) the bot message to the turn's transaction.

    A failed turn stores the user message only: partial reply text would read as if the bot had said it.
    """

    name = "persist"
    after_failure = True

    def run(self, turn: TurnContext) -> None:
        session = turn.transaction()
        conversation_id = turn.conversation_id
        if turn.error is None:
            _check_still_active(session, conversation_id)
        user = Message(
            conversation_id=conversation_id,
            role="user",
            text=turn.user_text,
            token_count=turn.user_tokens,
            created_at=turn.started_at,
        )
        session.add(user)
        bot = None
        if turn.error is None:
            bot = Message(
                conversation_id=conversation_id,
                role="assistant",
                text=turn.reply_text,
                token_count=turn.completion_tokens,
            )
            session.add(bot)
        session.flush()
        turn.user_message_id = user.id
        turn.assistant_message_id = bot.id if bot is not None else None


def default_stages() -> list[Stage]:
    return [Validate(), BuildPrompt(), Generate(), Persist()]


# -- running a turn -----------------------------------------------------------------------------------------


def start_turn(turn: TurnContext, stages: Sequence[Stage], observers: ObserverList) -> TurnStream:
    """Run the stages before the first streaming one; refusals are raised here, with nothing stored."""
    observers.notify("turn_started", turn)
    split = next((i for i, stage in enumerate(stages) if getattr(stage, "streams", False)), len(stages))
    for position, stage in enumerate(stages[:split]):
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
    return TurnStream(turn, list(enumerate(stages))[split:], observers)


class TurnStream:
    """The reply to one turn: iterate it for text as it streams; `result` is set once it is stored.

    Iterating is what runs the turn. If the backend fails, the failure is stored first and the
    `BackendError` is raised to the caller; abandoning the iteration stores the turn as interrupted.
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
            self._iter = self._run()
        return self._iter

    def __next__(self) -> str:
        return next(iter(self))

    def text(self) -> str:
        """Run the turn to the end and return the whole reply."""
        for _ in self:
            pass
        assert self.result is not None
        return self.result.text

    def _run(self) -> Iterator[str]:
        turn, observers = self.turn, self._observers
        failure: BaseException | None = None  # raised to the caller once the turn is stored
        try:
            for position, stage in self._stages:
                recorder = getattr(stage, "after_failure", False)
                if failure is not None and not recorder:
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
                except GeneratorExit as exc:  # the caller stopped reading
                    error, failure = INTERRUPTED, exc
                except Exception as exc:
                    error = error_text(exc)
                    if recorder:  # the stage that would record the failure failed: nothing can be stored
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
            observers.notify("turn_failed", turn, turn.error or error_text(exc))
            raise
        turn.result = _result(turn)
        if failure is None:
            observers.notify("turn_finished", turn)
            return
        observers.notify("turn_failed", turn, turn.error or error_text(failure))
        raise failure


def _begin(turn: TurnContext, position: int, stage: Stage, observers: ObserverList) -> StageTiming:
    timing = StageTiming(stage.name, position, turn.clock.now())
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
    if turn.user_message_id is None:  # no stage stored the turn
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
    )


# -- rows the stages read -----------------------------------------------------------------------------------


def conversation_row(session: Session, conversation_id: object) -> Conversation:
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
        raise InvalidInput(f"A conversation id must be a whole number, not {conversation_id!r}")
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound(f"Unknown conversation id {conversation_id}")
    return conversation


def load_history(session: Session, conversation_id: int) -> list[PastMessage]:
    """The conversation so far, without failed turns (their user messages got no reply)."""
    failed = select(TurnMetrics.user_message_id).where(
        TurnMetrics.conversation_id == conversation_id, TurnMetrics.error.is_not(None)
    )
    rows = session.execute(
        select(Message.role, Message.text, func.coalesce(Message.token_count, -1))
        .where(Message.conversation_id == conversation_id, Message.id.not_in(failed))
        .order_by(Message.id)
    )
    return [PastMessage(role, text, tokens) for role, text, tokens in rows]


def _check_still_active(session: Session, conversation_id: int) -> None:
    status = session.scalar(select(Conversation.status).where(Conversation.id == conversation_id))
    if status is None:
        raise NotFound(f"Conversation {conversation_id} was deleted while the reply streamed")
    if status != "active":
        raise Conflict(f"Conversation {conversation_id} ended while the reply streamed")
