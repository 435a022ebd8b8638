"""Report runs and scenario suite runs, started in the background: the answer (202) names the run at once, and its
status is read back by id.

A run is checked the way the engine checks it before anything is stored (the actor's permission, the report or
suite, the parameters, the personas), and a refusal is the answer itself. Only then does the work go on in a
thread of this process: `run_report` stores a `report_runs` row as it starts, `run_suite` an `eval_runs` row per
cell. Runs whose process dies are ended by the engine's reaper (`jobs/runs.py`), so a status never reads
`running` for ever. A few runs at a time per process (`MAX_BACKGROUND_RUNS`): each report starts a kernel.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections import OrderedDict
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path as FilePath
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Path
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from callbot_core.access.permissions import Actor, require
from callbot_core.api.auth import Context, CurrentActor
from callbot_core.api.context import ApiContext
from callbot_core.api.errors import ERROR_RESPONSES, ApiError, ErrorBody
from callbot_core.api.routes.conversations import MAX_ID, PersonaRefText, PlainText
from callbot_core.errors import NotFound
from callbot_core.experiments.evals.runner import (
    GRID_PARAMS,
    BatchProgress,
    SummaryRow,
    batch_progress,
    new_batch_id,
    run_suite,
)
from callbot_core.experiments.evals.suite import Suite, load_suite, parse_suite, suite_files
from callbot_core.jobs import reports, runs
from callbot_core.store.models import EVAL_STATUSES

log = logging.getLogger(__name__)

router = APIRouter(responses=ERROR_RESPONSES)

MAX_BACKGROUND_RUNS = 2
MAX_CELLS = 200  # persona versions x parameter combinations x repeats in one suite run
BATCHES_KEPT = 100  # suite runs whose progress and summary this process remembers

BUSY = {429: {"model": ErrorBody, "description": "Too many runs going in this process; see Retry-After"}}
NOT_FOUND = {404: {"model": ErrorBody, "description": "No such run"}}


# -- runs going on in this process --------------------------------------------------------------------------


@dataclass
class _Batch:
    """A suite run started here: its progress while it runs, its summary once it is done."""

    batch: str
    suite: str
    total: int = 0
    done: int = 0
    status: Literal["running", "finished", "failed"] = "running"
    error: str | None = None
    summary: list[SummaryRow] | None = None


@dataclass
class _Background:
    lock: threading.Lock = field(default_factory=threading.Lock)
    running: int = 0
    batches: OrderedDict[str, _Batch] = field(default_factory=OrderedDict)

    def claim(self) -> None:
        with self.lock:
            if self.running >= MAX_BACKGROUND_RUNS:
                raise ApiError(429, "too_many_runs",
                               f"{self.running} runs are going in this server already; try again when one ends",
                               {"Retry-After": "30"})  # fmt: skip
            self.running += 1

    def release(self) -> None:
        with self.lock:
            self.running -= 1

    def remember(self, state: _Batch) -> None:
        with self.lock:
            self.batches[state.batch] = state
            while len(self.batches) > BATCHES_KEPT:
                self.batches.popitem(last=False)


def _background(ctx: ApiContext) -> _Background:
    return ctx.parts.setdefault("background_runs", _Background())


async def _start_in_background(ctx: ApiContext, name: str, work: Any, accepted: Future[Any]) -> Any:
    """Run `work` in a thread; answer with what it puts in `accepted` once the engine has accepted the run, or
    raise what the engine refused it with."""
    bg = _background(ctx)
    bg.claim()

    def _run() -> None:
        try:
            work()
        except BaseException as exc:
            if not accepted.done():
                accepted.set_exception(exc)
            else:  # accepted, then failed: the stored run says so; this is for the log
                log.exception("Background run %s failed", name)
        finally:
            bg.release()

    threading.Thread(target=_run, name=name, daemon=True).start()
    return await asyncio.wrap_future(accepted)


# -- reports ------------------------------------------------------------------------------------------------


class ReportOut(BaseModel):
    name: str
    parameters: dict[str, Any] = Field(description="Its parameters and their defaults")


class ReportRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    report: PlainText = Field(min_length=1, max_length=120, examples=["performance_report"])
    parameters: dict[PlainText, PlainText | int | float | bool | None] = Field(
        default_factory=dict, max_length=20, examples=[{"since": "-7d", "until": "today"}],
        description="since/until (YYYY-MM-DD, 'today', '-Nd'), persona, database_url (admins)",
    )  # fmt: skip


class ReportRunOut(BaseModel):
    id: int
    name: str
    parameters: dict[str, Any]
    requested_by: str | None
    status: str = Field(description="running, succeeded or failed")
    started_at: datetime
    finished_at: datetime | None
    duration_s: float | None
    error: str | None
    has_html: bool = Field(description="GET /v1/reports/runs/{id}/html gives the report")

    @classmethod
    def of(cls, info: reports.ReportRunInfo) -> ReportRunOut:
        return cls(
            id=info.id, name=info.name, parameters=info.parameters, requested_by=info.requested_by,
            status=info.status, started_at=info.started_at, finished_at=info.finished_at,
            duration_s=info.duration_s, error=info.error, has_html=bool(info.output_html),
        )  # fmt: skip


RunId = Annotated[int, Path(ge=1, le=MAX_ID, description="A report run's id")]


@router.get("/v1/reports", response_model=list[ReportOut], tags=["reports"])
async def list_reports(actor: CurrentActor) -> list[ReportOut]:
    """The reports that can be run, with their parameters."""
    found = await run_in_threadpool(lambda: [(n, reports.report_parameters(n)) for n in sorted(reports.REPORTS)])
    return [ReportOut(name=n, parameters=p) for n, p in found]


@router.post("/v1/reports/runs", response_model=ReportRunOut, status_code=202, tags=["reports"], responses={
    404: {"model": ErrorBody, "description": "No such report"}, **BUSY,
})  # fmt: skip
async def start_report_run(body: ReportRunRequest, ctx: Context, actor: CurrentActor) -> ReportRunOut:
    """Start a report run in the background; the answer is the stored run (`running`). Bad parameters, an unknown
    report or a role that may not run reports are refused before anything is stored."""
    accepted: Future[int] = Future()

    def work() -> None:
        reports.run_report(ctx.store, body.report, body.parameters, actor=actor, settings=ctx.settings,
                           on_start=accepted.set_result)  # fmt: skip

    run_id = await _start_in_background(ctx, f"report-{body.report}", work, accepted)
    return ReportRunOut.of(await run_in_threadpool(reports.get_run, ctx.store, run_id))


@router.get("/v1/reports/runs", response_model=list[ReportRunOut], tags=["reports"])
async def list_report_runs(ctx: Context, actor: CurrentActor) -> list[ReportRunOut]:
    """The latest 100 report runs, newest first."""

    def _list() -> list[reports.ReportRunInfo]:
        require(actor, "conversation.read")  # a report shows the store's conversations
        return reports.list_runs(ctx.store)

    return [ReportRunOut.of(r) for r in await run_in_threadpool(_list)]


def _report_run(ctx: ApiContext, actor: Actor, run_id: int) -> reports.ReportRunInfo:
    require(actor, "conversation.read")
    runs.reap_stale(ctx.store)  # a run whose process died reads as failed, not as running for ever
    return reports.get_run(ctx.store, run_id)


@router.get("/v1/reports/runs/{run_id}", response_model=ReportRunOut, tags=["reports"], responses=NOT_FOUND)
async def report_run_status(run_id: RunId, ctx: Context, actor: CurrentActor) -> ReportRunOut:
    """A report run's status: running, succeeded or failed (with the error)."""
    return ReportRunOut.of(await run_in_threadpool(_report_run, ctx, actor, run_id))


