"""Summaries of a finished conversation, written by the persona's own backend with a neutral prompt."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, LLMBackend
from callbot_core.conversations.prompt import PER_MESSAGE_OVERHEAD, PastMessage
from callbot_core.errors import BackendError

# Neutral on purpose: the summariser must not inherit the persona's voice or goals.
SHORT_PROMPT = (
    "You summarise phone conversations between a caller and a bot. "
    "Write two or three plain sentences: what the caller wanted and how the call ended."
)
FULL_PROMPT = (
    "You summarise phone conversations between a caller and a bot. Write a complete summary: "
    "the caller's requests, the bot's answers, any details given (names, dates, numbers) and open questions."
)
SHORT_PARAMS = GenerationParams(temperature=0.2, top_p=0.9, max_tokens=96, seed=7)
FULL_PARAMS = GenerationParams(temperature=0.2, top_p=0.9, max_tokens=320, seed=7)
NO_TURNS = "The conversation ended before the caller said anything."


@dataclass(frozen=True, slots=True)
class SummaryTexts:
    short: str
    full: str


def transcript_lines(history: Sequence[PastMessage], bot_name: str) -> list[str]:
    return [f"{'Caller' if m.role == 'user' else bot_name}: {m.text}" for m in history if m.role != "system"]


def _fit(lines: list[str], llm: LLMBackend, model: str, budget: int) -> str:
    """The transcript's most recent lines that fit `budget` tokens, marking what was left out."""
    kept: list[str] = []
    used = 0
    for line in reversed(lines):
        cost = llm.count_tokens(line, model) + 1
        if used + cost > budget:
            break
        kept.append(line)
        used += cost
    kept.reverse()
    if len(kept) < len(lines):
        kept.insert(0, f"[{len(lines) - len(kept)} earlier lines left out]")
    return "\n".join(kept)


def _complete(llm: LLMBackend, model: str, system: str, transcript: str, params: GenerationParams) -> str:
    messages = [
        ChatMessage("system", system),
        ChatMessage("user", f"Conversation:\n{transcript}\n\nSummary:"),
    ]
    text = "".join(t.text for t in llm.stream(messages, params, model=model)).strip()
    if not text:
        raise BackendError(f"{llm.name} model {model} returned an empty summary", backend=llm.name, where=llm.where)
    return text


def summarise_transcript(llm: LLMBackend, model: str, bot_name: str, history: Sequence[PastMessage]) -> SummaryTexts:
    if not any(m.role == "user" for m in history):
        return SummaryTexts(NO_TURNS, NO_TURNS)
    lines = transcript_lines(history, bot_name)
    window = llm.context_window(model)
    fixed = llm.count_tokens(FULL_PROMPT, model) + 4 * PER_MESSAGE_OVERHEAD
    short = _complete(
        llm,
        model,
        SHORT_PROMPT,
        _fit(lines, llm, model, window - fixed - SHORT_PARAMS.max_tokens),
        SHORT_PARAMS,
    )
    full = _complete(
        llm, model, FULL_PROMPT, _fit(lines, llm, model, window - fixed - FULL_PARAMS.max_tokens), FULL_PARAMS
    )
    return SummaryTexts(short, full)
