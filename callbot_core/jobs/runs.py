"""Runs whose process died: report runs, pipeline runs and suite cells left `running`.

Each run records the process that runs it as "host:pid" (`worker_id()`). A process killed outright
(SIGKILL, out of memory, an evicted pod) never writes its run's end, so without this the run would read
`running` for ever and the Reports page would wait on it. `reap_stale` ends such runs with an error that
says so: at once when the process was on this host and no longer exists; otherwise once the run is older
than `max_age` (a process on another machine cannot be asked, and its pid may have been reused here).
Conversation turns use the same rule (`why_dead`) for the turns a dead process left running
(`callbot_core.conversations.turn.reconcile_turns`).
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select

from callbot_core.store import Store
from callbot_core.store.models import EvalRun, PipelineRun, ReportRun, utcnow

__all__ = ["DEFAULT_MAX_AGE", "Reaped", "process_alive", "reap_stale", "why_dead", "worker_id"]

# Longer than any run should take: a report's cells time out after 10 minutes each, a suite cell after
# its turns' read timeouts.
DEFAULT_MAX_AGE = timedelta(hours=24)
# The status a dead run ends with, per kind of run.
_ENDED_AS = {ReportRun: "failed", PipelineRun: "failed", EvalRun: "error"}


@dataclass(frozen=True, slots=True)
class Reaped:
    table: str
    run_id: int
    reason: str


def worker_id() -> str:
    """This process, as stored with the runs it starts."""
    return f"{socket.gethostname()}:{os.getpid()}"


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)  # signal 0: checks existence and permission, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # it exists, owned by someone else
    return True


def why_dead(
    worker: str | None, started_at: datetime, now: datetime, max_age: timedelta, *, what: str = "run"
) -> str | None:
    """Why something recorded as running in process `worker` ("host:pid") since `started_at` is not: the error to
    end it with, or None while it may still be going. Shared by runs and conversation turns (`what` names it)."""
    host, _, pid = (worker or "").rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not process_alive(int(pid)):
        return f"interrupted: its process ({worker}) ended before the {what} did"
    if now - started_at > max_age:
        hours = max_age.total_seconds() / 3600
        return f"interrupted: no end recorded {hours:g} h after it started (process {worker or 'unknown'})"
    return None


def reap_stale(store: Store, *, max_age: timedelta = DEFAULT_MAX_AGE, now: datetime | None = None) -> list[Reaped]:
    """End every `running` run whose process is gone; return what was ended."""
    now = now or utcnow()
    reaped: list[Reaped] = []
    with store.session() as session:
        for model, status in _ENDED_AS.items():
            for row in session.scalars(select(model).where(model.status == "running")):
                reason = why_dead(row.worker, row.started_at, now, max_age)
                if reason is None:
                    continue
                row.status = status
                row.error = reason
                row.finished_at = now
                reaped.append(Reaped(model.__tablename__, row.id, reason))
    return reaped
