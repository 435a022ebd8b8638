"""Reports are read by everyone on the Reports page: no parameter smuggles markup into one, what a notebook shows
as HTML is escaped, and no database password reaches a report file, a stored run or the audit log.

The page side (a script inside a report cannot reach the app) is tests/browser/test_report_sandbox.py.
"""

from __future__ import annotations

import json
import stat
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select
from sqlalchemy.engine import make_url

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.errors import ConfigError, InvalidInput
from callbot_core.jobs import reports
from callbot_core.jobs.reports import coerce_parameters, get_run, list_runs, run_report
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import AuditLog, Persona, ReportRun
from tests.conftest import PG_URL

XSS = '<img src=x onerror="alert(parent.document.cookie)">'
PASSWORD = "s3cretpw"


@pytest.fixture
def no_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse() -> str:
        # Reached only once every check has passed: a refusal that comes first never starts a kernel.
        raise ConfigError("no kernel in this test")

    monkeypatch.setattr(reports, "_kernel_name", refuse)


def _everything_stored(store: Store) -> str:
    """Every report run and audit row as text, to search for what must not be there."""
    with store.session() as session:
        runs = [(r.parameters, r.error, r.output_html, r.output_notebook) for r in session.scalars(select(ReportRun))]
        audit = [(a.action, a.target, a.detail) for a in session.scalars(select(AuditLog))]
    return repr(runs) + repr(audit)


# -- parameters are checked against what they mean -------------------------------------------------------------


def test_a_persona_that_is_not_in_the_store_is_refused_naming_known_ones(
    store: Store, settings: Settings, no_kernel: None
) -> None:
    with pytest.raises(InvalidInput) as refused:
        run_report(store, "performance_report", {"persona": XSS}, actor=LOCAL_OPERATOR, settings=settings)
    message = str(refused.value)
    assert message.startswith(f"Parameter 'persona': {XSS!r} is not a persona in the store")
    assert "assistant, receptionist, sales, support, tutor" in message  # the seeded keys, sorted
    assert "\n" not in message
    # Nothing half-stored: no run row, no audit entry, no report folder.
    assert list_runs(store) == [] and "report.run" not in _everything_stored(store)
    assert not (settings.resolved_runtime_dir() / "reports").exists()


def test_a_persona_in_the_store_passes(store: Store, settings: Settings, no_kernel: None) -> None:
    with pytest.raises(ConfigError, match="no kernel"):  # every check passed
        run_report(store, "performance_report", {"persona": "support"}, actor=LOCAL_OPERATOR, settings=settings)


@pytest.mark.parametrize(
    ("params", "match"),
    [
        # Without a store to look in (a schedule file is checked when it loads), a persona must look like a key.
        ({"persona": "<b>bold</b>"}, r"^Parameter 'persona': '<b>bold</b>' is not a persona key"),
        ({"persona": "receptionist@2"}, r"^Parameter 'persona': 'receptionist@2' is not a persona key"),
        ({"database_url": "<script>x</script>"},
         r"^Parameter 'database_url': '<script>x</script>' is not a database URL"),
        ({"database_url": f"mysql://ada:{PASSWORD}@db/callbot"},
         r"^Parameter 'database_url': 'mysql://ada:\*\*\*@db/callbot' is not a SQLite or PostgreSQL URL"),
    ],
)  # fmt: skip
def test_parameters_without_a_store_are_checked_by_their_shape(params: dict[str, str], match: str) -> None:
    with pytest.raises(InvalidInput, match=match) as refused:
        coerce_parameters("conversation_report", params)
    assert PASSWORD not in str(refused.value)


def test_good_values_pass_unchanged() -> None:
    url = f"postgresql+psycopg://ada:{PASSWORD}@db/callbot"
    values = coerce_parameters("persona_report", {"persona": "front-desk_2", "database_url": url})
    assert values == {"persona": "front-desk_2", "database_url": url}  # the kernel still needs the real URL


