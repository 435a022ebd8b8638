"""Notebook reports: a notebook shipped in `callbot_core/jobs/notebooks/` run by papermill, stored as a `report_runs`
row and exported to HTML without code (outputs and plotly charts kept, plotly.js embedded so the file opens offline).

Every front end (CLI, Reports page, scheduled pipelines) starts runs through `run_report`. Reports are opened by
everyone, so a run's parameters are checked against what they mean before anything is stored, the notebooks escape
what they show as HTML, and neither the report files (readable by their owner only) nor the stored run hold a
database password.
"""

from __future__ import annotations

import ast
import functools
import logging
import os
import re
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import SecretStr
from sqlalchemy import select
from sqlalchemy.engine import make_url
from sqlalchemy.exc import ArgumentError

from callbot_core.access import audit
from callbot_core.access.permissions import Actor, require
from callbot_core.errors import ConfigError, InvalidInput, NotFound
from callbot_core.jobs import runs
from callbot_core.personas.versions import KEY_PATTERN
from callbot_core.settings import PROJECT_ROOT, Settings, get_settings
from callbot_core.store import Store
from callbot_core.store.models import Persona, ReportRun, utcnow
from callbot_core.store.redaction import redact_url, scrub, url_password

log = logging.getLogger(__name__)

# The report notebooks ship inside the package, so an installed wheel (a container image) runs them too.
NOTEBOOKS_DIR = Path(str(resources.files("callbot_core.jobs").joinpath("notebooks")))
# The kernelspec ipykernel ships into the venv (share/jupyter/kernels/python3). Its argv starts with plain
# "python", which jupyter_client replaces with sys.executable: the kernel is this very interpreter, so it sees
# the same packages (callbot_core included) without any `ipykernel install` step.
KERNEL_NAME = "python3"
# Parameters read as dates. Besides YYYY-MM-DD they accept "today" and "-Nd" (N days before today), so a
# schedule can say "the last 7 days" without a date that goes stale.
DATE_PARAMETERS = frozenset({"since", "until"})
# How many persona keys an unknown one's error lists.
KNOWN_KEYS_SHOWN = 8
# The kernel reads the database a run asks for from this variable: passed as a papermill parameter, the URL
# and its password would be written into the executed notebook. The parameter holds the masked URL.
DATABASE_URL_ENV = "CALLBOT_REPORT_DATABASE_URL"
CELL_TIMEOUT_S = 600
KERNEL_START_TIMEOUT_S = 60

Progress = Callable[[int, int], None]


