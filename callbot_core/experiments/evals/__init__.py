"""Scenario suites: YAML lists of caller turns with assertions, run as a grid over persona versions."""

from callbot_core.experiments.evals.assertions import AssertionContext, Outcome, evaluate
from callbot_core.experiments.evals.runner import BatchResult, CellResult, SummaryRow, run_suite
from callbot_core.experiments.evals.suite import KINDS, Assertion, Suite, SuiteError, Turn, load_suite, parse_suite

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
