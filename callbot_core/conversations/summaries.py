"""Summaries of a finished conversation, written by the persona's own backend with a neutral prompt.

The short summary is two or three sentences (cut there if the model runs on). The full one is the backend's
account of the call followed by the call turn by turn: each caller message and the reply, quoted in brief. The
quotes are there because a small model cannot be asked for detail: SmolLM2-135M, asked for a longer, fuller
summary, wrote one sentence as short as the short summary (or the same one), dropped names and times, invented
opening hours, or looped on one line until its token limit. The turns keep what was said (names, dates, numbers)
exact, and make the full summary the longer one whatever the model writes.
"""

from __future__ import annotations

import re
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
    "You summarise phone conversations between a caller and a bot. Write a full account in one paragraph of four "
    "to six sentences: every request the caller made, how the bot answered each one, the details given (names, "
    "dates, times, numbers) and anything left open."
)
# The two requests differ in their last words too: a small model reads the end of the prompt more than the system.
SHORT_ASK = "Summary in two or three sentences:"
FULL_ASK = "Full account, four to six sentences:"
SHORT_PARAMS = GenerationParams(temperature=0.2, top_p=0.9, max_tokens=96, seed=7)
FULL_PARAMS = GenerationParams(temperature=0.2, top_p=0.9, max_tokens=320, seed=7)
SHORT_SENTENCES = 3
TURNS_HEADING = "Turn by turn:"
TURNS_SHOWN = 20  # the most recent turns; earlier ones are counted
QUOTE_CHARS = 200  # of each message, in the turn-by-turn part
NO_TURNS = "The conversation ended before the caller said anything."
# A sentence ends at . ! or ? before a space and a capital, unless the word is a title ("Dr. Patel").
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])")
_TITLES = ("Dr.", "Mr.", "Mrs.", "Ms.", "St.", "No.", "Prof.")


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


def _complete(llm: LLMBackend, model: str, system: str, transcript: str, ask: str, params: GenerationParams) -> str:
    messages = [
        ChatMessage("system", system),
        ChatMessage("user", f"Conversation:\n{transcript}\n\n{ask}"),
    ]
    text = "".join(t.text for t in llm.stream(messages, params, model=model)).strip()
    if not text:
        raise BackendError(f"{llm.name} model {model} returned an empty summary", backend=llm.name, where=llm.where)
    return text


def _first_sentences(text: str, count: int) -> str:
    """`text` up to the end of its `count`th sentence."""
    ends = 0
    for match in _SENTENCE_END.finditer(text):
        if text[: match.start()].endswith(_TITLES):
            continue
        ends += 1
        if ends == count:
            return text[: match.start()]
    return text


def _quote(text: str) -> str:
    """A message on one line, cut at QUOTE_CHARS."""
    flat = " ".join(text.split())
    return flat if len(flat) <= QUOTE_CHARS else flat[: QUOTE_CHARS - 1].rstrip() + "…"


def turn_by_turn(history: Sequence[PastMessage], bot_name: str) -> str:
    """Each caller message with the reply it got, one numbered line each, the most recent TURNS_SHOWN of them."""
    messages = [m for m in history if m.role != "system"]
    turns = [
        (m.text, messages[i + 1].text if i + 1 < len(messages) and messages[i + 1].role == "assistant" else None)
        for i, m in enumerate(messages)
        if m.role == "user"
    ]
    lines = [TURNS_HEADING, ""]
    if len(turns) > TURNS_SHOWN:
        lines.append(f"({len(turns) - TURNS_SHOWN} earlier turns left out)")
    first = max(0, len(turns) - TURNS_SHOWN)
    for number, (said, reply) in enumerate(turns[first:], start=first + 1):
        answer = _quote(reply) if reply is not None else "(no reply)"
        lines.append(f"{number}. Caller: {_quote(said)} → {bot_name}: {answer}")
    return "\n".join(lines)


def summarise_transcript(llm: LLMBackend, model: str, bot_name: str, history: Sequence[PastMessage]) -> SummaryTexts:
    if not any(m.role == "user" for m in history):
        return SummaryTexts(NO_TURNS, NO_TURNS)
    lines = transcript_lines(history, bot_name)
    window = llm.context_window(model)
    fixed = llm.count_tokens(FULL_PROMPT, model) + llm.count_tokens(FULL_ASK, model) + 4 * PER_MESSAGE_OVERHEAD
    short = _complete(
        llm,
        model,
        SHORT_PROMPT,
        _fit(lines, llm, model, window - fixed - SHORT_PARAMS.max_tokens),
        SHORT_ASK,
        SHORT_PARAMS,
    )
    account = _complete(
        llm,
        model,
        FULL_PROMPT,
        _fit(lines, llm, model, window - fixed - FULL_PARAMS.max_tokens),
        FULL_ASK,
        FULL_PARAMS,
    )
    return SummaryTexts(_first_sentences(short, SHORT_SENTENCES), f"{account}\n\n{turn_by_turn(history, bot_name)}")
