"""Running a suite as a grid: persona versions × parameter combinations × repeats.

Each cell is one EvalRun row and one stored conversation (channel "api"), so a suite's replies sit
next to the user's own transcripts and the analytics views see them like any other turn.
"""

from __future__ import annotations

import contextlib
import itertools
import secrets
import statistics
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import select

from callbot_core.access.permissions import Actor, require
from callbot_core.backends.llm import GenerationParams, runs_serially
from callbot_core.conversations.service import ConversationService, mark_ended
from callbot_core.errors import CallbotError, InvalidInput
from callbot_core.experiments.evals.assertions import AssertionContext, Outcome, evaluate
from callbot_core.experiments.evals.suite import Suite
from callbot_core.jobs.runs import reap_stale, worker_id
from callbot_core.personas.catalog import get_persona_version
from callbot_core.personas.fields import FIELDS, params_for, with_overrides
from callbot_core.store import Store
from callbot_core.store.models import EVAL_STATUSES, EvalResult, EvalRun, utcnow

# Grid parameters a suite run may vary, and how each value is read (their ranges are in personas/fields.py).
GRID_PARAMS: dict[str, type] = {name: f.kind for name, f in FIELDS.items()}
Progress = Callable[[int, int], None]


@dataclass(frozen=True, slots=True)
class _Cell:
    ref: str  # key@version, resolved before anything runs
    version_id: int
    gen: GenerationParams  # the version's sampling with this cell's parameters on top
    params: dict[str, Any]
    repeat_index: int
    # Held around each generation when the backend runs one generation at a time (the embedded model):
    # cells then take turns generating while one cell's assertions and writes overlap the other's reply,
    # and a turn's TTFT never includes time spent waiting for the model.
    gate: threading.Lock | None = field(default=None, compare=False)


@dataclass(slots=True)
class CellResult:
    run_id: int
    persona: str
    params: dict[str, Any]
    repeat_index: int
    status: str
    error: str | None = None
    outcomes: list[tuple[int, str, Outcome]] = field(default_factory=list)  # (turn index, kind, outcome)
    ttft_ms: list[float] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class SummaryRow:
    persona: str
    params: dict[str, Any]
    cases: int
    passed: int
    errors: int
    assertions: int
    assertions_passed: int
    mean_similarity: float | None
    mean_judge: float | None
    ttft_p50_ms: float | None

    @property
    def pass_rate(self) -> float:
        return self.passed / self.cases if self.cases else 0.0

    @property
    def assertion_pass_rate(self) -> float:
        return self.assertions_passed / self.assertions if self.assertions else 0.0

    def display(self) -> dict[str, str]:
        """The row as the CLI and the Personas page show it, column name -> formatted value."""
        return {
            "persona": self.persona,
            "params": format_params(self.params),
            "runs": str(self.cases),
            "runs passed": str(self.passed),
            "checks": f"{self.assertions_passed}/{self.assertions}",
            # The share of checks passed: the leaderboard's pass_rate, so the two agree.
            "pass rate": f"{self.assertion_pass_rate:.0%}",
            "similarity": "-" if self.mean_similarity is None else f"{self.mean_similarity:.2f}",
            "judge": "-" if self.mean_judge is None else f"{self.mean_judge:.1f}",
            "TTFT p50 ms": "-" if self.ttft_p50_ms is None else f"{self.ttft_p50_ms:,.0f}",
        }


@dataclass(slots=True)
class BatchResult:
    batch: str
    suite: str
    cells: list[CellResult]

    def summary(self) -> list[SummaryRow]:
        """One row per (persona version, parameter set); a case is one cell repeat, passed when all its checks pass."""
        groups: dict[tuple[str, str], list[CellResult]] = {}
        for cell in self.cells:
            groups.setdefault((cell.persona, format_params(cell.params)), []).append(cell)
        rows = []
        for cells in groups.values():
            outcomes = [(kind, o) for c in cells for _, kind, o in c.outcomes]
            sims = [o.score for kind, o in outcomes if kind == "similar_to" and o.score is not None]
            judged = [o.score for kind, o in outcomes if kind == "judge" and o.score is not None]
            ttfts = [t for c in cells for t in c.ttft_ms]
            rows.append(
                SummaryRow(
                    persona=cells[0].persona,
                    params=cells[0].params,
                    cases=len(cells),
                    passed=sum(c.status == "passed" for c in cells),
                    errors=sum(c.status == "error" for c in cells),
                    assertions=len(outcomes),
                    assertions_passed=sum(o.passed for _, o in outcomes),
                    mean_similarity=statistics.fmean(sims) if sims else None,
                    mean_judge=statistics.fmean(judged) if judged else None,
                    ttft_p50_ms=statistics.median(ttfts) if ttfts else None,
                )
            )
        return rows


def format_params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sorted(params.items())) or "persona defaults"


def new_batch_id() -> str:
    # Sortable by time and unique across concurrent runs.
    return f"{utcnow():%Y%m%d-%H%M%S}-{secrets.token_hex(3)}"


