"""Scenario suites: YAML lists of caller turns with assertions, run as a grid over persona versions."""

from .assertions import AssertionContext, Outcome, evaluate
from .runner import BatchResult, CellResult, SummaryRow, run_suite
from .suite import KINDS, Assertion, Suite, SuiteError, Turn, load_suite, parse_suite

__all__ = [
    "KINDS",
    "Assertion",
    "AssertionContext",
    "BatchResult",
    "CellResult",
    "Outcome",
    "Suite",
    "SuiteError",
    "SummaryRow",
    "Turn",
    "evaluate",
    "load_suite",
    "parse_suite",
    "run_suite",
]