@router.get(
    "/v1/reports/runs/{run_id}/html",
    response_class=Response,
    tags=["reports"],
    responses={
        200: {"description": "The report as one HTML file", "content": {"text/html": {"schema": {"type": "string"}}}},
        **NOT_FOUND,
    },
)
async def report_run_html(run_id: RunId, ctx: Context, actor: CurrentActor) -> Response:
    """The run's report as a download. Served sandboxed (`Content-Security-Policy: sandbox`): it is made from the
    store's data, and a script in it must not act as this API's origin."""
    info = await run_in_threadpool(_report_run, ctx, actor, run_id)
    if not info.output_html or not FilePath(info.output_html).is_file():
        raise NotFound(f"Report run {run_id} has no HTML ({info.status})")
    return FileResponse(
        info.output_html,
        media_type="text/html",
        filename=f"{info.name}-{info.id}.html",
        headers={"Content-Security-Policy": "sandbox allow-scripts", "X-Content-Type-Options": "nosniff"},
    )


# -- scenario suites ----------------------------------------------------------------------------------------


class EvalRunRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    suite: PlainText | None = Field(None, min_length=1, max_length=120, examples=["receptionist"],
                                    description="A suite by name (shipped, or in CALLBOT_SUITES_DIR)")  # fmt: skip
    suite_yaml: PlainText | None = Field(None, min_length=1, max_length=200_000, description="Or a suite given inline")
    personas: list[Annotated[PersonaRefText, Field(min_length=1, max_length=100)]] = Field(
        default_factory=list, max_length=20, description="key@version refs (default: the suite's own persona)"
    )
    params: dict[str, list[float]] = Field(
        default_factory=dict, description="Values to grid over: temperature, top_p, max_tokens, seed",
        examples=[{"temperature": [0.2, 0.7]}],
    )  # fmt: skip
    repeat: int = Field(1, ge=1, le=20)
    concurrency: int = Field(2, ge=1, le=8)


