"""Per-turn timing, observed rather than threaded through: one timer object per turn."""

from __future__ import annotations

import time
from dataclasses import dataclass


@dataclass(slots=True)
class TurnTimer:
    """Marks the moments of one turn on a monotonic clock; derived numbers are in milliseconds."""

    started: float = 0.0
    first_token: float | None = None
    finished: float | None = None
    tokens: int = 0

    def start(self) -> None:
        self.started = time.perf_counter()

    def token(self) -> None:
        if self.first_token is None:
            self.first_token = time.perf_counter()
        self.tokens += 1

    def finish(self) -> None:
        self.finished = time.perf_counter()

    @property
    def ttft_ms(self) -> float | None:
        return None if self.first_token is None else (self.first_token - self.started) * 1000

    @property
    def total_ms(self) -> float | None:
        return None if self.finished is None else (self.finished - self.started) * 1000

    def tokens_per_s(self, completion_tokens: int | None = None) -> float | None:
        """Decode rate: tokens after the first over the time after the first (TTFT is reported apart)."""
        n = completion_tokens if completion_tokens is not None else self.tokens
        if self.first_token is None or self.finished is None or n < 2:
            return None
        span = self.finished - self.first_token
        return (n - 1) / span if span > 0 else None
