"""Fitting history into the context window: oldest turns go first, the system prompt stays."""

from __future__ import annotations

import pytest

from callbot_core.conversations.prompt import PER_MESSAGE_OVERHEAD, PastMessage, build_prompt
from callbot_core.errors import InvalidInput


def _history(n_pairs: int, tokens: int = 10) -> list[PastMessage]:
    out = [PastMessage("assistant", "greeting", tokens)]
    for i in range(n_pairs):
        out += [PastMessage("user", f"q{i}", tokens), PastMessage("assistant", f"a{i}", tokens)]
    return out


def test_everything_fits() -> None:
    messages, dropped = build_prompt("sys", 5, _history(2), "now", 3, context_window=1000, reply_tokens=100)
    assert dropped == 0
    assert [m.role for m in messages] == ["system", "assistant", "user", "assistant", "user", "assistant", "user"]
    assert messages[0].content == "sys" and messages[-1].content == "now"


def test_oldest_turns_are_dropped_first_and_system_prompt_kept() -> None:
    cost = 10 + PER_MESSAGE_OVERHEAD
    fixed = 5 + 3 + 2 * PER_MESSAGE_OVERHEAD
    # Room for exactly three history messages.
    window = 100 + fixed + 3 * cost
    messages, dropped = build_prompt("sys", 5, _history(3), "now", 3, context_window=window, reply_tokens=100)
    contents = [m.content for m in messages]
    assert contents[0] == "sys"
    assert contents[-1] == "now"
    # The newest three are a1, q2, a2; a1 would open the window on a reply, so it goes too.
    assert contents[1:-1] == ["q2", "a2"]
    assert dropped == 5


def test_a_message_that_cannot_fit_is_refused() -> None:
    with pytest.raises(InvalidInput, match="too long for the model's context window"):
        build_prompt("sys", 5, [], "huge", 5000, context_window=2048, reply_tokens=256)
