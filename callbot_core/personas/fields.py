"""Generation fields: the range of each sampling setting, and how a persona version becomes `GenerationParams`.

Written once here and read by everything that accepts these numbers: the persona studio's edits, comparison
variants, suite grids, the conversation service, and the app's number inputs (their bounds). A range changed here
changes all of them, with the same error message everywhere.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any, Protocol

from callbot_core.backends.llm import GenerationParams
from callbot_core.errors import InvalidInput


@dataclass(frozen=True, slots=True)
class FieldRange:
    """One sampling setting: its type and range. `high` None means no upper bound."""

    name: str
    kind: type[float] | type[int]
    low: float
    high: float | None
    # top_p: 0 itself means "no tokens at all", so its range is open at the bottom.
    low_inclusive: bool = True
    # The smallest value a number input offers: an input cannot leave its lower bound out, so an open range
    # starts one step above it.
    input_low: float | None = None

    @property
    def input_min(self) -> float:
        return self.low if self.input_low is None else self.input_low

    def check(self, value: object) -> Any:
        """`value` as this field's type, or InvalidInput naming the field, the range and the value."""
        if self.kind is int:
            if isinstance(value, bool) or not isinstance(value, int) or not self._in_range(value):
                raise InvalidInput(f"{self.name} must be a whole number {self._int_range()}, not {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InvalidInput(f"{self.name} must be a number, not {value!r}")
        number = float(value)
        if not self._in_range(number):
            raise InvalidInput(f"{self.name} must be {self._float_range()}, not {number}")
        return number

    def _in_range(self, value: float) -> bool:
        above = value >= self.low if self.low_inclusive else value > self.low
        return above and (self.high is None or value <= self.high)

    def _int_range(self) -> str:
        low = int(self.low)
        return f"of {low} or more" if self.high is None else f"from {low} to {int(self.high)}"

    def _float_range(self) -> str:
        low, high = f"{self.low:g}", f"{self.high:g}"
        return f"between {low} and {high}" if self.low_inclusive else f"above {low} and at most {high}"


TEMPERATURE = FieldRange("temperature", float, 0.0, 2.0)
TOP_P = FieldRange("top_p", float, 0.0, 1.0, low_inclusive=False, input_low=0.01)
MAX_TOKENS = FieldRange("max_tokens", int, 1, 4096)
SEED = FieldRange("seed", int, 0, None)

# Retrieval settings of a version (knowledge/stage.py): how many passages a turn gets, and the similarity under
# which a retrieval is flagged low relevance. Kept out of FIELDS: they are not sampling settings.
KNOWLEDGE_K = FieldRange("knowledge_k", int, 1, 20)
KNOWLEDGE_THRESHOLD = FieldRange("knowledge_threshold", float, 0.0, 1.0)

# The settings a comparison variant or a suite grid may override, in the order labels and stored params use.
FIELDS: dict[str, FieldRange] = {f.name: f for f in (TEMPERATURE, TOP_P, MAX_TOKENS, SEED)}


def check_field(name: str, value: object) -> Any:
    """One setting checked against its range and returned as its type (a float for temperature, an int for
    max_tokens...). An unknown name is a programming error."""
    return FIELDS[name].check(value)


def check_overrides(overrides: Mapping[str, object], *, what: str = "parameter") -> dict[str, Any]:
    """Overrides checked field by field, in FIELDS order; None values are left out (they mean "the version's own").

    `what` names them in the error for an unknown key (e.g. "variant parameter").
    """
    unknown = sorted(set(overrides) - set(FIELDS))
    if unknown:
        raise InvalidInput(f"Unknown {what}(s) {', '.join(unknown)}; allowed: {', '.join(FIELDS)}")
    return {name: check_field(name, overrides[name]) for name in FIELDS if overrides.get(name) is not None}


class _VersionSettings(Protocol):
    temperature: float
    top_p: float
    max_tokens: int
    stop_words: list[str]


def params_for(version: _VersionSettings, overrides: Mapping[str, Any] | None = None) -> GenerationParams:
    """The sampling a persona version asks for, with `overrides` (checked) on top: the one place that maps a
    version's columns onto GenerationParams."""
    base = GenerationParams(
        temperature=version.temperature,
        top_p=version.top_p,
        max_tokens=version.max_tokens,
        stop=tuple(version.stop_words or ()),
    )
    return with_overrides(base, overrides)


def with_overrides(params: GenerationParams, overrides: Mapping[str, Any] | None) -> GenerationParams:
    """`params` with the given fields replaced (checked against their ranges; None values left alone)."""
    return replace(params, **check_overrides(overrides)) if overrides else params
