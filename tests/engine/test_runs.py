"""Runs whose process died end as failed (reports, pipelines) or error (suite cells), not `running` for ever."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from callbot_core.jobs.runs import process_alive, reap_stale, worker_id
from callbot_core.personas.catalog import get_persona_version
from callbot_core.store import Store
from callbot_core.store.models import EvalRun, PipelineRun, ReportRun, utcnow

CALLBOT = Path(sys.executable).with_name("callbot")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    assert not process_alive(proc.pid)
    return proc.pid


def test_runs_of_dead_processes_are_ended_and_live_ones_left(store: Store) -> None:
    host = socket.gethostname()
    dead = f"{host}:{_dead_pid()}"
    now = utcnow()
    with store.session() as s:
        version_id = get_persona_version(s, "receptionist@1").id
        rows = {
            "dead report": ReportRun(name="daily_performance", status="running", worker=dead),
            "live report": ReportRun(name="daily_performance", status="running", worker=worker_id()),
            "far recent": ReportRun(name="daily_performance", status="running", worker="pod-7:12"),
            "far old": ReportRun(
                name="daily_performance", status="running", worker="pod-7:13", started_at=now - timedelta(hours=25)
            ),
            "no worker old": ReportRun(name="daily_performance", status="running", started_at=now - timedelta(days=3)),
            "finished": ReportRun(name="daily_performance", status="succeeded", worker=dead),
            "dead pipeline": PipelineRun(job="nightly", due_at=now, status="running", worker=dead),
            "dead eval": EvalRun(batch="b", suite="s", persona_version_id=version_id, status="running", worker=dead),
        }
        s.add_all(rows.values())
        s.flush()
        ids = {k: (type(r), r.id) for k, r in rows.items()}

    reaped = reap_stale(store)
    assert {(r.table, r.run_id) for r in reaped} == {
        ("report_runs", ids["dead report"][1]),
        ("report_runs", ids["far old"][1]),
        ("report_runs", ids["no worker old"][1]),
        ("pipeline_runs", ids["dead pipeline"][1]),
        ("eval_runs", ids["dead eval"][1]),
    }
    with store.session() as s:
        got = {k: s.get(model, rid) for k, (model, rid) in ids.items()}
        assert {k: r.status for k, r in got.items()} == {
            "dead report": "failed",
            "live report": "running",
            "far recent": "running",
            "far old": "failed",
            "no worker old": "failed",
            "finished": "succeeded",
            "dead pipeline": "failed",
            "dead eval": "error",
        }
        assert got["dead report"].error == f"interrupted: its process ({dead}) ended before the run did"
        assert got["far old"].error == "interrupted: no end recorded 24 h after it started (process pod-7:13)"
        assert got["dead eval"].finished_at is not None and got["live report"].finished_at is None
    assert reap_stale(store) == []  # ended runs are not ended twice


@pytest.mark.model
def test_a_killed_eval_run_shows_as_an_error(tmp_path: Path) -> None:
    """For real: `callbot eval run` killed with SIGKILL mid-suite, then `callbot eval list`."""
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(CALLBOT_DATABASE_URL=url, CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"))

    def cli(*args: str) -> str:
        proc = subprocess.run([CALLBOT, *args], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return proc.stdout

    cli("db", "upgrade")
    suite = tmp_path / "long.yaml"
    suite.write_text(
        "name: long\npersona: receptionist@1\nturns:\n"
        + "".join(f"  - say: Question number {i}, what are your opening hours?\n" for i in range(40)),
        encoding="utf-8",
    )
    proc = subprocess.Popen(
        [CALLBOT, "eval", "run", str(suite), "--param", "max_tokens=16"],
        env=env,
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    store = Store(url)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # polling the store for the run's row, not waiting on a clock
            with store.session() as s:
                if s.scalar(select(EvalRun.id).where(EvalRun.status == "running")) is not None:
                    break
            time.sleep(0.1)
        else:
            raise AssertionError("the eval run never started")
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
        with store.session() as s:
            assert s.scalar(select(EvalRun.status)) == "running"  # nobody wrote its end
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        store.dispose()

    listing = cli("eval", "list").splitlines()
    row = next(line for line in listing if line.split()[1:2] == ["long"])
    # batch, suite, started (2 words), cases, passed, failed, error, running
    assert row.split()[-5:] == ["1", "0", "0", "1", "0"], listing
    store = Store(url)
    with store.session() as s:
        assert s.scalar(select(EvalRun.error)).startswith("interrupted: its process (")
    store.dispose()