class EvalSummaryOut(BaseModel):
    persona: str
    params: dict[str, Any]
    cases: int
    passed: int
    errors: int
    assertions: int
    assertions_passed: int
    pass_rate: float = Field(description="The share of checks passed")
    mean_similarity: float | None
    mean_judge: float | None
    ttft_p50_ms: float | None

    @classmethod
    def of(cls, row: SummaryRow) -> EvalSummaryOut:
        return cls(
            persona=row.persona, params=row.params, cases=row.cases, passed=row.passed, errors=row.errors,
            assertions=row.assertions, assertions_passed=row.assertions_passed, pass_rate=row.assertion_pass_rate,
            mean_similarity=row.mean_similarity, mean_judge=row.mean_judge, ttft_p50_ms=row.ttft_p50_ms,
        )  # fmt: skip


class EvalBatchOut(BaseModel):
    batch: str
    suite: str
    status: Literal["running", "finished", "failed"]
    cells_total: int | None = Field(description="Cells in the grid (known for runs started by this server)")
    cells_done: int | None
    cells: dict[str, int] = Field(description="Stored cells by status: running, passed, failed, error")
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = Field(description="Why the run stopped, when it failed as a whole")
    summary: list[EvalSummaryOut] | None = Field(
        description="Per persona version and parameter set, once finished (runs started by this server)"
    )


BatchId = Annotated[str, Path(pattern=r"^[A-Za-z0-9_.:-]{1,64}$", description="A suite run's batch id")]


def _suite(ctx: ApiContext, body: EvalRunRequest) -> Suite:
    if (body.suite is None) == (body.suite_yaml is None):
        raise ApiError(422, "invalid_request", "Give either suite (a suite's name) or suite_yaml (a suite), not both")
    if body.suite_yaml is not None:
        return parse_suite(body.suite_yaml, source="suite_yaml", default_name="inline")
    # By name only: a path from a client would let it read any file the server can.
    files = suite_files(ctx.settings.suites_dir)
    path = files.get(body.suite) or files.get(f"{body.suite}.yaml")  # type: ignore[arg-type]
    if path is None:
        known = ", ".join(n.removesuffix(".yaml") for n in files) or "none"
        raise NotFound(f"No suite {body.suite!r}; suites: {known}")
    return load_suite(path)


def _grid(params: dict[str, list[float]]) -> dict[str, list[float]]:
    for name, values in params.items():
        if name not in GRID_PARAMS:
            raise ApiError(
                422, "invalid_input", f"params: unknown parameter {name!r}; parameters: {', '.join(GRID_PARAMS)}"
            )
        if not values or len(values) > 20:
            raise ApiError(422, "invalid_input", f"params.{name}: give 1 to 20 values")
        if GRID_PARAMS[name] is int and any(v != int(v) for v in values):
            raise ApiError(422, "invalid_input", f"params.{name}: {name} takes whole numbers")
    return params


