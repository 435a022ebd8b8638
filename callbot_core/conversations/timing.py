"""Per-turn timing: one monotonic clock per turn, and the marks each stage leaves on it.

Every stage of a turn is timed by the same clock, so stage times add up and compare; wall-clock timestamps for
the store are derived from one anchor taken when the clock starts, so they are consistent with the durations
(reading the system clock at every mark could step backwards under NTP and disagree with them).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta


class TurnClock:
    """A monotonic clock for one turn, with the wall time of its start."""

    def __init__(self) -> None:
        self._origin = time.perf_counter()
        self._origin_wall = datetime.now(UTC)

    @staticmethod
    def now() -> float:
        return time.perf_counter()

    def wall(self, moment: float) -> datetime:
        """The UTC time of a moment read from `now()`."""
        return self._origin_wall + timedelta(seconds=moment - self._origin)

    @property
    def started_at(self) -> datetime:
        return self._origin_wall


@dataclass(slots=True)
class StageTiming:
    """When one stage of a turn started, first produced output (for generate: the first token) and ended."""

    name: str
    position: int
    started: float
    first_output: float | None = None
    ended: float | None = None
    # Pieces of output the stage streamed (for generate: tokens with text).
    outputs: int = 0
    error: str | None = None

    def output(self, moment: float) -> bool:
        """Count one piece of output; True when it is the first."""
        self.outputs += 1
        if self.first_output is None:
            self.first_output = moment
            return True
        return False

    @property
    def ms(self) -> float | None:
        return None if self.ended is None else (self.ended - self.started) * 1000

    @property
    def first_output_ms(self) -> float | None:
        return None if self.first_output is None else (self.first_output - self.started) * 1000

    def rate_after_first(self, count: int | None = None) -> float | None:
        """Output pieces per second after the first, over the time after the first (for generate: the decode rate;
        the wait for the first token is TTFT, reported apart)."""
        n = self.outputs if count is None else count
        if self.first_output is None or self.ended is None or n < 2:
            return None
        span = self.ended - self.first_output
        return (n - 1) / span if span > 0 else None
