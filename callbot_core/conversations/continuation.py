"""Which stored conversation a client's message list continues, for clients that send the whole history with every
call (the OpenAI chat API does: `POST /v1/chat/completions`).

The rule, in order:
1. A conversation id is given (the API's `X-Conversation-Id` header): that conversation. It must be the caller's
   own (else `NotFound`, as for an unknown id: another user's ids are not revealed), active and talking to the same
   persona version (else `Conflict`). The client's earlier messages are not read: the stored ones are the history.
2. A user tag is given (the OpenAI `user` field): the caller's most recent active `api` conversation with that
   persona version and that tag (`variables["api_user"]`) is continued when its stored transcript equals the
   earlier messages (the request's messages before its last one). The greeting, which such a client never saw, is
   left out of the comparison on both sides; failed turns are not part of a transcript (the client got no reply).
3. Otherwise a new `api` conversation starts, with the tag in its variables, and the earlier messages are stored
   into it before the new turn (no turn metrics for them), so the prompt holds the history a client resent to a
   server that had not seen it.
A turn that is refused after a new conversation was opened for it leaves nothing behind: the conversation goes.
"""

from __future__ import annotations

import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from callbot_core.access.permissions import Actor, require
from callbot_core.backends.llm import GenerationParams
from callbot_core.conversations.prompt import PastMessage
from callbot_core.conversations.turn import TurnStream, conversation_row, load_history
from callbot_core.conversations.validation import clean_message, clean_variables
from callbot_core.errors import Conflict, InvalidInput, NotFound
from callbot_core.personas.fields import params_for
from callbot_core.personas.served import resolve_model
from callbot_core.store.models import Conversation, Message

if TYPE_CHECKING:
    from callbot_core.conversations.service import ConversationService
    from callbot_core.store import Store

API_CHANNEL = "api"
# The variable a conversation keeps its client's user tag in (also usable in a prompt as {{api_user}}).
USER_TAG = "api_user"
EARLIER_ROLES = ("user", "assistant")
# OpenAI's own limit on stop sequences; a longer list is a client's mistake.
MAX_STOP = 4
MAX_STOP_CHARS = 200


@dataclass(frozen=True, slots=True)
class Continued:
    """A turn under way: `stream` yields its reply (close it, or read it to the end)."""

    conversation_id: int
    new: bool  # a conversation started for this turn
    ref: str  # the persona version, `key@N`
    params: GenerationParams
    stream: TurnStream


def clean_earlier(messages: Sequence[tuple[str, str]], *, max_chars: int) -> list[tuple[str, str]]:
    """Earlier (role, text) messages a client brings, cleaned as a turn's message is; `InvalidInput` naming the
    first bad one (counted from 1)."""
    out: list[tuple[str, str]] = []
    for number, (role, text) in enumerate(messages, start=1):
        if role not in EARLIER_ROLES:
            raise InvalidInput(f"Earlier message {number} has role {role!r}: only user and assistant messages are kept")
        try:
            out.append((role, clean_message(text, max_chars=max_chars)))
        except InvalidInput as exc:
            raise InvalidInput(f"Earlier message {number} ({role}): {exc}") from None
    return out


def clean_stop(stop: str | Sequence[str] | None) -> tuple[str, ...]:
    """Stop sequences as a client gives them (one string or a list); `InvalidInput` naming what is wrong."""
    if stop is None:
        return ()
    items = [stop] if isinstance(stop, str) else list(stop)
    if len(items) > MAX_STOP:
        raise InvalidInput(f"stop takes at most {MAX_STOP} sequences, not {len(items)}")
    for item in items:
        if not isinstance(item, str) or not item or len(item) > MAX_STOP_CHARS:
            raise InvalidInput(f"Each stop sequence must be text of 1 to {MAX_STOP_CHARS} characters, not {item!r:.60}")
    return tuple(items)


def _canonical(text: str) -> str:
    # What a client sends back may differ from what was stored in ways no reader sees: a streamed reply's leading
    # space (stored stripped), a \r\n, another Unicode normal form.
    return unicodedata.normalize("NFC", text.replace("\r\n", "\n").replace("\r", "\n")).strip()


def without_greeting(messages: Sequence[tuple[str, str]], greeting: str) -> list[tuple[str, str]]:
    """`messages` without a leading assistant message that is the persona version's greeting."""
    if greeting and messages and messages[0][0] == "assistant" and _canonical(messages[0][1]) == _canonical(greeting):
        return list(messages[1:])
    return list(messages)