@router.get("/v1/evals/suites", response_model=list[str], tags=["evals"])
async def list_suites(ctx: Context, actor: CurrentActor) -> list[str]:
    """The suites that can be run by name."""
    return [name.removesuffix(".yaml") for name in suite_files(ctx.settings.suites_dir)]


@router.post("/v1/evals/runs", response_model=EvalBatchOut, status_code=202, tags=["evals"], responses={
    404: {"model": ErrorBody, "description": "No such suite, persona or version"}, **BUSY,
})  # fmt: skip
async def start_eval_run(body: EvalRunRequest, ctx: Context, actor: CurrentActor) -> EvalBatchOut:
    """Run a scenario suite against persona versions (x parameter grid x repeats) in the background; the answer
    names the batch. Each cell is stored as it runs, with its conversation (channel `api`)."""
    suite = await run_in_threadpool(_suite, ctx, body)
    grid = _grid(body.params)
    cells = max(1, len(set(body.personas))) * body.repeat
    for values in grid.values():
        cells *= len(set(values))
    if cells > MAX_CELLS:
        raise ApiError(422, "invalid_input", f"The grid has {cells} cells; at most {MAX_CELLS} per run")
    state = _Batch(batch=new_batch_id(), suite=suite.name)
    accepted: Future[None] = Future()

    def progress(done: int, total: int) -> None:
        state.total, state.done = total, done
        if not accepted.done():  # the first call: every check has passed, cells are about to be stored
            accepted.set_result(None)

    def work() -> None:
        try:
            result = run_suite(
                ctx.service, suite, body.personas, params_grid=grid, repeat=body.repeat,
                concurrency=body.concurrency, actor=actor, progress=progress, batch_id=state.batch,
            )  # fmt: skip
        except BaseException as exc:
            if accepted.done():
                state.status, state.error = (
                    "failed",
                    str(exc).strip().splitlines()[0] if str(exc).strip() else repr(exc),
                )
            raise
        state.summary = result.summary()
        state.status = "finished"

    await _start_in_background(ctx, f"eval-{state.batch}", work, accepted)
    _background(ctx).remember(state)
    return _batch_out(state, None)


def _batch_out(state: _Batch | None, stored: BatchProgress | None) -> EvalBatchOut:
    """What this process knows of a batch it runs (`state`) with what the store holds of it (`stored`)."""
    cells = dict(stored.cells) if stored is not None else dict.fromkeys(EVAL_STATUSES, 0)
    started = stored.started_at if stored is not None else None
    if state is None:  # started elsewhere (`callbot eval run`, another replica) or before this process
        assert stored is not None
        return EvalBatchOut(
            batch=stored.batch, suite=stored.suite, status="running" if cells["running"] else "finished",
            cells_total=None, cells_done=None, cells=cells, started_at=started, finished_at=stored.finished_at,
            error=None, summary=None,
        )  # fmt: skip
    return EvalBatchOut(
        batch=state.batch, suite=state.suite, status=state.status, cells_total=state.total, cells_done=state.done,
        cells=cells, started_at=started,
        finished_at=stored.finished_at if stored is not None and state.status != "running" else None,
        error=state.error, summary=[EvalSummaryOut.of(r) for r in state.summary] if state.summary else None,
    )  # fmt: skip


@router.get("/v1/evals/runs/{batch}", response_model=EvalBatchOut, tags=["evals"], responses=NOT_FOUND)
async def eval_run_status(batch: BatchId, ctx: Context, actor: CurrentActor) -> EvalBatchOut:
    """A suite run's status: its cells by status as stored and, for a run this server started, its progress and,
    once finished, the summary per persona version and parameter set."""

    def _status() -> EvalBatchOut:
        require(actor, "conversation.read")  # the cells are conversations
        state = _background(ctx).batches.get(batch)
        stored = batch_progress(ctx.store, batch)
        if state is None and stored is None:
            raise NotFound(f"No suite run {batch!r}")
        return _batch_out(state, stored)

    return await run_in_threadpool(_status)
