"""Fitting a conversation into a model's context window."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from callbot_core.backends.llm.base import ChatMessage
from callbot_core.errors import InvalidInput

# Chat templates wrap each message in role markers; a few tokens each, counted generously.
PER_MESSAGE_OVERHEAD = 6


@dataclass(frozen=True, slots=True)
class PastMessage:
    role: str
    text: str
    tokens: int


def build_prompt(
    system_prompt: str,
    system_tokens: int,
    history: Sequence[PastMessage],
    user_text: str,
    user_tokens: int,
    *,
    context_window: int,
    reply_tokens: int,
) -> tuple[list[ChatMessage], int]:
    """System prompt + as much recent history as fits + the new user turn.

    Oldest turns are dropped first; the system prompt and the new turn are always kept. Returns the
    messages and how many history messages were dropped.
    """
    budget = context_window - reply_tokens
    fixed = system_tokens + user_tokens + 2 * PER_MESSAGE_OVERHEAD
    if fixed > budget:
        raise InvalidInput(
            f"The message is too long for the model's context window: the system prompt and this message "
            f"take about {fixed} tokens, the window is {context_window} with {reply_tokens} kept for the reply"
        )
    kept: list[PastMessage] = []
    used = fixed
    for past in reversed(history):
        cost = past.tokens + PER_MESSAGE_OVERHEAD
        if used + cost > budget:
            break
        kept.append(past)
        used += cost
    kept.reverse()
    # Starting the kept history on an assistant message after a dropped user message reads oddly to
    # a model; drop it too so the window opens on a user turn (or the greeting when nothing was dropped).
    dropped = len(history) - len(kept)
    if dropped and kept and kept[0].role == "assistant":
        kept = kept[1:]
        dropped += 1
    messages = [ChatMessage("system", system_prompt)] if system_prompt else []
    messages.extend(ChatMessage(m.role, m.text) for m in kept)  # type: ignore[arg-type]
    messages.append(ChatMessage("user", user_text))
    return messages, dropped
