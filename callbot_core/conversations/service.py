"""The conversation service: start a conversation, stream turns, end it with summaries.

Every front end (CLI, Streamlit, API) goes through here, as an actor who must be allowed to chat. A turn runs as
a list of stages (`turn.py`: validate, prompt, generate, persist), each timed by one clock; observers
(`observers.py`) receive its events, and the store observer writes `turn_metrics` and `turn_stages`. A turn is
validated before anything is stored; the caller's message is then stored at once, marked running; the reply
streams token by token, and the turn's end is stored in one transaction: assistant message, metrics and stage
rows. A failed turn stores its metrics with the error; one that does not finish (the stream closed or dropped,
the conversation ended, the process killed) is stored as interrupted.

When the store is made honest about turns whose process died (`reconcile_turns`): whenever a service is built
(every front end builds one as it starts: the CLI's commands, the app's process, the API) and whenever it opens
a conversation, so a killed `callbot chat` is reconciled by the next thing that talks to a persona.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from callbot_core.access.permissions import Actor, require, require_owner
from callbot_core.backends.llm import GenerationParams, LLMBackend, get_backend
from callbot_core.conversations.cache import cache_from, use_response_cache
from callbot_core.conversations.continuation import clean_earlier
from callbot_core.conversations.observers import ObserverList, StoreObserver, TurnObserver
from callbot_core.conversations.summaries import summarise_transcript
from callbot_core.conversations.turn import (
    BackendResolver,
    Stage,
    TurnContext,
    TurnResult,
    TurnStream,
    conversation_row,
    default_stages,
    interrupt_running_turns,
    load_history,
    reconcile_turns,
    start_turn,
)
from callbot_core.conversations.validation import clean_variables
from callbot_core.errors import InvalidInput
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.variables import default_variables
from callbot_core.settings import Settings, get_settings
from callbot_core.store import Store, open_store
from callbot_core.store.models import CHANNELS, Conversation, Message, PersonaVersion, utcnow

__all__ = [
    "ConversationInfo",
    "ConversationService",
    "Summaries",
    "TurnResult",
    "TurnStream",
    "mark_ended",
    "reconcile_turns",
]

log = logging.getLogger(__name__)


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
class Summaries:
    short: str
    full: str


def mark_ended(session: Session, conversation_id: int) -> bool:
    """End a conversation that is still active: the one place that says what ending is (status and time, and a
    reply still streaming stored as interrupted, with its caller's message).

    Returns False when it is gone or already ended. Summaries are separate (`ConversationService.summarise`):
    suite runs and simulated calls end without them.
    """
    conversation = session.get(Conversation, conversation_id)
    if conversation is None or conversation.status != "active":
        return False
    conversation.status = "ended"
    conversation.ended_at = utcnow()
    # Written before the running turns are read, so the write lock (SQLite) or the row's lock (PostgreSQL) is held
    # by then: a turn starting at this moment is either seen here or, reading the status after us, refused.
    session.flush()
    interrupt_running_turns(session, conversation_id)
    return True


class ConversationService:
    """Conversations and their turns. `stages` and `observers` shape every turn: the default stages are
    validate, retrieve (personas with documents only), prompt, generate, persist (`add_stage` inserts another); the
    store observer always comes first."""

    def __init__(
        self,
        store: Store | None = None,
        settings: Settings | None = None,
        backends: BackendResolver | None = None,
        *,
        stages: Sequence[Stage] | None = None,
        observers: Sequence[TurnObserver] = (),
    ) -> None:
        self.settings = settings or get_settings()
        self.store = store or open_store(self.settings)
        self._backends = backends or (lambda name: get_backend(name, self.settings))
        self.stages: list[Stage] = list(stages) if stages is not None else default_stages()
        # Imported here: knowledge builds on this package. Its observer stores which passages each turn used.
        from callbot_core.knowledge.stage import RetrievalObserver

        self.observers: list[TurnObserver] = [StoreObserver(), RetrievalObserver(), *observers]
        cache = cache_from(self.settings)  # opt-in: deterministic turns' replies from Redis (cache.py)
        if cache is not None:
            use_response_cache(self, cache)
        self._reconcile()

    def _reconcile(self) -> None:
        """Store as interrupted the turns whose process died (see the module docstring for when)."""
        try:
            reconcile_turns(self.store)
        except SQLAlchemyError as exc:  # an unreachable or unmigrated store fails the first real call, clearly
            log.warning("Could not reconcile running turns: %s", str(exc).splitlines()[0])

    def backend(self, name: str | None = None) -> LLMBackend:
        return self._backends(name)

    def add_stage(self, stage: Stage, *, before: str | None = None, after: str | None = None) -> None:
        """Insert `stage` before or after the stage of that name (at the end when neither is given)."""
        names = [s.name for s in self.stages]
        if stage.name in names:
            raise InvalidInput(f"A turn already has a stage named {stage.name!r}")
        if before is not None and after is not None:
            raise InvalidInput("Give before= or after=, not both")
        anchor = before if before is not None else after
        if anchor is None:
            self.stages.append(stage)
            return
        if anchor not in names:
            raise InvalidInput(f"No stage named {anchor!r}; stages: {', '.join(names)}")
        self.stages.insert(names.index(anchor) + (0 if before is not None else 1), stage)

    # -- starting -------------------------------------------------------------------------------

    def start(
        self,
        persona: str,
        *,
        actor: Actor,
        backend: str | None = None,
        model: str | None = None,
        channel: str = "text",
        variables: dict[str, str] | None = None,
        earlier: Sequence[tuple[str, str]] = (),
    ) -> ConversationInfo:
        """Open a conversation with `persona` (`key` or `key@version`) for `actor`; the greeting is its first message.

        `variables` fill `{{name}}` placeholders in the system prompt (caller_name, today, persona_name...).
        The conversation belongs to the actor's user (none for the command line's local operator) and, when the
        actor acts through an API key, remembers the key. `earlier` (role, text) messages, user or assistant, are
        stored after the greeting as the conversation's history (a client bringing a conversation held elsewhere);
        they get no turn metrics.
        """
        require(actor, "chat")
        if channel not in CHANNELS:
            raise InvalidInput(f"Channel {channel!r} is not valid; channels: {', '.join(CHANNELS)}")
        given = clean_variables(variables)
        history = clean_earlier(earlier, max_chars=self.settings.max_message_chars)
        self._reconcile()
        with self.store.session() as session:
            version = get_persona_version(session, persona)
            llm = self.backend(backend or version.backend)
            chosen_model = model or version.model or llm.default_model
            conversation = Conversation(
                user_id=getattr(actor, "id", None),
                persona_version_id=version.id,
                backend=llm.name,
                model=chosen_model,
                channel=channel,
                status="active",
                variables={**default_variables(version.persona.name), **given},
                api_key_id=getattr(actor, "key_id", None),
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
            session.add_all(Message(conversation_id=conversation.id, role=r, text=t) for r, t in history)
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

    def send(
        self, conversation_id: int, text: object, *, actor: Actor, params: GenerationParams | None = None
    ) -> TurnStream:
        """Validate a user turn and prepare it; iterate the returned stream to run it.

        Everything that can be refused is refused here, before anything is stored: the actor's permission,
        then the stages before generation (the message, the conversation's state, the prompt's size). Then the
        caller's message is stored, marked running. `params` replace the persona version's sampling for this turn.
        Read the stream to the end, or close it (`with service.send(...) as turn:`) so a turn cut short is
        stored as interrupted at once.
        """
        require(actor, "chat")
        turn = TurnContext(
            conversation_id=conversation_id,
            text=text,
            requested_params=params,
            actor=actor,
            store=self.store,
            settings=self.settings,
            backends=self._backends,
        )
        return start_turn(turn, list(self.stages), ObserverList(self.observers))

    # -- ending ---------------------------------------------------------------------------------

    def end(self, conversation_id: int, *, actor: Actor) -> Summaries:
        """End the conversation and store its short and full summaries.

        The conversation is ended even if the summariser fails (the call is over); the error is
        raised so the caller can say so, and `summarise` can be run again later. A reply still streaming is
        stored as interrupted (`mark_ended`).
        """
        require(actor, "chat")  # ending and summarising change the conversation, as a turn does
        with self.store.session() as session:
            # An unknown id is an error here, not a quiet no-op.
            owner = conversation_row(session, conversation_id).user_id
            require_owner(actor, owner, f"conversation {conversation_id}")
            ended = mark_ended(session, conversation_id)
        if ended:  # told once stored, before the summaries (a slow model call) are written
            ObserverList(self.observers).notify("conversation_ended", conversation_id)
        return self.summarise(conversation_id, actor=actor)

    def summarise(self, conversation_id: int, *, actor: Actor) -> Summaries:
        """(Re)write the short and full summaries of a conversation with its persona's backend."""
        require(actor, "chat")
        with self.store.session() as session:
            conversation = conversation_row(session, conversation_id)
            require_owner(actor, conversation.user_id, f"conversation {conversation_id}")
            version: PersonaVersion = conversation.persona_version
            persona_name = version.persona.name
            history = load_history(session, conversation_id)
            backend_name, model = conversation.backend, conversation.model
        llm = self.backend(backend_name)
        summaries = summarise_transcript(llm, model, persona_name, history)
        with self.store.session() as session:
            conversation = conversation_row(session, conversation_id)
            conversation.summary_short = summaries.short
            conversation.summary_full = summaries.full
        return Summaries(summaries.short, summaries.full)