def _discover() -> dict[str, Path]:
    return {path.stem: path for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb"))}


REPORTS: dict[str, Path] = _discover()


@dataclass(frozen=True, slots=True)
class ReportRunInfo:
    id: int
    name: str
    parameters: dict[str, Any]
    requested_by: str | None
    started_at: datetime
    finished_at: datetime | None
    status: str
    output_html: str | None
    output_notebook: str | None
    error: str | None

    @property
    def duration_s(self) -> float | None:
        return None if self.finished_at is None else (self.finished_at - self.started_at).total_seconds()


def _info(row: ReportRun) -> ReportRunInfo:
    return ReportRunInfo(
        id=row.id,
        name=row.name,
        parameters=dict(row.parameters or {}),
        requested_by=row.requested_by,
        started_at=row.started_at,
        finished_at=row.finished_at,
        status=row.status,
        output_html=row.output_html,
        output_notebook=row.output_notebook,
        # Runs stored before errors were scrubbed may still quote a URL with its password.
        error=scrub(row.error) if row.error else None,
    )


def report_path(name: str) -> Path:
    path = REPORTS.get(name)
    if path is None:
        known = ", ".join(sorted(REPORTS)) or f"none (no notebooks in {NOTEBOOKS_DIR})"
        raise NotFound(f"No report {name!r}; known reports: {known}")
    return path


def report_parameters(name: str) -> dict[str, Any]:
    """The report's parameters and their defaults, as assigned in its cell tagged `parameters`."""
    import nbformat

    nb = nbformat.read(report_path(name), as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code" and "parameters" in cell.get("metadata", {}).get("tags", []):
            return _assignments(cell.source)
    return {}


def _assignments(source: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            target, value = node.targets[0].id, node.value
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            target, value = node.target.id, node.value
        else:
            continue
        try:
            out[target] = ast.literal_eval(value)
        except ValueError:
            # A computed default still names a parameter; the notebook works it out at run time.
            out[target] = None
    return out


_RELATIVE_DAYS = re.compile(r"^-(\d{1,4})d$")


def resolve_date(text: str, *, today: date | None = None) -> date:
    """A date from `YYYY-MM-DD`, `today` or `-Nd` (N days before `today`); ValueError otherwise."""
    today = today or datetime.now(UTC).date()
    text = text.strip().lower()
    if text == "today":
        return today
    match = _RELATIVE_DAYS.match(text)
    if match:
        return today - timedelta(days=int(match.group(1)))
    return date.fromisoformat(text)


def _coerce(report: str, key: str, raw: Any, default: Any, today: date | None) -> Any:
    if raw is None:
        return None
    # YAML gives dates and numbers already typed; the CLI and forms give strings. Normalise to text first.
    text = raw.isoformat() if isinstance(raw, date) else str(raw).strip()
    if text == "":
        return None  # an empty value means the default: all personas, the configured store
    if key in DATE_PARAMETERS:
        try:
            return resolve_date(text, today=today).isoformat()
        except ValueError:
            raise InvalidInput(
                f"Parameter {key!r}: {text!r} is not a date; use YYYY-MM-DD, 'today' or '-Nd' (N days ago)"
            ) from None
    if key == "database_url":
        return _check_database_url(text)
    if key == "persona":
        return text  # checked against the store once the other values are known
    try:
        if isinstance(default, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(default, int):
            return int(text)
        if isinstance(default, float):
            return float(text)
    except ValueError:
        raise InvalidInput(f"Parameter {key!r}: {text!r} is not a {type(default).__name__}") from None
    # Reports are opened by everyone and show their parameters: text goes in only once `_coerce` knows what it
    # means (a date, a persona key, a database URL) and checks it. A new text parameter needs a check here first.
    raise InvalidInput(f"Parameter {key!r} of report {report!r} is text that callbot has no check for yet")


def _check_database_url(text: str) -> str:
    shown = redact_url(text)  # the message may be shown or logged: never with the password
    try:
        backend = make_url(text).get_backend_name()
    except (ArgumentError, ValueError):
        raise InvalidInput(
            f"Parameter 'database_url': {shown!r} is not a database URL; use sqlite:///PATH or "
            "postgresql+psycopg://USER@HOST/DATABASE"
        ) from None
    if backend not in ("sqlite", "postgresql"):
        raise InvalidInput(f"Parameter 'database_url': {shown!r} is not a SQLite or PostgreSQL URL")
    return text


def _check_persona(key: str, store: Store | None) -> None:
    """`key` names a persona in `store`; without a store to look in, it at least reads as a persona key."""
    if store is None:
        if not KEY_PATTERN.match(key):
            raise InvalidInput(
                f"Parameter 'persona': {key!r} is not a persona key (1-64 lower-case letters, digits, '-' or '_')"
            )
        return
    with store.session() as session:
        if session.scalar(select(Persona.id).where(Persona.key == key)) is not None:
            return
        known = list(session.scalars(select(Persona.key).order_by(Persona.key).limit(KNOWN_KEYS_SHOWN + 1)))
    listed = ", ".join(known[:KNOWN_KEYS_SHOWN]) + (", …" if len(known) > KNOWN_KEYS_SHOWN else "")
    raise InvalidInput(f"Parameter 'persona': {key!r} is not a persona in the store; known: {listed or 'none'}")


def coerce_parameters(
    name: str, parameters: Mapping[str, Any] | None, *, today: date | None = None, store: Store | None = None
) -> dict[str, Any]:
    """Check the keys against the report's parameters cell and the values against what they mean, and turn them
    into what the notebook expects.

    With `store`, a persona must exist in it, unless the run reads another database (whose personas only the
    notebook sees): then, as without a store (a schedule file checked when it loads), it must read as a key.
    """
    defaults = report_parameters(name)
    out: dict[str, Any] = {}
    for key, raw in (parameters or {}).items():
        if key not in defaults:
            allowed = ", ".join(defaults) or "none"
            raise InvalidInput(f"Unknown parameter {key!r} for report {name!r}; allowed: {allowed}")
        out[key] = _coerce(name, key, raw, defaults[key], today)
    since, until = out.get("since"), out.get("until")
    if since and until and since > until:  # ISO dates compare correctly as strings
        raise InvalidInput(f"Parameter 'since' ({since}) is after 'until' ({until})")
    if out.get("persona") is not None:
        _check_persona(out["persona"], None if out.get("database_url") else store)
    return out


def _kernel_name() -> str:
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    fix = f"run `{sys.executable} -m ipykernel install --sys-prefix`"
    try:
        spec = KernelSpecManager().get_kernel_spec(KERNEL_NAME)
    except NoSuchKernel:
        raise ConfigError(f"No Jupyter kernel {KERNEL_NAME!r} for report notebooks: {fix}") from None
    exe = spec.argv[0] if spec.argv else ""
    plain = {"python", f"python{sys.version_info[0]}", f"python{sys.version_info[0]}.{sys.version_info[1]}"}
    # A user-level kernelspec of the same name could point at another Python without our packages.
    if exe not in plain and os.path.abspath(exe) != os.path.abspath(sys.executable):
        raise ConfigError(
            f"The Jupyter kernel {KERNEL_NAME!r} runs {exe}, not this environment's Python ({sys.executable}): {fix}"
        )
    return KERNEL_NAME


def _kernel_env(settings: Settings, store: Store, database_url: str | None = None) -> dict[str, str]:
    """The kernel's environment: ours, plus the effective settings as CALLBOT_* variables, so the notebook's
    own `Settings()` reads the same store and runtime folder even when the caller passed settings in code, plus
    the database the run reads when it is not the store."""
    env = dict(os.environ)
    for field in type(settings).model_fields:
        value = getattr(settings, field)
        if value is None:
            continue
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        env[f"CALLBOT_{field.upper()}"] = str(value)
    env["CALLBOT_RUNTIME_DIR"] = str(settings.resolved_runtime_dir())
    env["CALLBOT_DATABASE_URL"] = store.url
    env.pop(DATABASE_URL_ENV, None)  # one left in our own environment must not redirect a run that asked for none
    if database_url:
        env[DATABASE_URL_ENV] = database_url
    # callbot_core is normally installed (editable) in the venv; this also covers a plain source checkout.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(PROJECT_ROOT), env.get("PYTHONPATH", "")) if p)
    return env


@functools.cache
def _register_engine() -> str:
    """A papermill engine that passes an environment and working folder to the kernel and reports progress
    per cell: papermill's own nbclient engine does neither."""
    from papermill.clientwrap import PapermillNotebookClient
    from papermill.engines import NBClientEngine, papermill_engines

    class CallbotEngine(NBClientEngine):
        @classmethod
        def execute_managed_notebook(  # type: ignore[override]
            cls,
            nb_man: Any,
            kernel_name: str,
            log_output: bool = False,
            stdout_file: Any = None,
            stderr_file: Any = None,
            start_timeout: int = KERNEL_START_TIMEOUT_S,
            execution_timeout: int | None = None,
            *,
            kernel_env: dict[str, str] | None = None,
            kernel_cwd: str | None = None,
            progress: Progress | None = None,
            **_ignored: Any,
        ) -> Any:
            total = len(nb_man.nb.cells)
            if progress is not None:
                complete = nb_man.cell_complete

                def cell_complete(cell: Any, cell_index: int | None = None, **kwargs: Any) -> Any:
                    result = complete(cell, cell_index=cell_index, **kwargs)
                    progress((cell_index or 0) + 1, total)
                    return result

                nb_man.cell_complete = cell_complete
                progress(0, total)
            client = PapermillNotebookClient(
                nb_man,
                timeout=execution_timeout or CELL_TIMEOUT_S,
                startup_timeout=start_timeout,
                kernel_name=kernel_name,
                log=logging.getLogger("papermill"),
                log_output=log_output,
                stdout_file=stdout_file,
                stderr_file=stderr_file,
                # The kernel writes to our stderr; at its default level that is a transport warning on every
                # run. Cell errors still reach the notebook (and the run's error), which is what matters.
                extra_arguments=["--IPKernelApp.log_level=ERROR"],
            )
            launch: dict[str, Any] = {}
            if kernel_env is not None:
                launch["env"] = kernel_env
            if kernel_cwd is not None:
                launch["cwd"] = kernel_cwd
            return client.execute(**launch)

    papermill_engines.register("callbot", CallbotEngine)
    return "callbot"


# Outputs reference CDN scripts that an offline reader cannot load and the report does not need: require.js and
# MathJax from nbconvert's template, MathJax again from each plotly figure. plotly.js itself is inline.
_EXTERNAL_SCRIPT = re.compile(r"<script[^>]*\bsrc=[\"']https?://[^\"']*[\"'][^>]*>\s*</script>", re.IGNORECASE)


def export_html(notebook_path: Path, html_path: Path, *, title: str) -> None:
    """The executed notebook as one HTML file without code: outputs, charts and error cells only."""
    import nbformat
    from nbconvert import HTMLExporter

    nb = nbformat.read(notebook_path, as_version=4)
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb, resources={"metadata": {"name": title}})
    _create_private(html_path)
    html_path.write_text(_EXTERNAL_SCRIPT.sub("", body), encoding="utf-8")


def _create_private(path: Path) -> None:
    """An empty file only its owner may read. Writers that open it with "w" (papermill, `write_text`) keep its
    mode, so a report (the store's data, the store's address) is never readable by other accounts, not even
    while it is being written."""
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    os.chmod(path, 0o600)  # O_CREAT leaves an existing file's mode as it was


def _written(path: Path) -> bool:
    return path.is_file() and path.stat().st_size > 0


def _scrub_notebook(path: Path, secrets: tuple[str, ...]) -> None:
    """Mask the run's passwords wherever an output echoes one (a driver's error, a traceback quoting a URL)."""
    if not secrets:
        return
    import nbformat

    def scrubbed(value: Any) -> Any:
        if isinstance(value, str):
            return scrub(value, *secrets)
        if isinstance(value, dict):
            for k, v in value.items():
                value[k] = scrubbed(v)
        elif isinstance(value, list):
            value[:] = [scrubbed(v) for v in value]
        return value

    nb = nbformat.read(path, as_version=4)
    nbformat.write(scrubbed(nb), path)


def _cell_error(exc: BaseException) -> str:
    from papermill.exceptions import PapermillExecutionError

    if isinstance(exc, PapermillExecutionError):
        return f"{exc.ename}: {exc.evalue} (cell In [{exc.exec_count}])"
    return f"{type(exc).__name__}: {exc}"


def run_report(
    store: Store,
    name: str,
    parameters: Mapping[str, Any] | None = None,
    *,
    actor: Actor,
    progress: Progress | None = None,
    settings: Settings | None = None,
    on_start: Callable[[int], None] | None = None,
) -> ReportRunInfo:
    """Run a report notebook now as `actor` and return its stored run (succeeded or failed; a failure is not raised).

    Raises PermissionDenied, NotFound for an unknown report and InvalidInput for bad parameters, before anything
    is stored. `on_start` gets the run's id once its row is stored: a front end that runs the report in the
    background (the HTTP API) answers with it before the notebook finishes.
    """
    import papermill

    require(actor, "report.run")
    path = report_path(name)
    values = coerce_parameters(name, parameters, store=store)
    database_url = values.get("database_url")
    if database_url is not None:
        # The notebook reads whatever that URL reaches, with the server's network access: an admin's call.
        require(actor, "report.other_database")
    settings = settings or get_settings()
    kernel = _kernel_name()
    out_dir = settings.resolved_runtime_dir() / "reports"
    out_dir.mkdir(mode=0o700, parents=True, exist_ok=True)

    # Runs are listed to everyone and papermill writes its parameters into the notebook: both get the URL with its
    # password masked, and the kernel the real one through its environment. Passwords that still turn up in an
    # output or an error (a driver quoting what it was given) are masked by name.
    shown = {**values, "database_url": redact_url(database_url)} if database_url else dict(values)
    secrets = tuple(
        {p for p in (url_password(database_url), url_password(store.url), url_password(settings.database_url)) if p}
    )
    with store.session() as session:
        row = ReportRun(
            name=name, parameters=shown, requested_by=actor.username, status="running", worker=runs.worker_id()
        )
        session.add(row)
        session.flush()
        run_id = row.id
        audit.record(session, "report.run", actor=actor.username, target=f"{name}#{run_id}", detail=shown)
    if on_start is not None:
        on_start(run_id)

    nb_path = out_dir / f"{run_id}-{name}.ipynb"
    html_path = out_dir / f"{run_id}-{name}.html"
    status, error = "failed", "interrupted before the notebook finished"
    try:
        _create_private(nb_path)
        papermill.execute_notebook(
            str(path),
            str(nb_path),
            parameters=shown,
            engine_name=_register_engine(),
            kernel_name=kernel,
            progress_bar=False,
            log_output=False,
            start_timeout=KERNEL_START_TIMEOUT_S,
            kernel_env=_kernel_env(settings, store, database_url),
            # The runtime folder, not the notebooks' own: an installed package may sit on a read-only filesystem.
            kernel_cwd=str(out_dir),
            progress=progress,
        )
        status, error = "succeeded", None
    except Exception as exc:
        error = scrub(_cell_error(exc), *secrets)
        log.info("report %s run %s failed: %s", name, run_id, error)
    finally:
        html: str | None = None
        if _written(nb_path):
            # Also after a failure: papermill saved the notebook up to the failing cell, which the HTML shows.
            try:
                _scrub_notebook(nb_path, secrets)
                export_html(nb_path, html_path, title=f"{name} #{run_id}")
                html = str(html_path)
            except Exception as exc:
                status = "failed"
                failure = scrub(f"HTML export failed: {type(exc).__name__}: {exc}", *secrets)
                error = (error + "; " if error else "") + failure
        else:
            nb_path.unlink(missing_ok=True)  # papermill failed before writing anything into it
        with store.session() as session:
            row = session.get_one(ReportRun, run_id)
            row.status = status
            row.error = error
            row.finished_at = utcnow()
            row.output_notebook = str(nb_path) if nb_path.is_file() else None
            row.output_html = html
            session.flush()
            info = _info(row)
    return info


def list_runs(store: Store, limit: int = 100) -> list[ReportRunInfo]:
    """The newest report runs first; runs whose process died are ended first, so none waits for ever."""
    runs.reap_stale(store)
    with store.session() as session:
        rows = session.scalars(select(ReportRun).order_by(ReportRun.id.desc()).limit(limit))
        return [_info(r) for r in rows]


def get_run(store: Store, run_id: int) -> ReportRunInfo:
    with store.session() as session:
        row = session.get(ReportRun, run_id)
        if row is None:
            raise NotFound(f"No report run {run_id}")
        return _info(row)
