"""Generation fields: one range per sampling setting, the same message wherever a value is refused (a suite grid
too, before anything is stored), and one way from a persona version to GenerationParams."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm import GenerationParams
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import InvalidInput
from callbot_core.experiments.evals import parse_suite, run_suite
from callbot_core.personas.fields import FIELDS, TOP_P, check_field, check_overrides, params_for, with_overrides
from callbot_core.store.models import Conversation, EvalRun
from tests.engine.scripted import Scripted


@dataclass
class Version:
    temperature: float = 0.3
    top_p: float = 0.9
    max_tokens: int = 64
    stop_words: list[str] = field(default_factory=lambda: ["Caller:"])


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("temperature", 3, "temperature must be between 0 and 2, not 3.0"),
        ("temperature", True, "temperature must be a number, not True"),
        ("temperature", float("nan"), "temperature must be a number, not nan"),
        ("top_p", 0, "top_p must be above 0 and at most 1, not 0.0"),
        ("top_p", 1.5, "top_p must be above 0 and at most 1, not 1.5"),
        ("max_tokens", 0, "max_tokens must be a whole number from 1 to 4096, not 0"),
        ("max_tokens", 2.5, "max_tokens must be a whole number from 1 to 4096, not 2.5"),
        ("seed", -1, "seed must be a whole number of 0 or more, not -1"),
    ],
)
def test_out_of_range_values_are_refused_with_one_message(name: str, value: object, message: str) -> None:
    with pytest.raises(InvalidInput) as excinfo:
        check_field(name, value)
    assert str(excinfo.value) == message


def test_values_come_back_as_their_type() -> None:
    assert check_field("temperature", 1) == 1.0 and isinstance(check_field("temperature", 1), float)
    assert check_field("top_p", 1) == 1.0 and check_field("max_tokens", 4096) == 4096 and check_field("seed", 0) == 0
    assert TOP_P.input_min == 0.01 and FIELDS["temperature"].input_min == 0.0
    assert list(check_overrides({"seed": 7, "temperature": 0.2, "top_p": None})) == ["temperature", "seed"]
    with pytest.raises(InvalidInput, match=r"Unknown variant parameter\(s\) stop; allowed: temperature, top_p"):
        check_overrides({"stop": ["x"]}, what="variant parameter")


def test_a_version_becomes_generation_params_with_overrides_on_top() -> None:
    assert params_for(Version()) == GenerationParams(temperature=0.3, top_p=0.9, max_tokens=64, stop=("Caller:",))
    tuned = params_for(Version(), {"temperature": 1, "seed": 5, "max_tokens": None})
    assert (tuned.temperature, tuned.seed, tuned.max_tokens, tuned.stop) == (1.0, 5, 64, ("Caller:",))
    assert with_overrides(tuned, None) is tuned
    with pytest.raises(InvalidInput, match="top_p"):
        params_for(Version(), {"top_p": 0})


def test_a_suite_grid_out_of_range_is_refused_before_anything_is_stored(store, settings) -> None:
    backend = Scripted()
    service = ConversationService(store, settings, backends=lambda name: backend)
    suite = parse_suite("name: s\nturns:\n  - say: hi\n")
    with pytest.raises(InvalidInput, match="temperature must be between 0 and 2, not 5.0"):
        run_suite(service, suite, ["receptionist@1"], params_grid={"temperature": [0.2, 5]}, actor=LOCAL_OPERATOR)
    with store.session() as session:
        assert session.scalar(select(func.count()).select_from(EvalRun)) == 0
        assert session.scalar(select(func.count()).select_from(Conversation)) == 0
    assert backend.requests == []
