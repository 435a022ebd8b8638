"""Scheduled pipelines: jobs listed in `callbot_core/jobs/schedules.yaml`, run by `callbot pipelines run-due`.

`run_due` is meant to be called from cron (or a Kubernetes CronJob) every minute. For each job it takes the
latest cron fire time at or before now and claims that (job, due time) pair by inserting a `pipeline_runs`
row. The pair is UNIQUE in the store, so when two calls overlap (a slow run, two machines) only one insert
succeeds and the job runs once; the other call sees `Duplicate` and skips it. Fire times missed while
nothing called `run-due` are not backfilled: only the latest one runs.

Cron expressions have five fields and are read in UTC.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from croniter import croniter
from sqlalchemy import func, select

from callbot_core.access.permissions import pipeline_actor
from callbot_core.errors import CallbotError, Duplicate, InvalidInput
from callbot_core.jobs import reports, runs
from callbot_core.jobs import system_metrics as sysmetrics
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import PipelineRun, utcnow
from callbot_core.store.redaction import scrub, url_password

# The shipped schedule is package data; `--schedules FILE` (or CALLBOT_SCHEDULES_FILE) names another.
SCHEDULES_PATH = Path(str(resources.files("callbot_core.jobs").joinpath("schedules.yaml")))
JOB_KINDS = ("report", "system_metrics")
JOB_FIELDS = ("name", "kind", "cron", "report", "parameters", "description")
# Short enough that "pipeline:<name>" fits report_runs.requested_by (64 characters).
_JOB_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,47}$")
_CRON_ALIASES = ("@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly")


@dataclass(frozen=True, slots=True)
class Job:
    name: str
    kind: str
    cron: str
    report: str | None = None
    # As written in the schedule: date values may be relative ("today", "-7d"), resolved against the due time.
    parameters: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    def last_due(self, now: datetime) -> datetime:
        """The latest fire time at or before `now` (croniter's get_prev alone excludes `now` itself)."""
        return croniter(self.cron, now + timedelta(microseconds=1)).get_prev(datetime)

    def next_due(self, now: datetime) -> datetime:
        """The first fire time after `now`."""
        return croniter(self.cron, now).get_next(datetime)


@dataclass(frozen=True, slots=True)
class PipelineRunInfo:
    id: int
    job: str
    due_at: datetime
    started_at: datetime
    finished_at: datetime | None
    status: str
    report_run_id: int | None
    error: str | None
    output_html: str | None = None


@dataclass(frozen=True, slots=True)
class JobStatus:
    job: Job
    next_due: datetime
    last_run: PipelineRunInfo | None


def _info(row: PipelineRun, output_html: str | None = None) -> PipelineRunInfo:
    return PipelineRunInfo(
        id=row.id,
        job=row.job,
        due_at=row.due_at,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        report_run_id=row.report_run_id,
        error=row.error,
        output_html=output_html,
    )


# -- the schedule file -------------------------------------------------------------------------


def _field_lines(root: yaml.Node | None) -> list[dict[str, int]]:
    """For each job, the 1-based line of the job and of each of its fields, so errors can point at them."""
    lines: list[dict[str, int]] = []
    if not isinstance(root, yaml.MappingNode):
        return lines
    for key, value in root.value:
        if isinstance(key, yaml.ScalarNode) and key.value == "jobs" and isinstance(value, yaml.SequenceNode):
            for item in value.value:
                where = {"": item.start_mark.line + 1}
                if isinstance(item, yaml.MappingNode):
                    where |= {k.value: k.start_mark.line + 1 for k, _ in item.value if isinstance(k, yaml.ScalarNode)}
                lines.append(where)
    return lines


def _check_cron(expr: Any) -> str:
    if not isinstance(expr, str) or not expr.strip():
        raise ValueError("must be a cron expression such as '*/5 * * * *'")
    expr = " ".join(expr.split())
    if expr.lower() in _CRON_ALIASES:
        return expr.lower()
    if len(expr.split(" ")) != 5:
        raise ValueError(f"{expr!r} must have five fields (minute hour day-of-month month day-of-week)")
    try:
        croniter(expr)
    except (ValueError, KeyError) as exc:  # croniter's errors derive from ValueError
        raise ValueError(f"{expr!r} is not a valid cron expression: {exc}") from None
    return expr


def _parse_job(item: Any, index: int, names: set[str]) -> Job:
    if not isinstance(item, dict):
        raise _JobError(index, None, "", "each job must be a mapping with name, kind and cron")
    name = item.get("name")
    label = name if isinstance(name, str) else None
    unknown = [k for k in item if k not in JOB_FIELDS]
    if unknown:
        raise _JobError(index, label, str(unknown[0]), f"unknown field; allowed: {', '.join(JOB_FIELDS)}")
    if not isinstance(name, str) or not _JOB_NAME.match(name):
        raise _JobError(index, label, "name", "required: letters, digits, '_', '-', '.', at most 48 characters")
    if name in names:
        raise _JobError(index, name, "name", "another job has the same name")
    kind = item.get("kind")
    if kind not in JOB_KINDS:
        raise _JobError(index, name, "kind", f"{kind!r} is not a job kind; use one of: {', '.join(JOB_KINDS)}")
    try:
        cron = _check_cron(item.get("cron"))
    except ValueError as exc:
        raise _JobError(index, name, "cron", str(exc)) from None
    description = item.get("description") or ""
    if kind == "system_metrics":
        for extra in ("report", "parameters"):
            if item.get(extra) is not None:
                raise _JobError(index, name, extra, "only report jobs take a report and parameters")
        return Job(name=name, kind=kind, cron=cron, description=str(description))
    report = item.get("report")
    if not isinstance(report, str) or report not in reports.REPORTS:
        known = ", ".join(sorted(reports.REPORTS))
        raise _JobError(index, name, "report", f"{report!r} is not a report; known reports: {known}")
    parameters = item.get("parameters") or {}
    if not isinstance(parameters, dict):
        raise _JobError(index, name, "parameters", "must be a mapping of parameter names to values")
    try:
        # Checked now with any date, so a bad key or date fails at load time rather than at 3 a.m.
        reports.coerce_parameters(report, parameters)
    except CallbotError as exc:
        raise _JobError(index, name, "parameters", str(exc)) from None
    return Job(
        name=name, kind=kind, cron=cron, report=report, parameters=dict(parameters), description=str(description)
    )


class _JobError(Exception):
    def __init__(self, index: int, name: str | None, field: str, message: str) -> None:
        super().__init__(message)
        self.index, self.name, self.field, self.message = index, name, field, message


def parse_schedules(text: str, *, source: str = "schedules.yaml") -> list[Job]:
    """Jobs from the text of a schedule file; InvalidInput names the line, the job and the field at fault."""
    try:
        data = yaml.safe_load(text)
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        raise InvalidInput(f"{source}: not valid YAML: {exc}") from None
    if data is None:
        return []
    if not isinstance(data, dict) or not isinstance(data.get("jobs", []), list):
        raise InvalidInput(f"{source}: expected a top-level 'jobs:' list")
    extra = [k for k in data if k != "jobs"]
    if extra:
        raise InvalidInput(f"{source}: unknown top-level key {extra[0]!r}; the file holds one 'jobs:' list")
    lines = _field_lines(root)
    jobs: list[Job] = []
    names: set[str] = set()
    for index, item in enumerate(data.get("jobs") or []):
        try:
            job = _parse_job(item, index, names)
        except _JobError as exc:
            where = lines[index] if index < len(lines) else {}
            line = where.get(exc.field) or where.get("")
            at = f"{source} line {line}" if line else source
            who = f"job {exc.name!r}" if exc.name else f"job #{index + 1}"
            field_part = f", field {exc.field!r}" if exc.field else ""
            raise InvalidInput(f"{at}: {who}{field_part}: {exc.message}") from None
        names.add(job.name)
        jobs.append(job)
    return jobs


def load_schedules(path: Path | str = SCHEDULES_PATH) -> list[Job]:
    """The jobs in a schedule file (by default `callbot_core/jobs/schedules.yaml`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidInput(f"Cannot read the schedule file {path}: {exc.strerror or exc}") from None
    return parse_schedules(text, source=str(path))


# -- running what is due -----------------------------------------------------------------------


def _claim(store: Store, job: str, due_at: datetime) -> int | None:
    """Insert the (job, due_at) row; None when it exists already, i.e. another call claimed it."""
    with store.session() as session:
        # A cheap look first, so the common every-minute case does not make the database log a violation.
        taken = session.scalar(select(PipelineRun.id).where(PipelineRun.job == job, PipelineRun.due_at == due_at))
    if taken is not None:
        return None
    try:
        with store.session() as session:
            row = PipelineRun(job=job, due_at=due_at, started_at=utcnow(), status="running", worker=runs.worker_id())
            session.add(row)
            session.flush()
            return row.id
    except Duplicate:  # the store's unique (job, due_at): another call claimed it between the look and the insert
        return None


def resolve_parameters(job: Job, due_at: datetime) -> dict[str, Any]:
    """The job's parameters with relative dates ("today", "-7d") taken from the due date, not the clock, so a
    late run reports on the period it was scheduled for."""
    out: dict[str, Any] = {}
    for key, value in job.parameters.items():
        if key in reports.DATE_PARAMETERS and isinstance(value, str) and value.strip():
            out[key] = reports.resolve_date(value, today=due_at.date()).isoformat()
        else:
            out[key] = value
    return out


def _run_job(store: Store, job: Job, run_id: int, due_at: datetime, settings: Settings | None) -> PipelineRunInfo:
    status, error, report_run_id, html = "failed", None, None, None
    try:
        if job.kind == "system_metrics":
            sysmetrics.snapshot(store, settings=settings)
            status = "succeeded"
        else:
            assert job.report is not None
            run = reports.run_report(
                store,
                job.report,
                resolve_parameters(job, due_at),
                actor=pipeline_actor(job.name),
                settings=settings,
            )
            status, error, report_run_id, html = run.status, run.error, run.id, run.output_html
    except Exception as exc:  # one job's failure is recorded and must not stop the other jobs
        # Masked: a driver's error can quote the connection string, and this row is shown on the Reports page.
        error = scrub(f"{type(exc).__name__}: {exc}", url_password(store.url))
    with store.session() as session:
        row = session.get_one(PipelineRun, run_id)
        row.status, row.error, row.report_run_id, row.finished_at = status, error, report_run_id, utcnow()
        session.flush()
        return _info(row, html)


def run_due(
    store: Store,
    *,
    now: datetime | None = None,
    schedules: Sequence[Job] | None = None,
    settings: Settings | None = None,
) -> list[PipelineRunInfo]:
    """Run every job whose latest fire time (at or before `now`) has not been claimed yet; return those runs."""
    now = now or utcnow()
    if now.tzinfo is None:
        now = now.replace(tzinfo=UTC)
    jobs = list(schedules) if schedules is not None else load_schedules()
    runs.reap_stale(store)  # the clock's time, not `now`: a run's process is dead or alive now
    done: list[PipelineRunInfo] = []
    for job in jobs:
        due_at = job.last_due(now)
        run_id = _claim(store, job.name, due_at)
        if run_id is not None:
            done.append(_run_job(store, job, run_id, due_at, settings))
    return done


def job_statuses(
    store: Store, *, now: datetime | None = None, schedules: Sequence[Job] | None = None
) -> list[JobStatus]:
    """Each scheduled job with its next fire time and its latest run (if any)."""
    now = now or utcnow()
    jobs = list(schedules) if schedules is not None else load_schedules()
    runs.reap_stale(store)
    with store.session() as session:
        latest = select(PipelineRun.job, func.max(PipelineRun.id).label("id")).group_by(PipelineRun.job).subquery()
        rows = session.scalars(select(PipelineRun).join(latest, PipelineRun.id == latest.c.id))
        last = {r.job: _info(r) for r in rows}
    return [JobStatus(job=j, next_due=j.next_due(now), last_run=last.get(j.name)) for j in jobs]


def list_runs(store: Store, *, limit: int = 100, job: str | None = None) -> list[PipelineRunInfo]:
    """Pipeline runs, newest first."""
    query = select(PipelineRun).order_by(PipelineRun.id.desc()).limit(limit)
    if job is not None:
        query = query.where(PipelineRun.job == job)
    with store.session() as session:
        return [_info(r) for r in session.scalars(query)]