def run_suite(
    service: ConversationService,
    suite: Suite,
    persona_refs: Sequence[str],
    *,
    params_grid: dict[str, list[float]] | None = None,
    repeat: int = 1,
    concurrency: int = 2,
    actor: Actor,
    progress: Progress | None = None,
    context: AssertionContext | None = None,
    batch_id: str | None = None,
) -> BatchResult:
    """Run every cell of the grid as `actor` (its runs record their username) and store it; bad input is refused
    before anything is stored. `batch_id` (from `new_batch_id`) lets a caller that runs it in the background name
    the batch before it ends; the first `progress(0, total)` says the input was accepted."""
    require(actor, "suite.run")
    refs = list(persona_refs) or ([suite.persona] if suite.persona else [])
    if not refs:
        raise InvalidInput(f"Suite {suite.name!r} names no persona: give at least one persona as key@version")
    if repeat < 1:
        raise InvalidInput(f"repeat must be at least 1, not {repeat}")
    if concurrency < 1:
        raise InvalidInput(f"concurrency must be at least 1, not {concurrency}")
    combos = _combinations(params_grid or {})
    versions: list[tuple[str, int, GenerationParams, threading.Lock | None]] = []
    gates: dict[str, threading.Lock] = {}
    with service.store.session() as session:
        for ref in dict.fromkeys(refs):  # the same version twice would only duplicate cells
            v = get_persona_version(session, ref)
            gate = None
            with contextlib.suppress(CallbotError):  # a backend that cannot be had fails in its cells, stored
                llm = service.backend(v.backend)
                gate = gates.setdefault(llm.name, threading.Lock()) if runs_serially(llm) else None
            versions.append((f"{v.persona.key}@{v.version}", v.id, params_for(v), gate))
    cells = [
        # Out-of-range grid values are refused here (personas/fields.py), before any cell is stored.
        _Cell(ref, vid, with_overrides(defaults, combo), combo, r, gate)
        for ref, vid, defaults, gate in versions
        for combo in combos
        for r in range(repeat)
    ]
    context = context or AssertionContext()
    if context.judge_backends is None:
        context.judge_backends = service.backend
    batch = BatchResult(batch_id or new_batch_id(), suite.name, [])
    total = len(cells)
    if progress:
        progress(0, total)
    workers = concurrency
    if cells and all(c.gate is not None for c in cells) and len({id(c.gate) for c in cells}) == 1:
        # Every cell needs the one serial model: a second thread could only wait for it, and measured it cost
        # (bench/eval_throughput.py: 0.73x with a waiting thread), so such a grid runs on one thread.
        workers = 1
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="eval") as pool:
        futures = [pool.submit(_run_cell, service, suite, batch.batch, cell, actor, context) for cell in cells]
        # Progress is reported from this thread only, so callers may drive a non-thread-safe progress bar.
        for done, future in enumerate(as_completed(futures), start=1):
            batch.cells.append(future.result())
            if progress:
                progress(done, total)
    batch.cells.sort(key=lambda c: c.run_id)
    return batch


@dataclass(frozen=True, slots=True)
class BatchProgress:
    """A batch's cells as the store holds them: how many are in each status, when the first started and, once
    none is running, when the last finished."""

    batch: str
    suite: str
    cells: dict[str, int]
    started_at: datetime
    finished_at: datetime | None


def batch_progress(store: Store, batch: str) -> BatchProgress | None:
    """The stored state of batch `batch`, or None when it has no cell stored (yet). Cells whose process died are
    ended first (`reap_stale`), so a killed run reads as errors, not as running for ever."""
    reap_stale(store)
    with store.session() as session:
        rows = session.execute(
            select(EvalRun.suite, EvalRun.status, EvalRun.started_at, EvalRun.finished_at).where(EvalRun.batch == batch)
        ).all()
    if not rows:
        return None
    cells = {status: 0 for status in EVAL_STATUSES}
    for row in rows:
        cells[row.status] += 1
    ends = [row.finished_at for row in rows]
    finished = None if cells["running"] or None in ends else max(e for e in ends if e is not None)
    return BatchProgress(batch, rows[0].suite, cells, min(row.started_at for row in rows), finished)


def _combinations(grid: dict[str, list[float]]) -> list[dict[str, Any]]:
    for name, values in grid.items():
        if name not in GRID_PARAMS:
            raise InvalidInput(f"Unknown parameter {name!r}; parameters: {', '.join(GRID_PARAMS)}")
        if not values:
            raise InvalidInput(f"Parameter {name!r} has no values")
    names = list(grid)
    typed = [[GRID_PARAMS[n](v) for v in dict.fromkeys(grid[n])] for n in names]
    return [dict(zip(names, values, strict=True)) for values in itertools.product(*typed)]


