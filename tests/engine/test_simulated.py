"""Simulated callers: a real call on the embedded model, prefix stripping, validation, failures, suites."""

from __future__ import annotations

import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm import GenerationParams
from callbot_core.backends.llm.base import Token
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.experiments.evals import SuiteError, parse_suite, run_suite
from callbot_core.experiments.evals.suite import SHIPPED_SUITES_DIR
from callbot_core.experiments.simulated import CallerPersona, clean_caller_text, simulate_call
from callbot_core.store.models import Conversation, EvalResult, EvalRun, Message
from tests.fake_ollama import down_url

SHORT = GenerationParams(max_tokens=24)


class ScriptedCaller:
    """A caller backend that says the given lines in order (each call takes the next)."""

    name = "scripted"
    where = "memory"
    default_model = "script"

    def __init__(self, *lines: str) -> None:
        self.lines = list(lines)
        self.calls = 0

    def stream(self, messages, params, *, model=None):  # type: ignore[no-untyped-def]
        line = self.lines[min(self.calls, len(self.lines) - 1)]
        self.calls += 1
        yield Token(line)


def _messages(store, conversation_id: int) -> list[Message]:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return list(
            session.scalars(select(Message).where(Message.conversation_id == conversation_id).order_by(Message.id))
        )


def test_a_real_simulated_call_on_the_embedded_model(store, settings, embedded) -> None:
    service = ConversationService(store, settings, backends=lambda name: embedded)
    seen: list[int] = []
    result = simulate_call(
        service,
        "receptionist@1",
        CallerPersona(goal="Book an appointment for Tuesday morning", personality="impatient", turns=2),
        params=SHORT,
        caller_params=SHORT,
        on_turn=lambda t: seen.append(t.index),
        actor=LOCAL_OPERATOR,
    )
    assert result.error is None and seen == [0, 1]
    with store.session() as session:
        conversation = session.get(Conversation, result.conversation_id)
        assert conversation is not None and conversation.channel == "simulated" and conversation.status == "ended"
    roles = [m.role for m in _messages(store, result.conversation_id)]
    assert roles == ["assistant", "user", "assistant", "user", "assistant"]  # greeting + 2 exchanges
    assert [who for who, _ in result.transcript] == ["bot", "caller", "bot", "caller", "bot"]
    assert all(t.caller.strip() and not t.caller.lower().startswith("caller:") for t in result.turns)
    assert len(result.metrics) == 2 and all(m["total_ms"] and m["total_ms"] > 0 for m in result.metrics)


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("Caller: Hi, I need an appointment.", "Hi, I need an appointment."),
        ("**Customer:** Are you open on Sunday?", "Are you open on Sunday?"),
        ('"Hello there."', "Hello there."),
        ("Can I come at ten?\nReceptionist: Sure, ten is fine.", "Can I come at ten?"),
        ("Caller: ...", ""),
    ],
)
def test_caller_prefixes_and_invented_bot_lines_are_stripped(raw: str, clean: str) -> None:
    assert clean_caller_text(raw) == clean


def test_the_caller_line_is_cleaned_and_garbage_is_retried_once(store, settings, embedded) -> None:
    service = ConversationService(store, settings, backends=lambda name: embedded)
    caller = ScriptedCaller("Caller:  ", "Caller: What are your opening hours?")
    result = simulate_call(
        service,
        "receptionist@1",
        CallerPersona(goal="hours", turns=1),
        caller_backend=caller,
        params=SHORT,
        actor=LOCAL_OPERATOR,
    )
    assert caller.calls == 2 and result.turns[0].caller == "What are your opening hours?"
    assert [m.text for m in _messages(store, result.conversation_id) if m.role == "user"] == [
        "What are your opening hours?"
    ]

    with pytest.raises(CallbotError, match="no usable caller line twice"):
        simulate_call(
            service,
            "receptionist@1",
            CallerPersona(goal="hours", turns=1),
            caller_backend=ScriptedCaller(" "),
            actor=LOCAL_OPERATOR,
        )


@pytest.mark.parametrize(
    ("caller", "message"),
    [
        (CallerPersona(goal="  "), "needs a goal"),
        (CallerPersona(goal="x", turns=0), "between 1 and 20"),
        (CallerPersona(goal="x", turns=21), "between 1 and 20"),
    ],
)
def test_bad_callers_are_refused_before_anything_is_stored(store, settings, caller, message) -> None:
    service = ConversationService(store, settings)
    with pytest.raises(InvalidInput, match=message):
        simulate_call(service, "receptionist@1", caller, actor=LOCAL_OPERATOR)
    with store.session() as session:
        assert session.scalars(select(Conversation)).first() is None


