"""Notebook reports: real papermill runs in the venv's kernel, their HTML, their stored runs, and the CLI.

Each papermill run takes a few seconds, so the runs over the hand-built store are made once per module.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from callbot_core.access import audit
from callbot_core.access.permissions import LOCAL_OPERATOR, OperatorActor
from callbot_core.errors import InvalidInput, NotFound
from callbot_core.jobs.reports import (
    REPORTS,
    ReportRunInfo,
    coerce_parameters,
    get_run,
    list_runs,
    report_parameters,
    resolve_date,
    run_report,
)
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import Conversation, Message, Persona, PersonaVersion, TurnMetrics

CALLBOT = str(Path(sys.executable).with_name("callbot"))
NAMES = ("performance_report", "conversation_report", "persona_report")


def add_conversations(store: Store) -> None:
    """Three ended conversations on the last three days: two with the receptionist, one with support whose
    second turn failed. Numbers are round so a report's tables can be checked by eye."""
    now = datetime.now(UTC)
    with store.session() as s:
        versions = {
            p.key: s.scalars(select(PersonaVersion).where(PersonaVersion.persona_id == p.id)).first()
            for p in s.scalars(select(Persona))
        }
        for i, key in enumerate(("receptionist", "support", "receptionist")):
            start = now - timedelta(days=i + 1)
            conv = Conversation(
                persona_version_id=versions[key].id, backend="embedded", model="smollm2", started_at=start,
                status="ended", ended_at=start + timedelta(minutes=2),
                summary_short="The caller asked about opening hours.",
                summary_full="The caller asked about opening hours and booked an appointment for Tuesday.",
            )  # fmt: skip
            s.add(conv)
            s.flush()
            for t in range(2):
                failed = key == "support" and t == 1
                user = Message(conversation_id=conv.id, role="user", text="When are you open on Tuesday please",
                               created_at=start + timedelta(seconds=10 * t))  # fmt: skip
                s.add(user)
                s.flush()
                bot = None
                if not failed:
                    bot = Message(conversation_id=conv.id, role="assistant", text="From nine to five.",
                                  created_at=start + timedelta(seconds=10 * t + 1))  # fmt: skip
                    s.add(bot)
                    s.flush()
                s.add(
                    TurnMetrics(
                        conversation_id=conv.id, user_message_id=user.id,
                        assistant_message_id=bot.id if bot else None, backend="embedded", model="smollm2",
                        ttft_ms=100.0 + 50 * t, total_ms=400.0 + 100 * t, prompt_tokens=50,
                        completion_tokens=None if failed else 5, tokens_per_s=None if failed else 90.0,
                        error="BackendTimeout: the stream stalled" if failed else None,
                        created_at=start + timedelta(seconds=10 * t + 2),
                    )
                )  # fmt: skip


def make_settings(tmp: Path, url: str) -> Settings:
    return Settings(_env_file=None, env="test", database_url=url, runtime_dir=tmp / "runtime")  # type: ignore[call-arg]


@dataclass
class ModuleRuns:
    store: Store
    settings: Settings
    runs: dict[str, ReportRunInfo]
    progress: dict[str, list[tuple[int, int]]]


@pytest.fixture(scope="module")
def module_runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ModuleRuns]:
    tmp = tmp_path_factory.mktemp("reports")
    url = f"sqlite:///{tmp / 'store.db'}"
    store = Store(url)
    store.upgrade()
    add_conversations(store)
    settings = make_settings(tmp, url)
    runs: dict[str, ReportRunInfo] = {}
    progress: dict[str, list[tuple[int, int]]] = {}
    for name in NAMES:
        calls: list[tuple[int, int]] = []
        runs[name] = run_report(
            store, name, {"since": "-7d"}, actor=OperatorActor(username="ada", role="researcher"), settings=settings,
            progress=lambda done, total, calls=calls: calls.append((done, total)),
        )  # fmt: skip
        progress[name] = calls
    yield ModuleRuns(store, settings, runs, progress)
    store.dispose()


def _visible_text(page: str) -> str:
    page = re.sub(r"<(script|style)\b.*?</\1>", " ", page, flags=re.S | re.I)
    return re.sub(r"\s+", " ", re.sub(r"<[^>]+>", " ", page))