# -- no password in what a run leaves behind --------------------------------------------------------------------


def test_a_failed_run_stores_no_password_and_the_kernel_gets_the_url_from_its_environment(
    store: Store, settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    import papermill

    url = f"postgresql+psycopg://ada:{PASSWORD}@db.invalid/callbot"
    seen: dict[str, Any] = {}

    def fail_like_a_driver(*_args: Any, parameters: dict[str, Any], kernel_env: dict[str, str], **_kw: Any) -> None:
        seen.update(parameters=parameters, env=kernel_env)
        raise RuntimeError(f"could not connect to {url}: password {PASSWORD} rejected")  # drivers echo what they got

    monkeypatch.setattr(papermill, "execute_notebook", fail_like_a_driver)
    run = run_report(store, "persona_report", {"database_url": url}, actor=LOCAL_OPERATOR, settings=settings)

    assert run.status == "failed" and run.error is not None
    assert run.error.startswith("RuntimeError: could not connect to postgresql+psycopg://ada:***@db.invalid/callbot")
    assert PASSWORD not in repr(run) and PASSWORD not in repr(get_run(store, run.id))
    assert PASSWORD not in _everything_stored(store)
    assert run.parameters == {"database_url": "postgresql+psycopg://ada:***@db.invalid/callbot"}
    # papermill writes its parameters into the .ipynb: they carry no password; the kernel's environment does.
    assert PASSWORD not in json.dumps(seen["parameters"])
    assert url in seen["env"].values()


def _pg_url_with_password() -> str:
    assert PG_URL is not None
    return make_url(PG_URL).set(password=PASSWORD).render_as_string(hide_password=False)


def _mode(path: str | None) -> int:
    assert path is not None
    return stat.S_IMODE(Path(path).stat().st_mode)


@pytest.mark.slow
@pytest.mark.parametrize("store_url", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_report_over_a_database_with_a_password_keeps_it_out_of_its_files(store: Store, settings: Settings) -> None:
    url = _pg_url_with_password()  # PostgreSQL here trusts local connections, so any password gets in
    run = run_report(store, "performance_report", {"database_url": url}, actor=LOCAL_OPERATOR, settings=settings)

    assert run.status == "succeeded", run.error
    notebook = Path(run.output_notebook or "").read_text(encoding="utf-8")
    page = Path(run.output_html or "").read_text(encoding="utf-8")
    masked = make_url(url).render_as_string(hide_password=True)
    assert masked in page  # the report read that database, and says so without the password
    assert PASSWORD not in notebook and PASSWORD not in page
    assert PASSWORD not in repr(get_run(store, run.id)) and PASSWORD not in _everything_stored(store)
    # Report files are for the app to read, not for every account on the machine.
    assert _mode(run.output_notebook) == 0o600 and _mode(run.output_html) == 0o600


@pytest.mark.slow
def test_a_notebook_escapes_the_data_it_shows(tmp_path: Path) -> None:
    # A key the studio would refuse, written straight into the store: the existence check lets it through, so
    # the notebook's own escaping is what keeps it text.
    url = f"sqlite:///{tmp_path / 'store.db'}"
    store = Store(url)
    store.upgrade()
    with store.session() as session:
        session.add(Persona(key="<b>bold</b>", name="Bold"))
    settings = Settings(_env_file=None, env="test", database_url=url, runtime_dir=tmp_path / "runtime")  # type: ignore[call-arg]
    try:
        run = run_report(
            store, "conversation_report", {"persona": "<b>bold</b>"}, actor=LOCAL_OPERATOR, settings=settings
        )
    finally:
        store.dispose()
    assert run.status == "succeeded", run.error
    page = Path(run.output_html or "").read_text(encoding="utf-8")
    assert "&lt;b&gt;bold&lt;/b&gt;" in page
    assert "<b>bold</b>" not in page