def same_transcript(stored: Sequence[PastMessage], earlier: Sequence[tuple[str, str]], greeting: str) -> bool:
    """Whether a stored conversation (as `load_history` reads it) is what the client holds, greetings aside."""
    ours = without_greeting([(m.role, m.text) for m in stored], greeting)
    theirs = without_greeting(earlier, greeting)
    return len(ours) == len(theirs) and all(
        a_role == b_role and _canonical(a_text) == _canonical(b_text)
        for (a_role, a_text), (b_role, b_text) in zip(ours, theirs, strict=True)
    )


def own_conversation(session: Session, conversation_id: int, *, actor: Actor, persona_version_id: int) -> int:
    """Rule 1: the caller's own active conversation with this persona version, or NotFound / Conflict."""
    conversation = conversation_row(session, conversation_id)
    if conversation.user_id != getattr(actor, "id", None):
        raise NotFound(f"Unknown conversation id {conversation_id}")
    if conversation.status != "active":
        raise Conflict(f"Conversation {conversation_id} has ended; leave out the conversation id to start a new one")
    if conversation.persona_version_id != persona_version_id:
        version = conversation.persona_version
        raise Conflict(
            f"Conversation {conversation_id} talks to {version.persona.key}@{version.version}: ask that model, or "
            "leave out the conversation id to start a new conversation"
        )
    return conversation.id


def matching_conversation(
    session: Session, *, actor: Actor, persona_version_id: int, user_tag: str, earlier: Sequence[tuple[str, str]],
    greeting: str,
) -> int | None:  # fmt: skip
    """Rule 2: the caller's latest active api conversation with this version and tag, if the client holds its
    transcript; None otherwise."""
    user_id = getattr(actor, "id", None)
    latest = session.scalar(
        select(Conversation.id)
        .where(
            Conversation.user_id.is_(None) if user_id is None else Conversation.user_id == user_id,
            Conversation.persona_version_id == persona_version_id,
            Conversation.channel == API_CHANNEL,
            Conversation.status == "active",
            Conversation.variables[USER_TAG].as_string() == user_tag,
        )
        .order_by(Conversation.id.desc())
        .limit(1)
    )
    if latest is None or not same_transcript(load_history(session, latest), earlier, greeting):
        return None
    return latest


def discard_new(store: Store, conversation_id: int) -> None:
    """Remove a conversation opened for a turn that was then refused: it holds only a greeting and imported messages."""
    with store.session() as session:
        session.execute(delete(Message).where(Message.conversation_id == conversation_id))
        session.execute(delete(Conversation).where(Conversation.id == conversation_id))


def send_continuing(
    service: ConversationService,
    model: str,
    earlier: Sequence[tuple[str, str]],
    text: str,
    *,
    actor: Actor,
    overrides: Mapping[str, Any] | None = None,
    stop: str | Sequence[str] | None = None,
    conversation_id: int | None = None,
    user_tag: str | None = None,
) -> Continued:
    """Send `text` as a turn to the persona served as `model` (`served.py`), in the conversation the rule above picks.

    `overrides` (temperature, top_p, max_tokens, seed) and `stop` (added to the version's own stop words) shape this
    turn's sampling. Everything that can be refused is refused before anything is stored.
    """
    require(actor, "chat")
    max_chars = service.settings.max_message_chars
    earlier = clean_earlier(earlier, max_chars=max_chars)
    text = clean_message(text, max_chars=max_chars)
    extra_stop = clean_stop(stop)
    tag = clean_variables({USER_TAG: user_tag})[USER_TAG] if user_tag else ""
    with service.store.session() as session:
        version = resolve_model(session, model)
        ref = f"{version.persona.key}@{version.version}"
        params = params_for(version, overrides)
        params = replace(params, stop=tuple(dict.fromkeys((*params.stop, *extra_stop))))
        if conversation_id is not None:
            found: int | None = own_conversation(session, conversation_id, actor=actor, persona_version_id=version.id)
        elif tag:
            found = matching_conversation(
                session, actor=actor, persona_version_id=version.id, user_tag=tag, earlier=earlier,
                greeting=version.greeting,
            )  # fmt: skip
        else:
            found = None
        greeting = version.greeting
    if found is not None:
        return Continued(found, False, ref, params, service.send(found, text, actor=actor, params=params))
    info = service.start(
        ref, actor=actor, channel=API_CHANNEL, variables={USER_TAG: tag} if tag else None,
        earlier=without_greeting(earlier, greeting),
    )  # fmt: skip
    try:
        stream = service.send(info.id, text, actor=actor, params=params)
    except BaseException:
        discard_new(service.store, info.id)
        raise
    return Continued(info.id, True, ref, params, stream)