def assert_offline_report_html(page: str) -> None:
    assert "plotly-graph-div" in page and "Plotly.newPlot" in page  # a chart, drawn by ...
    assert "plotly.js v" in page  # ... plotly.js embedded in the file, not fetched
    assert not re.search(r"<script[^>]*\bsrc=[\"']https?://", page, re.I)  # nothing loaded from the network
    # No code cells: neither input areas of code cells nor the notebook's code text.
    assert "Analytics.open" not in page and "dashboard_data(" not in page
    assert not re.search(r'class="[^"]*jp-CodeCell[^"]*"[^>]*>\s*<div[^>]*jp-InputArea', page)


def test_the_notebooks_are_discovered_with_their_parameters() -> None:
    assert set(NAMES) <= set(REPORTS)
    for name in NAMES:
        assert report_parameters(name) == {"since": None, "until": None, "persona": None, "database_url": None}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.slow
def test_each_report_runs_and_exports_html_without_code(module_runs: ModuleRuns, name: str) -> None:
    run = module_runs.runs[name]
    assert run.status == "succeeded", run.error
    assert run.error is None and run.requested_by == "ada" and run.finished_at is not None
    assert run.parameters == {"since": (datetime.now(UTC).date() - timedelta(days=7)).isoformat()}  # resolved
    reports_dir = module_runs.settings.resolved_runtime_dir() / "reports"
    assert run.output_html == str(reports_dir / f"{run.id}-{name}.html")
    assert run.output_notebook == str(reports_dir / f"{run.id}-{name}.ipynb")
    for output in (run.output_html, run.output_notebook):  # for the app to read, not every account on the machine
        assert stat.S_IMODE(Path(output).stat().st_mode) == 0o600, output
    page = Path(run.output_html).read_text(encoding="utf-8")
    assert_offline_report_html(page)
    text = _visible_text(page)
    assert "receptionist" in text and "support" in text  # the data made it into the report
    assert "No turns for these filters" not in text
    # Tables without pandas' index column (an empty header cell over 0, 1, 2…), and nothing shown as "None".
    assert "<table" in page and "<th></th>" not in page
    assert " None " not in f" {text} "

    calls = module_runs.progress[name]
    total = calls[-1][1]
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)


@pytest.mark.slow
def test_report_numbers_come_from_the_store(module_runs: ModuleRuns) -> None:
    text = _visible_text(Path(module_runs.runs["performance_report"].output_html or "").read_text(encoding="utf-8"))
    # Six turns, one failed: the summary table reads 6 turns, 1 failed, error rate 0.167.
    assert re.search(r"\b6 1 0\.167\b", text), text[:2000]
    assert "BackendTimeout: the stream stalled" in text


@pytest.mark.slow
def test_runs_are_listed_stored_and_audited(module_runs: ModuleRuns) -> None:
    runs = list_runs(module_runs.store)
    assert [r.name for r in runs] == list(reversed(NAMES))  # newest first
    first = module_runs.runs[NAMES[0]]
    assert get_run(module_runs.store, first.id) == first
    with pytest.raises(NotFound, match="No report run 999"):
        get_run(module_runs.store, 999)
    entries = audit.recent(module_runs.store, action_prefix="report.", actor=LOCAL_OPERATOR)
    assert {e.target for e in entries} == {f"{n}#{module_runs.runs[n].id}" for n in NAMES}
    assert all(e.action == "report.run" and e.actor == "ada" for e in entries)


@pytest.mark.slow
def test_reports_run_on_an_empty_store_on_each_database(store: Store, settings: Settings) -> None:
    # The store fixture holds only the default personas: every section says there is no data.
    run = run_report(store, "conversation_report", {"persona": "receptionist"}, settings=settings, actor=LOCAL_OPERATOR)
    assert run.status == "succeeded", run.error
    page = Path(run.output_html or "").read_text(encoding="utf-8")
    assert_offline_report_html(page)  # the empty charts are still charts, saying "No data for these filters"
    text = _visible_text(page)
    assert "No conversations for these filters" in text
    assert f"Store: {store.engine.url.render_as_string(hide_password=True)}" in text  # the kernel read our store