def _run_cell(
    service: ConversationService,
    suite: Suite,
    batch: str,
    cell: _Cell,
    actor: Actor,
    context: AssertionContext,
) -> CellResult:
    with service.store.session() as session:
        run = EvalRun(
            batch=batch,
            suite=suite.name,
            persona_version_id=cell.version_id,
            params=cell.params,
            repeat_index=cell.repeat_index,
            created_by=actor.username,
            status="running",
            worker=worker_id(),
        )
        session.add(run)
        session.flush()
        run_id = run.id
    result = CellResult(run_id, cell.ref, cell.params, cell.repeat_index, status="running")
    conversation_id: int | None = None
    gen = cell.gen
    try:
        if suite.simulate is not None:
            with cell.gate or contextlib.nullcontext():  # the caller shares the model: the whole call at once
                conversation_id = _run_simulated(service, suite, run_id, gen, result, context, actor)
            raise _Done
        # A serial backend (the embedded model) runs one cell's conversation at a time: interleaving two
        # conversations on one llama.cpp context would throw away its prompt cache on every turn (3x slower
        # measured) and count the wait for the model in TTFT. Other cells meanwhile set up and write results.
        with cell.gate or contextlib.nullcontext():
            info = service.start(cell.ref, channel="api", actor=actor)
            conversation_id = info.id
            with service.store.session() as session:
                session.get(EvalRun, run_id).conversation_id = conversation_id  # type: ignore[union-attr]
            for index, turn in enumerate(suite.turns):
                stream = service.send(conversation_id, turn.say, params=gen, actor=actor)
                # A backend failure is stored on the turn and carried by stream.result: judged below, not raised.
                with contextlib.suppress(CallbotError):
                    stream.text()
                turn_result = stream.result
                assert turn_result is not None
                if turn_result.ttft_ms is not None and turn_result.error is None:
                    result.ttft_ms.append(turn_result.ttft_ms)
                outcomes = [(a, evaluate(a, turn.say, turn_result, context)) for a in turn.expect]
                _store_outcomes(service, run_id, index, outcomes)
                result.outcomes += [(index, a.kind, o) for a, o in outcomes]
                if turn_result.error is not None:
                    # Later turns would run on a conversation missing a reply: measuring them would mislead.
                    result.error = f"turn {index + 1} failed: {turn_result.error}"
                    break
        raise _Done
    except _Done:
        if result.error:
            result.status = "error"
        else:
            result.status = "passed" if all(o.passed for _, _, o in result.outcomes) else "failed"
    except Exception as exc:  # one broken cell must not stop the batch; its row says what happened
        result.status = "error"
        result.error = str(exc) if isinstance(exc, CallbotError) else f"{type(exc).__name__}: {exc}"
    with service.store.session() as session:
        run = session.get(EvalRun, run_id)
        assert run is not None
        run.status = result.status
        run.error = result.error[:4000] if result.error else None
        run.finished_at = utcnow()
        if conversation_id is not None:
            # Ended without summaries: summarising every suite run would double its cost for nothing measured.
            mark_ended(session, conversation_id)
    return result


class _Done(Exception):
    """The cell ran to its end (scripted or simulated): judge its outcomes."""


def _store_outcomes(service: ConversationService, run_id: int, index: int, outcomes: list) -> None:  # type: ignore[type-arg]
    with service.store.session() as session:
        session.add_all(
            EvalResult(
                eval_run_id=run_id,
                turn_index=index,
                kind=a.kind,
                spec=a.spec,
                passed=o.passed,
                score=o.score,
                detail=o.detail[:4000],
            )
            for a, o in outcomes
        )


def _run_simulated(
    service: ConversationService,
    suite: Suite,
    run_id: int,
    gen: GenerationParams,
    result: CellResult,
    context: AssertionContext,
    actor: Actor,
) -> int | None:
    """A simulated caller drives the cell; `expect_each` is checked on every bot reply."""
    from callbot_core.experiments.simulated import CallerPersona, SimulatedTurn, simulate_call

    sim = suite.simulate
    assert sim is not None
    started: dict[str, int] = {}

    def on_start(conversation_id: int) -> None:
        started["id"] = conversation_id
        with service.store.session() as session:
            session.get(EvalRun, run_id).conversation_id = conversation_id  # type: ignore[union-attr]

    def on_turn(turn: SimulatedTurn) -> None:
        r = turn.result
        if r.ttft_ms is not None and r.error is None:
            result.ttft_ms.append(r.ttft_ms)
        outcomes = [(a, evaluate(a, turn.caller, r, context)) for a in suite.expect_each]
        _store_outcomes(service, run_id, turn.index, outcomes)
        result.outcomes += [(turn.index, a.kind, o) for a, o in outcomes]

    caller = CallerPersona(goal=sim.goal, personality=sim.personality, turns=sim.turns, opening=sim.opening)
    sim_result = simulate_call(
        service, result.persona, caller, params=gen, actor=actor, on_turn=on_turn, on_start=on_start
    )
    if sim_result.error:
        result.error = sim_result.error
    return started.get("id")
