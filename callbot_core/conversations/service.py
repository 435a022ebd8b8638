"""The conversation service: start a conversation, stream turns, end it with summaries.

Every front end (CLI, Streamlit, API) goes through here. A turn is validated before anything is
stored, streamed token by token, and persisted in one transaction: user message, assistant message
and its turn_metrics row; a failed turn stores the user message and a metrics row with the error.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from datetime import datetime

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from callbot_core.backends.llm import GenerationParams, LLMBackend, Usage, get_backend
from callbot_core.conversations.prompt import PastMessage, build_prompt
from callbot_core.conversations.summaries import summarise_transcript
from callbot_core.conversations.timing import TurnTimer
from callbot_core.conversations.validation import clean_message, clean_variables
from callbot_core.errors import BackendError, CallbotError, Conflict, InvalidInput, NotFound
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.versions import default_variables, render_system_prompt
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store
from callbot_core.store.models import CHANNELS, Conversation, Message, PersonaVersion, TurnMetrics, utcnow

BackendResolver = Callable[[str | None], LLMBackend]


@dataclass(frozen=True, slots=True)
class ConversationInfo:
    id: int
    persona_key: str
    persona_version: int
    persona_version_id: int
    backend: str
    model: str
    channel: str
    greeting: str
    status: str


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


@dataclass(frozen=True, slots=True)
class Summaries:
    short: str
    full: str


@dataclass(slots=True)
class _TurnPlan:
    conversation_id: int
    user_text: str
    user_tokens: int
    backend: LLMBackend
    model: str
    params: GenerationParams
    messages: list
    trimmed: int
    started_at: datetime


class TurnStream:
    """The reply to one turn: iterate it for text as it streams; `result` is set once it is stored.

    Iterating is what runs the turn. If the backend fails, the failure is stored first and the
    `BackendError` is raised to the caller; abandoning the iteration stores the turn as interrupted.
    """

    def __init__(self, service: ConversationService, plan: _TurnPlan) -> None:
        self._service = service
        self._plan = plan
        self.result: TurnResult | None = None
        self._iter: Iterator[str] | None = None

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
        plan = self._plan
        timer = TurnTimer()
        parts: list[str] = []
        usage: Usage | None = None
        timer.start()
        stream = plan.backend.stream(plan.messages, plan.params, model=plan.model)
        try:
            for token in stream:
                if token.usage is not None:
                    usage = token.usage
                if token.text:
                    timer.token()
                    parts.append(token.text)
                    yield token.text
            timer.finish()
        except GeneratorExit:
            timer.finish()
            self.result = self._service._store_failure(plan, timer, "interrupted: the reply was not read to the end")
            raise
        except CallbotError as exc:
            timer.finish()
            self.result = self._service._store_failure(plan, timer, str(exc))
            raise
        except Exception as exc:  # a bug in a backend must still leave a recorded, consistent turn
            timer.finish()
            self.result = self._service._store_failure(plan, timer, f"{type(exc).__name__}: {exc}")
            raise
        finally:
            close = getattr(stream, "close", None)
            if close is not None:
                close()
        text = "".join(parts).strip()
        if not text:
            self.result = self._service._store_failure(plan, timer, "the model returned an empty reply")
            raise BackendError(
                f"{plan.backend.name} model {plan.model} returned an empty reply",
                backend=plan.backend.name,
                where=plan.backend.where,
            )
        self.result = self._service._store_success(plan, timer, text, usage)


class ConversationService:
    def __init__(
        self,
        store: Store | None = None,
        settings: Settings | None = None,
        backends: BackendResolver | None = None,
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store or open_store(self.settings)
        self._backends = backends or (lambda name: get_backend(name, self.settings))

    def backend(self, name: str | None = None) -> LLMBackend:
        return self._backends(name)

    # -- starting -------------------------------------------------------------------------------

    def start(
        self,
        persona: str,
        *,
        user_id: int | None = None,
        backend: str | None = None,
        model: str | None = None,
        channel: str = "text",
        variables: dict[str, str] | None = None,
    ) -> ConversationInfo:
        """Open a conversation with `persona` (`key` or `key@version`); the greeting is its first message.

        `variables` fill `{{name}}` placeholders in the system prompt (caller_name, today, persona_name...).
        """
        if channel not in CHANNELS:
            raise InvalidInput(f"Channel {channel!r} is not valid; channels: {', '.join(CHANNELS)}")
        given = clean_variables(variables)
        with self.store.session() as session:
            version = get_persona_version(session, persona)
            llm = self.backend(backend or version.backend)
            chosen_model = model or version.model or llm.default_model
            conversation = Conversation(
                user_id=user_id,
                persona_version_id=version.id,
                backend=llm.name,
                model=chosen_model,
                channel=channel,
                status="active",
                variables={**default_variables(version.persona.name), **given},
            )
            session.add(conversation)
            session.flush()
            if version.greeting:
                session.add(
                    Message(
                        conversation_id=conversation.id,
                        role="assistant",
                        text=version.greeting,
                        token_count=None,
                    )
                )
            return ConversationInfo(
                id=conversation.id,
                persona_key=version.persona.key,
                persona_version=version.version,
                persona_version_id=version.id,
                backend=llm.name,
                model=chosen_model,
                channel=channel,
                greeting=version.greeting,
                status="active",
            )

    # -- turns ----------------------------------------------------------------------------------

    def send(self, conversation_id: int, text: object, *, params: GenerationParams | None = None) -> TurnStream:
        """Validate a user turn and prepare it; iterate the returned stream to run it.

        Everything that can be refused is refused here, before anything is stored.
        """
        user_text = clean_message(text, max_chars=self.settings.max_message_chars)
        with self.store.session() as session:
            conversation = _get_conversation(session, conversation_id)
            if conversation.status != "active":
                raise Conflict(f"Conversation {conversation_id} has ended; start a new one to go on")
            version = conversation.persona_version
            llm = self.backend(conversation.backend)
            gen = params or GenerationParams(
                temperature=version.temperature,
                top_p=version.top_p,
                max_tokens=version.max_tokens,
                stop=tuple(version.stop_words or ()),
            )
            history = _load_history(session, conversation_id)
            # Conversations from before variables were stored (NULL) get today's defaults, as they always did.
            variables = {**default_variables(version.persona.name), **(conversation.variables or {})}
            system_prompt = render_system_prompt(version.system_prompt, variables)
        user_tokens = llm.count_tokens(user_text, conversation.model)
        history = [
            h if h.tokens >= 0 else replace(h, tokens=llm.count_tokens(h.text, conversation.model)) for h in history
        ]
        messages, trimmed = build_prompt(
            system_prompt,
            llm.count_tokens(system_prompt, conversation.model),
            history,
            user_text,
            user_tokens,
            context_window=llm.context_window(conversation.model),
            reply_tokens=gen.max_tokens,
        )
        plan = _TurnPlan(
            conversation_id=conversation_id,
            user_text=user_text,
            user_tokens=user_tokens,
            backend=llm,
            model=conversation.model,
            params=gen,
            messages=messages,
            trimmed=trimmed,
            started_at=utcnow(),
        )
        return TurnStream(self, plan)

    def _store_success(self, plan: _TurnPlan, timer: TurnTimer, text: str, usage: Usage | None) -> TurnResult:
        usage = usage or Usage()
        completion = usage.completion_tokens if usage.completion_tokens is not None else timer.tokens
        tps = timer.tokens_per_s(completion)
        with self.store.session() as session:
            self._check_still_active(session, plan.conversation_id)
            user_msg = _user_message(plan)
            bot_msg = Message(conversation_id=plan.conversation_id, role="assistant", text=text, token_count=completion)
            session.add_all([user_msg, bot_msg])
            session.flush()
            session.add(
                TurnMetrics(
                    conversation_id=plan.conversation_id,
                    user_message_id=user_msg.id,
                    assistant_message_id=bot_msg.id,
                    backend=plan.backend.name,
                    model=plan.model,
                    ttft_ms=timer.ttft_ms,
                    total_ms=timer.total_ms,
                    prompt_tokens=usage.prompt_tokens,
                    completion_tokens=completion,
                    tokens_per_s=tps,
                    backend_prompt_eval_ms=usage.backend_prompt_eval_ms,
                    backend_eval_ms=usage.backend_eval_ms,
                    backend_load_ms=usage.backend_load_ms,
                    backend_total_ms=usage.backend_total_ms,
                    trimmed_messages=plan.trimmed,
                )
            )
            return TurnResult(
                user_message_id=user_msg.id,
                assistant_message_id=bot_msg.id,
                text=text,
                ttft_ms=timer.ttft_ms,
                total_ms=timer.total_ms,
                prompt_tokens=usage.prompt_tokens,
                completion_tokens=completion,
                tokens_per_s=tps,
                trimmed_messages=plan.trimmed,
            )

    def _store_failure(self, plan: _TurnPlan, timer: TurnTimer, error: str) -> TurnResult:
        """A failed turn: the user message and a metrics row with the error; no assistant message.

        Partial reply text is deliberately dropped: storing it would read as if the bot had said it.
        """
        with self.store.session() as session:
            user_msg = _user_message(plan)
            session.add(user_msg)
            session.flush()
            session.add(
                TurnMetrics(
                    conversation_id=plan.conversation_id,
                    user_message_id=user_msg.id,
                    assistant_message_id=None,
                    backend=plan.backend.name,
                    model=plan.model,
                    ttft_ms=timer.ttft_ms,
                    total_ms=timer.total_ms,
                    completion_tokens=None,
                    trimmed_messages=plan.trimmed,
                    error=error[:4000],
                )
            )
        return TurnResult(
            user_message_id=user_msg.id,
            assistant_message_id=None,
            text="",
            ttft_ms=timer.ttft_ms,
            total_ms=timer.total_ms,
            prompt_tokens=None,
            completion_tokens=None,
            tokens_per_s=None,
            trimmed_messages=plan.trimmed,
            error=error,
        )

    @staticmethod
    def _check_still_active(session: Session, conversation_id: int) -> None:
        status = session.scalar(select(Conversation.status).where(Conversation.id == conversation_id))
        if status is None:
            raise NotFound(f"Conversation {conversation_id} was deleted while the reply streamed")
        if status != "active":
            raise Conflict(f"Conversation {conversation_id} ended while the reply streamed")

    # -- ending ---------------------------------------------------------------------------------

    def end(self, conversation_id: int) -> Summaries:
        """End the conversation and store its short and full summaries.

        The conversation is ended even if the summariser fails (the call is over); the error is
        raised so the caller can say so, and `summarise` can be run again later.
        """
        with self.store.session() as session:
            conversation = _get_conversation(session, conversation_id)
            if conversation.status == "active":
                conversation.status = "ended"
                conversation.ended_at = utcnow()
        return self.summarise(conversation_id)

    def summarise(self, conversation_id: int) -> Summaries:
        with self.store.session() as session:
            conversation = _get_conversation(session, conversation_id)
            version: PersonaVersion = conversation.persona_version
            persona_name = version.persona.name
            history = _load_history(session, conversation_id)
            backend_name, model = conversation.backend, conversation.model
        llm = self.backend(backend_name)
        summaries = summarise_transcript(llm, model, persona_name, history)
        with self.store.session() as session:
            conversation = _get_conversation(session, conversation_id)
            conversation.summary_short = summaries.short
            conversation.summary_full = summaries.full
        return Summaries(summaries.short, summaries.full)


def _user_message(plan: _TurnPlan) -> Message:
    # Stamped with the turn's start, not its commit: the caller spoke before the bot answered.
    return Message(
        conversation_id=plan.conversation_id,
        role="user",
        text=plan.user_text,
        token_count=plan.user_tokens,
        created_at=plan.started_at,
    )


def _get_conversation(session: Session, conversation_id: object) -> Conversation:
    if isinstance(conversation_id, bool) or not isinstance(conversation_id, int):
        raise InvalidInput(f"A conversation id must be a whole number, not {conversation_id!r}")
    conversation = session.get(Conversation, conversation_id)
    if conversation is None:
        raise NotFound(f"Unknown conversation id {conversation_id}")
    return conversation


def _load_history(session: Session, conversation_id: int) -> list[PastMessage]:
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