@pytest.mark.parametrize(
    ("name", "params", "error", "match"),
    [
        ("nope", {}, NotFound, r"No report 'nope'; known reports: conversation_report, performance_report"),
        ("performance_report", {"persona_key": "x"}, InvalidInput,
         r"Unknown parameter 'persona_key' .*allowed: since, until, persona, database_url"),
        ("performance_report", {"since": "31/01/2025"}, InvalidInput, r"'since': '31/01/2025' is not a date"),
        ("performance_report", {"until": "2025-02-30"}, InvalidInput, r"'until': '2025-02-30' is not a date"),
        ("performance_report", {"since": "2025-02-01", "until": "2025-01-01"}, InvalidInput,
         r"'since' \(2025-02-01\) is after 'until' \(2025-01-01\)"),
    ],
)  # fmt: skip
def test_bad_names_and_parameters_are_refused_before_anything_runs(
    tmp_path: Path, name: str, params: dict[str, str], error: type[Exception], match: str
) -> None:
    url = f"sqlite:///{tmp_path / 's.db'}"
    store = Store(url)
    store.upgrade()
    with pytest.raises(error, match=match):
        run_report(store, name, params, settings=make_settings(tmp_path, url), actor=LOCAL_OPERATOR)
    assert list_runs(store) == []
    assert not (tmp_path / "runtime" / "reports").exists()
    store.dispose()


def test_parameter_values_are_coerced_from_strings() -> None:
    today = date(2025, 3, 10)
    values = coerce_parameters(
        "persona_report",
        {"since": "-7d", "until": "today", "persona": " support ", "database_url": ""},
        today=today,
    )
    assert values == {"since": "2025-03-03", "until": "2025-03-10", "persona": "support", "database_url": None}
    assert coerce_parameters("persona_report", {"since": date(2025, 1, 2)}) == {"since": "2025-01-02"}
    assert resolve_date("2025-01-31") == date(2025, 1, 31)
    assert resolve_date("-30d", today=today) == date(2025, 2, 8)
    with pytest.raises(ValueError):
        resolve_date("yesterday")


@pytest.fixture
def cli_env(tmp_path: Path) -> Iterator[tuple[dict[str, str], Store]]:
    url = f"sqlite:///{tmp_path / 'cli.db'}"
    store = Store(url)
    store.upgrade()
    add_conversations(store)
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(CALLBOT_DATABASE_URL=url, CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"), CALLBOT_ENV="test")
    yield env, store
    store.dispose()


def _callbot(env: dict[str, str], cwd: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CALLBOT, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=180)


@pytest.mark.slow
def test_cli_report_run_list_and_a_failed_run(cli_env: tuple[dict[str, str], Store], tmp_path: Path) -> None:
    env, store = cli_env
    ok = _callbot(env, tmp_path, "report", "run", "performance_report", "-p", "since=-7d", "-p", "persona=support")
    assert ok.returncode == 0, ok.stderr
    html = Path(ok.stdout.strip())
    assert html.is_file() and html.name == "1-performance_report.html"
    assert re.search(r"\[#+\] (\d+)/\1 cells", ok.stderr)  # the progress bar ran to the end, on stderr
    assert "Kernel is running over TCP" not in ok.stderr  # the kernel's own chatter is kept out
    assert_offline_report_html(html.read_text(encoding="utf-8"))

    # A store with no tables makes the notebook's setup cell raise: the run is stored as failed, with the
    # cell's error, and its HTML shows the error cell.
    empty = tmp_path / "empty.db"
    bad = _callbot(env, tmp_path, "report", "run", "persona_report", "-p", f"database_url=sqlite:///{empty}")
    assert bad.returncode == 1
    assert "Error: report run 2 failed: ConfigError: The store at" in bad.stderr
    failed = get_run(store, 2)
    assert failed.status == "failed" and failed.finished_at is not None
    assert failed.error and failed.error.startswith("ConfigError: ") and "has no tables yet" in failed.error
    page = Path(failed.output_html or "").read_text(encoding="utf-8")
    assert "An Exception was encountered" in page and "has no tables yet" in _visible_text(page)

    unknown = _callbot(env, tmp_path, "report", "run", "nope", "-p", "since=2025-01-01")
    assert unknown.returncode == 1 and "known reports: conversation_report" in unknown.stderr
    malformed = _callbot(env, tmp_path, "report", "run", "performance_report", "-p", "since")
    assert malformed.returncode == 1 and "-p expects key=value" in malformed.stderr

    listing = _callbot(env, tmp_path, "report", "list")
    assert listing.returncode == 0, listing.stderr
    lines = listing.stdout.splitlines()
    assert lines[0].split() == ["id", "report", "parameters", "by", "started", "finished", "status", "output", "/",
                                "error"]  # fmt: skip
    row2, row1 = lines[2], lines[3]
    assert row1.startswith("1 ") and "performance_report" in row1 and "persona=support" in row1
    assert "succeeded" in row1 and str(html) in row1
    assert row2.startswith("2 ") and "failed" in row2 and "ConfigError" in row2
