"""Simulated callers: an LLM plays a caller with a goal and a personality and phones a bot persona.

The caller model gets its own prompt (the goal and the personality) and sees the transcript from the
caller's side: the bot's lines are the "user" messages, its own earlier lines its "assistant" ones.
Each exchange is one stored turn of a conversation with channel "simulated", so simulated calls sit
next to real transcripts in every list and analytics view.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from callbot_core.access.permissions import Actor, require
from callbot_core.backends.llm import ChatMessage, GenerationParams, LLMBackend
from callbot_core.conversations.service import ConversationService, TurnResult, mark_ended
from callbot_core.errors import BackendError, CallbotError, InvalidInput

MAX_TURNS = 20
_PREFIX = re.compile(
    r"^\s*(?:\*\*)?(?:caller|customer|user|client|me|you|human)(?:\*\*)?\s*[:\-–]\s*(?:\*\*)?\s*", re.IGNORECASE
)
_BOT_LINE = re.compile(
    r"\n\s*(?:\*\*)?(?:bot|assistant|agent|receptionist|ai|operator)(?:\*\*)?\s*:.*", re.IGNORECASE | re.DOTALL
)


@dataclass(frozen=True, slots=True)
class CallerPersona:
    goal: str
    personality: str = "polite"
    turns: int = 3
    opening: str | None = None

    def validate(self) -> None:
        if not isinstance(self.goal, str) or not self.goal.strip():
            raise InvalidInput("A simulated caller needs a goal (what the caller wants from the call)")
        if isinstance(self.turns, bool) or not isinstance(self.turns, int) or not 1 <= self.turns <= MAX_TURNS:
            raise InvalidInput(f"turns must be a whole number between 1 and {MAX_TURNS}, not {self.turns!r}")
        if not isinstance(self.personality, str) or not self.personality.strip():
            raise InvalidInput("personality must be non-empty text, e.g. 'polite' or 'impatient'")


@dataclass(frozen=True, slots=True)
class SimulatedTurn:
    index: int
    caller: str
    bot: str
    result: TurnResult


@dataclass(slots=True)
class SimulationResult:
    conversation_id: int
    greeting: str
    turns: list[SimulatedTurn] = field(default_factory=list)
    error: str | None = None

    @property
    def transcript(self) -> list[tuple[str, str]]:
        lines = [("bot", self.greeting)] if self.greeting else []
        for t in self.turns:
            lines += [("caller", t.caller), ("bot", t.bot)]
        return lines

    @property
    def metrics(self) -> list[dict[str, float | int | str | None]]:
        return [
            {
                "turn": t.index + 1,
                "ttft_ms": t.result.ttft_ms,
                "total_ms": t.result.total_ms,
                "tokens_per_s": t.result.tokens_per_s,
                "words": len(t.bot.split()),
                "error": t.result.error,
            }
            for t in self.turns
        ]


def caller_prompt(caller: CallerPersona) -> str:
    return (
        "You are a person phoning a business. You are the caller, not the assistant.\n"
        f"Your goal for this call: {caller.goal.strip()}\n"
        f"Your personality: {caller.personality.strip()}.\n"
        "Reply with exactly one short thing the caller says next (one or two sentences), "
        "with no name or label in front and no stage directions."
    )


def clean_caller_text(text: str) -> str:
    """One caller utterance: no role prefix, no invented bot reply after it, no wrapping quotes."""
    out = _BOT_LINE.sub("", text.strip())
    for _ in range(2):
        out = _PREFIX.sub("", out).strip()
    out = out.strip().strip('"“”').strip()
    return out if re.search(r"[A-Za-z0-9]", out) else ""


def simulate_call(
    service: ConversationService,
    bot_ref: str,
    caller: CallerPersona,
    *,
    caller_backend: str | LLMBackend | None = None,
    caller_model: str | None = None,
    params: GenerationParams | None = None,
    caller_params: GenerationParams | None = None,
    actor: Actor,
    on_turn: Callable[[SimulatedTurn], None] | None = None,
    on_start: Callable[[int], None] | None = None,
) -> SimulationResult:
    """Drive `caller.turns` exchanges with `bot_ref` as `actor` (who must be allowed to chat: the calls are theirs);
    a failed bot turn stays stored and ends the call."""
    require(actor, "chat")
    caller.validate()
    llm = (
        service.backend(caller_backend) if caller_backend is None or isinstance(caller_backend, str) else caller_backend
    )
    gen = caller_params or GenerationParams(temperature=0.8, top_p=0.95, max_tokens=params.max_tokens if params else 48)
    info = service.start(bot_ref, actor=actor, channel="simulated")
    result = SimulationResult(conversation_id=info.id, greeting=info.greeting)
    if on_start:
        on_start(info.id)
    try:
        for index in range(caller.turns):
            if index == 0 and caller.opening and caller.opening.strip():
                said = caller.opening.strip()
            else:
                said = _caller_says(llm, caller_model, gen, caller, result)
            stream = service.send(info.id, said, params=params, actor=actor)
            with contextlib.suppress(CallbotError):
                stream.text()
            turn_result = stream.result
            assert turn_result is not None
            turn = SimulatedTurn(index, said, turn_result.text, turn_result)
            result.turns.append(turn)
            if on_turn:
                on_turn(turn)
            if turn_result.error is not None:
                result.error = f"bot turn {index + 1} failed: {turn_result.error}"
                break
    finally:
        # Ended without summaries, as suite runs are: the transcript is the measurement.
        with contextlib.suppress(CallbotError), service.store.session() as session:
            mark_ended(session, info.id)
    return result


def _caller_says(
    llm: LLMBackend, model: str | None, gen: GenerationParams, caller: CallerPersona, so_far: SimulationResult
) -> str:
    messages = [ChatMessage("system", caller_prompt(caller))]
    history = [("user", so_far.greeting)] if so_far.greeting else []
    for t in so_far.turns:
        history += [("assistant", t.caller), ("user", t.bot)]
    if not history:
        history = [("user", "(The phone is answered. Say why you are calling.)")]
    messages += [ChatMessage(role, text) for role, text in history]  # type: ignore[arg-type]
    for _attempt in range(2):
        try:
            text = "".join(tok.text for tok in llm.stream(messages, gen, model=model or None) if tok.text)
        except BackendError as exc:
            raise CallbotError(f"The simulated caller's backend ({llm.name} at {llm.where}) failed: {exc}") from None
        said = clean_caller_text(text)
        if said:
            return said
    raise CallbotError(
        f"The simulated caller's model ({llm.name}) gave no usable caller line twice; "
        "try another caller model or a higher max_tokens"
    )
