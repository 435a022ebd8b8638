"""`callbot report` (notebook reports) and `callbot pipelines` (scheduled jobs)."""

from __future__ import annotations

import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import click

from callbot_core.cli._common import acting_user, one_line, open_checked_store, parse_assignments, table
from callbot_core.errors import CallbotError, InvalidInput

if TYPE_CHECKING:
    from callbot_core.jobs.schedules import Job

_TIME = "%Y-%m-%d %H:%M:%S"


class _ProgressBar:
    """A one-line bar on stderr, redrawn per cell, so stdout carries only the HTML path (scriptable)."""

    WIDTH = 30

    def __init__(self) -> None:
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        filled = self.WIDTH * done // total if total else self.WIDTH
        bar = "#" * filled + "." * (self.WIDTH - filled)
        click.echo(f"\r[{bar}] {done}/{total} cells", nl=False, err=True)
        self.drawn = True

    def close(self) -> None:
        if self.drawn:
            click.echo("", err=True)


@click.group()
def report() -> None:
    """Notebook reports (papermill), exported to HTML."""


@report.command("run")
@click.argument("name")
@click.option(
    "-p",
    "--param",
    "params",
    multiple=True,
    metavar="KEY=VALUE",
    help="A notebook parameter: since, until (YYYY-MM-DD, 'today' or '-7d'), persona, database_url.",
)
def report_run(name: str, params: tuple[str, ...]) -> None:
    """Run the report NAME now; prints the HTML file's path."""
    from callbot_core.jobs.reports import run_report
    from callbot_core.settings import get_settings

    values = parse_assignments(params, error="-p expects key=value, got {raw}")
    store = open_checked_store()
    actor = acting_user(store)
    bar = _ProgressBar()
    try:
        run = run_report(store, name, values, actor=actor, progress=bar, settings=get_settings())
    finally:
        bar.close()
    if run.status != "succeeded":
        shown = f" (the HTML shows the error: {run.output_html})" if run.output_html else ""
        raise CallbotError(f"report run {run.id} failed: {run.error}{shown}")
    click.echo(run.output_html)


@report.command("list")
@click.option("--limit", default=50, show_default=True, type=click.IntRange(1, 10_000))
def report_list(limit: int) -> None:
    """The latest report runs."""
    from callbot_core.jobs.reports import list_runs

    runs = list_runs(open_checked_store(), limit=limit)
    if not runs:
        click.echo("No report runs yet. Start one with `callbot report run performance_report`.")
        return
    rows = [
        (
            r.id,
            r.name,
            one_line(", ".join(f"{k}={v}" for k, v in r.parameters.items()), 40) or "-",
            r.requested_by or "-",
            r.started_at.strftime(_TIME),
            r.finished_at.strftime(_TIME) if r.finished_at else "-",
            r.status,
            one_line(r.error, 80) if r.status == "failed" else (r.output_html or "-"),
        )
        for r in runs
    ]
    click.echo(table(["id", "report", "parameters", "by", "started", "finished", "status", "output / error"], rows))


_SCHEDULES_OPTION = click.option(
    "--schedules",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Schedule file (default: CALLBOT_SCHEDULES_FILE, else the shipped callbot_core/jobs/schedules.yaml).",
)


def _jobs(path: Path | None) -> list[Job]:
    from callbot_core.jobs.schedules import SCHEDULES_PATH, load_schedules
    from callbot_core.settings import get_settings

    return load_schedules(path or get_settings().schedules_file or SCHEDULES_PATH)


@click.group()
def pipelines() -> None:
    """Scheduled pipelines (the shipped schedule, or CALLBOT_SCHEDULES_FILE)."""


@pipelines.command("run-due")
@_SCHEDULES_OPTION
@click.option("--now", "now_text", default=None, metavar="ISO-TIME",
              help="Pretend it is this time (UTC), e.g. 2025-01-31T06:00.")  # fmt: skip
def pipelines_run_due(schedules: Path | None, now_text: str | None) -> None:
    """Run every job that has come due and has not run yet; safe to call from cron every minute."""
    from callbot_core.jobs.schedules import run_due
    from callbot_core.settings import get_settings

    now = None
    if now_text:
        try:
            now = datetime.fromisoformat(now_text)
        except ValueError:
            raise InvalidInput(f"--now expects an ISO time such as 2025-01-31T06:00, got {now_text!r}") from None
        now = now.replace(tzinfo=UTC) if now.tzinfo is None else now
    runs = run_due(open_checked_store(), now=now, schedules=_jobs(schedules), settings=get_settings())
    if not runs:
        click.echo("Nothing due.")
        return
    for r in runs:
        detail = r.error if r.status == "failed" else (r.output_html or "")
        report_part = f" report run {r.report_run_id}" if r.report_run_id else ""
        click.echo(f"{r.job}: due {r.due_at.strftime(_TIME)} {r.status}{report_part} {detail}".rstrip())
    failed = [r.job for r in runs if r.status != "succeeded"]
    if failed:
        click.secho(f"Error: {len(failed)} job(s) failed: {', '.join(failed)}", fg="red", err=True)
        sys.exit(1)


@pipelines.command("list")
@_SCHEDULES_OPTION
def pipelines_list(schedules: Path | None) -> None:
    """Scheduled jobs with their next fire time (UTC) and their latest run."""
    from callbot_core.jobs.schedules import job_statuses

    statuses = job_statuses(open_checked_store(), schedules=_jobs(schedules))
    if not statuses:
        click.echo("No scheduled jobs.")
        return
    rows = []
    for s in statuses:
        last = s.last_run
        rows.append(
            (
                s.job.name,
                s.job.kind,
                s.job.cron,
                s.job.report or "-",
                one_line(", ".join(f"{k}={v}" for k, v in s.job.parameters.items()), 30) or "-",
                s.next_due.strftime("%Y-%m-%d %H:%M"),
                last.due_at.strftime("%Y-%m-%d %H:%M") if last else "-",
                (last.status + (f": {one_line(last.error, 50)}" if last.error else "")) if last else "never run",
            )
        )
    click.echo(table(["job", "kind", "cron", "report", "parameters", "next (UTC)", "last due", "last status"], rows))
