"""Scheduled pipelines: the schedule file, `run_due`'s claims (idempotent, and safe when calls overlap in
threads and in processes, on SQLite and PostgreSQL), system metrics, the CLI, and the deploy/ manifests."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import textwrap
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml
from sqlalchemy import func, select

from callbot_core.errors import InvalidInput
from callbot_core.jobs import schedules as pipelines
from callbot_core.jobs import system_metrics as sysmetrics
from callbot_core.jobs.reports import get_run
from callbot_core.jobs.schedules import Job, job_statuses, load_schedules, parse_schedules, run_due
from callbot_core.settings import PROJECT_ROOT, Settings
from callbot_core.store import Store
from callbot_core.store.models import PipelineRun, SystemMetrics

CALLBOT = str(Path(sys.executable).with_name("callbot"))
NOW = datetime(2025, 3, 10, 12, 7, 30, tzinfo=UTC)


def metrics_jobs(count: int, cron: str = "*/5 * * * *") -> list[Job]:
    return [Job(name=f"metrics-{i}", kind="system_metrics", cron=cron) for i in range(count)]


def count(store: Store, model: type) -> int:
    with store.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


# -- the schedule file ------------------------------------------------------------------------------


def test_the_shipped_schedule_loads_and_snapshots_metrics_every_five_minutes() -> None:
    jobs = {j.name: j for j in load_schedules()}
    metrics = [j for j in jobs.values() if j.kind == "system_metrics"]
    assert len(metrics) == 1 and metrics[0].cron == "*/5 * * * *"
    reports = [j for j in jobs.values() if j.kind == "report"]
    assert {j.report for j in reports} == {"performance_report", "conversation_report", "persona_report"}
    assert jobs["daily-performance"].parameters == {"since": "-1d", "until": "-1d"}


GOOD_JOB = """\
jobs:
  - name: ok
    kind: system_metrics
    cron: "*/5 * * * *"