def test_caller_backend_down_is_a_clear_error(store, settings, embedded) -> None:
    service = ConversationService(store, settings, backends=lambda name: embedded)
    down = OllamaBackend(down_url(), default_model="m", connect_timeout_s=1, read_timeout_s=2)
    with pytest.raises(CallbotError, match="simulated caller's backend \\(ollama at http://127.0.0.1"):
        simulate_call(
            service, "receptionist@1", CallerPersona(goal="hours", turns=1), caller_backend=down, actor=LOCAL_OPERATOR
        )


def test_bot_backend_down_keeps_the_failed_turn(store, settings) -> None:
    down = OllamaBackend(down_url(), default_model="m", connect_timeout_s=1, read_timeout_s=2)
    service = ConversationService(store, settings, backends=lambda name: down)
    result = simulate_call(
        service,
        "receptionist@1",
        CallerPersona(goal="hours", turns=3),
        caller_backend=ScriptedCaller("When are you open?"),
        actor=LOCAL_OPERATOR,
    )
    assert len(result.turns) == 1 and result.error and result.error.startswith("bot turn 1 failed")
    assert [m.role for m in _messages(store, result.conversation_id)] == ["assistant", "user"]


SIM_SUITE = """
name: sim
persona: receptionist@1
simulate:
  goal: Ask for the opening hours
  personality: brief
  turns: 2
expect_each:
  - max_words: 200
  - not_contains: zzzz
"""


def test_a_simulated_suite_parses_and_runs(store, settings, embedded) -> None:
    suite = parse_suite(SIM_SUITE, source="s.yaml")
    assert suite.simulate is not None and suite.simulate.turns == 2 and len(suite.expect_each) == 2
    assert suite.assertion_count == 4
    service = ConversationService(store, settings, backends=lambda name: embedded)
    batch = run_suite(service, suite, [], params_grid={"max_tokens": [16]}, concurrency=1, actor=LOCAL_OPERATOR)
    assert len(batch.cells) == 1 and batch.cells[0].status == "passed", batch.cells[0].error
    with store.session() as session:
        run = session.scalars(select(EvalRun)).one()
        assert run.conversation_id is not None
        assert session.get(Conversation, run.conversation_id).channel == "simulated"  # type: ignore[union-attr]
        results = session.scalars(select(EvalResult).order_by(EvalResult.id)).all()
        assert [(r.turn_index, r.kind) for r in results] == [
            (0, "max_words"),
            (0, "not_contains"),
            (1, "max_words"),
            (1, "not_contains"),
        ]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("name: s\nsimulate:\n  personality: rude\n", "s.yaml line 3: simulate: missing field 'goal'"),
        ("name: s\nsimulate:\n  goal: g\n  turns: 50\n", "s.yaml line 4: simulate: 'turns' must be between 1 and 20"),
        ("name: s\nsimulate:\n  goal: g\n  mood: x\n", "s.yaml line 4: simulate: unknown field 'mood'"),
        ("name: s\nsimulate: hello\n", "s.yaml line 2: simulate: 'simulate' must be a mapping"),
        (
            "name: s\nsimulate:\n  goal: g\nexpect_each:\n  - max_words: many\n",
            "s.yaml line 5: expect_each, assertion 1: 'max_words' must be a whole number",
        ),
        ("name: s\nsimulate: {goal: g}\nturns:\n  - say: hi\n", "s.yaml line 3: give either 'turns' or 'simulate'"),
        ("name: s\nturns:\n  - say: hi\nexpect_each: []\n", "s.yaml line 4: 'expect_each' goes with 'simulate'"),
    ],
)
def test_a_bad_simulate_block_names_the_line(text: str, message: str) -> None:
    with pytest.raises(SuiteError) as info:
        parse_suite(text, source="s.yaml")
    assert str(info.value).startswith(message), str(info.value)


def test_the_shipped_simulated_suite_parses() -> None:

    from callbot_core.experiments.evals import load_suite

    suite = load_suite(SHIPPED_SUITES_DIR / "simulated_receptionist.yaml")
    assert suite.simulate is not None and suite.expect_each
