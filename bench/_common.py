"""Helpers shared by the benchmark scripts: percentiles, peak memory, the RESULT line."""

from __future__ import annotations

import resource
import statistics
import sys


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def peak_rss_mb() -> float:
    # ru_maxrss is in kilobytes on Linux.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def result_line(**values: float | int | str) -> str:
    parts = []
    for name, value in values.items():
        parts.append(f"{name}={value:.3f}" if isinstance(value, float) else f"{name}={value}")
    return "RESULT " + " ".join(parts)


def emit(**values: float | int | str) -> None:
    print(result_line(**values))
    sys.stdout.flush()