"""


@pytest.mark.parametrize(
    ("job", "match"),
    [
        ('  - name: bad-cron\n    kind: system_metrics\n    cron: "61 * * * *"\n',
         r"line 7: job 'bad-cron', field 'cron': '61 \* \* \* \*' is not a valid cron expression"),
        ('  - name: six\n    kind: system_metrics\n    cron: "* * * * * *"\n',
         r"line 7: job 'six', field 'cron': .* must have five fields"),
        ("  - name: no-cron\n    kind: system_metrics\n",
         r"line 5: job 'no-cron', field 'cron': must be a cron expression"),
        ('  - name: k\n    kind: email\n    cron: "@daily"\n',
         r"line 6: job 'k', field 'kind': 'email' is not a job kind; use one of: report, system_metrics"),
        ('  - name: r\n    kind: report\n    report: sales_report\n    cron: "@daily"\n',
         r"line 7: job 'r', field 'report': 'sales_report' is not a report; known reports: conversation_report"),
        ('  - name: p\n    kind: report\n    report: persona_report\n    cron: "@daily"\n'
         "    parameters:\n      since: last week\n",
         r"line 9: job 'p', field 'parameters': Parameter 'since': 'last week' is not a date"),
        ('  - name: q\n    kind: report\n    report: persona_report\n    cron: "@daily"\n'
         "    parameters:\n      days: 7\n",
         r"line 9: job 'q', field 'parameters': Unknown parameter 'days'.*allowed: since, until"),
        ('  - name: m\n    kind: system_metrics\n    cron: "@hourly"\n    report: persona_report\n',
         r"line 8: job 'm', field 'report': only report jobs take a report"),
        ('  - name: x\n    kind: system_metrics\n    cron: "@hourly"\n    crontab: "* * * * *"\n',
         r"line 8: job 'x', field 'crontab': unknown field; allowed: name, kind, cron, report"),
        ('  - kind: system_metrics\n    cron: "@hourly"\n', r"line 5: job #2, field 'name': required"),
        ('  - name: ok\n    kind: system_metrics\n    cron: "@hourly"\n',
         r"line 5: job 'ok', field 'name': another job has the same name"),
        ("  - just a string\n", r"line 5: job #2: each job must be a mapping"),
    ],
)  # fmt: skip
def test_schedule_errors_name_the_line_the_job_and_the_field(job: str, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        parse_schedules(GOOD_JOB + job, source="schedules.yaml")


def test_schedule_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match=r"not valid YAML"):
        parse_schedules("jobs: [", source="s.yaml")
    with pytest.raises(InvalidInput, match=r"expected a top-level 'jobs:' list"):
        parse_schedules("- name: x\n")
    with pytest.raises(InvalidInput, match=r"unknown top-level key 'job'"):
        parse_schedules("job: []\n")
    with pytest.raises(InvalidInput, match=r"Cannot read the schedule file .*missing.yaml"):
        load_schedules(tmp_path / "missing.yaml")
    assert parse_schedules("") == [] and parse_schedules("jobs: []") == []


def test_fire_times_include_now_itself() -> None:
    job = Job(name="j", kind="system_metrics", cron="*/5 * * * *")
    assert job.last_due(NOW) == datetime(2025, 3, 10, 12, 5, tzinfo=UTC)
    on_the_dot = datetime(2025, 3, 10, 12, 5, tzinfo=UTC)
    assert job.last_due(on_the_dot) == on_the_dot
    assert job.next_due(on_the_dot) == datetime(2025, 3, 10, 12, 10, tzinfo=UTC)


def test_relative_dates_are_taken_from_the_due_day() -> None:
    job = Job(name="r", kind="report", cron="@daily", report="performance_report",
              parameters={"since": "-7d", "until": "today", "persona": "sales"})  # fmt: skip
    due = datetime(2025, 1, 3, 0, 0, tzinfo=UTC)
    assert pipelines.resolve_parameters(job, due) == {"since": "2024-12-27", "until": "2025-01-03", "persona": "sales"}


# -- running what is due ---------------------------------------------------------------------------


def test_run_due_is_idempotent_and_runs_again_at_the_next_fire(store: Store, settings: Settings) -> None:
    jobs = [*metrics_jobs(2), Job(name="hourly", kind="system_metrics", cron="0 * * * *")]
    first = run_due(store, now=NOW, schedules=jobs, settings=settings)
    assert [(r.job, r.due_at, r.status) for r in first] == [
        ("metrics-0", datetime(2025, 3, 10, 12, 5, tzinfo=UTC), "succeeded"),
        ("metrics-1", datetime(2025, 3, 10, 12, 5, tzinfo=UTC), "succeeded"),
        ("hourly", datetime(2025, 3, 10, 12, 0, tzinfo=UTC), "succeeded"),
    ]
    assert all(r.finished_at is not None and r.error is None for r in first)
    assert count(store, SystemMetrics) == 3

    # Called again within the same fire times (cron calls every minute): nothing runs.
    assert run_due(store, now=NOW, schedules=jobs, settings=settings) == []
    assert run_due(store, now=NOW + timedelta(minutes=2), schedules=jobs, settings=settings) == []
    # The next five-minute fire: the five-minute jobs run again, the hourly one does not.
    again = run_due(store, now=NOW + timedelta(minutes=3), schedules=jobs, settings=settings)
    assert [(r.job, r.due_at) for r in again] == [
        ("metrics-0", datetime(2025, 3, 10, 12, 10, tzinfo=UTC)),
        ("metrics-1", datetime(2025, 3, 10, 12, 10, tzinfo=UTC)),
    ]
    assert count(store, PipelineRun) == 5 and count(store, SystemMetrics) == 5

    statuses = {s.job.name: s for s in job_statuses(store, now=NOW + timedelta(minutes=3), schedules=jobs)}
    assert statuses["hourly"].next_due == datetime(2025, 3, 10, 13, 0, tzinfo=UTC)
    assert statuses["hourly"].last_run is not None and statuses["hourly"].last_run.status == "succeeded"
    assert statuses["metrics-0"].last_run is not None
    assert statuses["metrics-0"].last_run.due_at == datetime(2025, 3, 10, 12, 10, tzinfo=UTC)


def test_a_failing_job_is_recorded_and_the_others_still_run(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = sysmetrics.snapshot
    calls: list[int] = []

    def flaky(store: Store, **kwargs: object) -> sysmetrics.SystemMetricsInfo:
        calls.append(1)
        if len(calls) == 1:
            raise OSError("disk vanished")
        return real(store, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sysmetrics, "snapshot", flaky)
    runs = run_due(store, now=NOW, schedules=metrics_jobs(2), settings=settings)
    assert [(r.job, r.status, r.error) for r in runs] == [
        ("metrics-0", "failed", "OSError: disk vanished"),
        ("metrics-1", "succeeded", None),
    ]
    # A failed claim is not retried within the same fire time: the next fire is the retry.
    assert run_due(store, now=NOW, schedules=metrics_jobs(2), settings=settings) == []


def test_overlapping_calls_in_threads_never_run_a_job_twice(store: Store, settings: Settings) -> None:
    jobs = metrics_jobs(6)
    barrier = threading.Barrier(4)
    ran: list[str] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            barrier.wait()
            ran.extend(r.job for r in run_due(store, now=NOW, schedules=jobs, settings=settings))
        except BaseException as exc:  # surfaced below: an exception in a thread would otherwise vanish
            errors.append(exc)

    threads = [threading.Thread(target=call) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors
    assert sorted(ran) == sorted(j.name for j in jobs)  # every job ran, and only once
    assert count(store, PipelineRun) == 6 and count(store, SystemMetrics) == 6


WORKER = textwrap.dedent(
    """
    import json, sys
    from datetime import datetime
    from callbot_core.jobs.schedules import load_schedules, run_due
    from callbot_core.store import Store

    url, schedules, now = sys.argv[1], sys.argv[2], datetime.fromisoformat(sys.argv[3])
    store = Store(url)
    jobs = load_schedules(schedules)
    store.is_migrated()  # connect before the start signal, so the calls really overlap
    print("ready", flush=True)
    sys.stdin.readline()
    print(json.dumps([r.job for r in run_due(store, now=now, schedules=jobs)]), flush=True)
    """
)


def test_overlapping_calls_in_processes_never_run_a_job_twice(store: Store, tmp_path: Path) -> None:
    schedule = tmp_path / "schedules.yaml"
    names = [f"metrics-{i}" for i in range(6)]
    schedule.write_text(
        yaml.safe_dump({"jobs": [{"name": n, "kind": "system_metrics", "cron": "*/5 * * * *"} for n in names]})
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"), CALLBOT_ENV="test")
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, store.url, str(schedule), NOW.isoformat()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
            cwd=tmp_path,
        )  # fmt: skip
        for _ in range(3)
    ]
    try:
        # Every process has imported and connected before any is told to go, so their claims race.
        for proc in procs:
            assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        ran: list[str] = []
        for proc in procs:
            out, err = proc.communicate(timeout=120)
            assert proc.returncode == 0, err
            ran += json.loads(out.strip().splitlines()[-1])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    assert sorted(ran) == sorted(names)
    assert count(store, PipelineRun) == 6 and count(store, SystemMetrics) == 6


def test_system_metrics_snapshot(store: Store, settings: Settings) -> None:
    info = sysmetrics.snapshot(store, settings=settings)
    assert info.host and 0 <= info.cpu_percent <= 100 and 0 < info.memory_percent <= 100
    assert 0 < info.disk_percent <= 100 and info.process_rss_mb > 10 and info.memory_used_mb > 0
    with store.session() as s:
        row = s.scalars(select(SystemMetrics)).one()
        assert (row.id, row.host, row.process_rss_mb) == (info.id, info.host, info.process_rss_mb)


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_run_due_runs_a_report_job_once_and_lists_the_schedule(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store(url)
    store.upgrade()
    schedule = tmp_path / "schedules.yaml"
    schedule.write_text(
        textwrap.dedent(
            """\
            jobs:
              - name: metrics
                kind: system_metrics
                cron: "*/5 * * * *"
              - name: weekly
                kind: report
                report: performance_report
                cron: "0 6 * * 1"
                parameters:
                  since: "-7d"
                  until: "-1d"
            """
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(CALLBOT_DATABASE_URL=url, CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"), CALLBOT_ENV="test")

    def callbot(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([CALLBOT, *args], capture_output=True, text=True, env=env, cwd=tmp_path, timeout=180)

    # 2025-03-10 was a Monday: the weekly report is due at 06:00 and reports on the week before.
    first = callbot("pipelines", "run-due", "--schedules", str(schedule), "--now", "2025-03-10T06:02")
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == "metrics: due 2025-03-10 06:00:00 succeeded"
    assert re.fullmatch(r"weekly: due 2025-03-10 06:00:00 succeeded report run 1 \S+/1-performance_report\.html",
                        lines[1])  # fmt: skip
    run = get_run(store, 1)
    assert run.requested_by == "pipeline:weekly" and run.parameters == {"since": "2025-03-03", "until": "2025-03-09"}

    second = callbot("pipelines", "run-due", "--schedules", str(schedule), "--now", "2025-03-10T06:04")
    assert (second.returncode, second.stdout.strip()) == (0, "Nothing due.")

    listing = callbot("pipelines", "list", "--schedules", str(schedule))
    assert listing.returncode == 0, listing.stderr
    rows = {line.split()[0]: line for line in listing.stdout.splitlines()[2:]}
    assert "performance_report" in rows["weekly"] and "since=-7d, until=-1d" in rows["weekly"]
    assert "2025-03-10 06:00  succeeded" in rows["weekly"]
    assert re.search(r"\d{4}-\d\d-\d\d \d\d:\d[05]\s+2025-03-10 06:00\s+succeeded", rows["metrics"])

    broken = tmp_path / "broken.yaml"
    broken.write_text('jobs:\n  - name: b\n    kind: system_metrics\n    cron: "every minute"\n')
    bad = callbot("pipelines", "run-due", "--schedules", str(broken))
    assert bad.returncode == 1 and "line 4: job 'b', field 'cron'" in bad.stderr
    store.dispose()


# -- deploy/ ---------------------------------------------------------------------------------------

DEPLOY = PROJECT_ROOT / "deploy"


def test_cronjob_manifest_runs_run_due_every_minute_without_overlap() -> None:
    manifest = yaml.safe_load((DEPLOY / "cronjob.yaml").read_text())
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "CronJob")
    spec = manifest["spec"]
    assert spec["schedule"] == "* * * * *" and spec["concurrencyPolicy"] == "Forbid"
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["image"] == "callbot-workbench:latest"
    assert container["command"] == ["callbot", "pipelines", "run-due"]
    secrets = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"] if "valueFrom" in e}
    assert set(secrets) == {"CALLBOT_DATABASE_URL", "CALLBOT_SECRET_KEY"}


def test_cronjob_manifest_is_valid_kubernetes() -> None:
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    manifest = yaml.safe_load((DEPLOY / "cronjob.yaml").read_text())
    # Strict: a misspelt field (e.g. concurencyPolicy) is an error, not silently ignored by the cluster.
    kubernetes_validate.validate(manifest, kubernetes_validate.latest_version(), strict=True)


def test_crontab_line_calls_run_due_every_minute() -> None:
    lines = [ln for ln in (DEPLOY / "crontab").read_text().splitlines() if ln.strip() and not ln.startswith("#")]
    assert len(lines) == 1
    fields = lines[0].split(None, 5)
    assert fields[:5] == ["*"] * 5 and "callbot pipelines run-due" in fields[5]
