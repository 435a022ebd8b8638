"""`callbot eval`: run scenario suites as a grid over persona versions and parameters, list past batches.

A run is a measurement: failing assertions still exit 0. Only input that cannot be run (a bad suite
file, an unknown persona, a malformed --param) exits 1, with one line saying what is wrong.
"""

from __future__ import annotations

from pathlib import Path

import click
from sqlalchemy import case, func, select

from callbot_core.cli._common import acting_user, open_checked_store, open_service, parse_assignments, table
from callbot_core.errors import InvalidInput


def parse_param_option(values: tuple[str, ...]) -> dict[str, list[float]]:
    """`--param temperature=0.2,0.7` (repeatable) -> {"temperature": [0.2, 0.7]}."""
    from callbot_core.experiments.evals.runner import GRID_PARAMS

    given = parse_assignments(
        values,
        error="--param {raw} is not name=value[,value...], e.g. temperature=0.2,0.7",
        require_value=True,
        duplicate="--param {name} is given twice; list every value once: {name}=a,b",
    )
    grid: dict[str, list[float]] = {}
    for name, rest in given.items():
        raw = f"{name}={rest}"
        if name not in GRID_PARAMS:
            raise InvalidInput(f"--param {raw!r}: unknown parameter {name!r}; parameters: {', '.join(GRID_PARAMS)}")
        try:
            grid[name] = [float(v) for v in rest.split(",")]
        except ValueError:
            raise InvalidInput(f"--param {raw!r}: every value must be a number") from None
        if GRID_PARAMS[name] is int and any(v != int(v) for v in grid[name]):
            raise InvalidInput(f"--param {raw!r}: {name} takes whole numbers")
    return grid


@click.group("eval")
def eval_group() -> None:
    """Scenario suites: scripted caller turns with assertions, run against persona versions."""


@eval_group.command("run")
@click.argument("suite_path", metavar="SUITE", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--persona", "personas", multiple=True, metavar="KEY@V", help="A persona version (repeatable).")
@click.option("--repeat", default=1, show_default=True, type=int, help="Runs of each grid cell.")
@click.option("--param", "params", multiple=True, metavar="NAME=V1,V2", help="Parameter values to grid over.")
@click.option("--concurrency", default=2, show_default=True, type=int, help="Cells run at the same time.")
def eval_run(
    suite_path: Path, personas: tuple[str, ...], repeat: int, params: tuple[str, ...], concurrency: int
) -> None:
    """Run SUITE against every --persona × --param combination and print a summary."""
    from callbot_core.experiments.evals import load_suite, run_suite
    from callbot_core.experiments.evals.runner import format_params

    suite = load_suite(suite_path)
    grid = parse_param_option(params)
    store = open_checked_store()
    service = open_service(store)
    actor = acting_user(store)
    bar_state: dict[str, int] = {"shown": 0}
    with click.progressbar(length=1, label=f"Running {suite.name}", file=click.get_text_stream("stderr")) as bar:

        def progress(done: int, total: int) -> None:
            # The total is only known once the grid is resolved; the bar is created before that.
            bar.length = total
            bar.update(done - bar_state["shown"])
            bar_state["shown"] = done

        batch = run_suite(
            service,
            suite,
            list(personas),
            params_grid=grid,
            repeat=repeat,
            concurrency=concurrency,
            actor=actor,
            progress=progress,
        )
    displayed = [r.display() for r in batch.summary()]
    click.echo(f"Batch {batch.batch} · suite {suite.name} · {len(batch.cells)} case(s)")
    if displayed:
        click.echo(table(list(displayed[0]), [tuple(d.values()) for d in displayed]))
    for cell in batch.cells:
        if cell.error:
            click.secho(f"run {cell.run_id} ({cell.persona}, {format_params(cell.params)}): {cell.error}", fg="red")


@eval_group.command("list")
@click.option("--limit", default=20, show_default=True, type=int)
def eval_list(limit: int) -> None:
    """Recent suite runs, one line per batch."""
    from callbot_core.jobs.runs import reap_stale
    from callbot_core.store.models import EvalRun

    store = open_checked_store()
    reap_stale(store)  # cells of a killed `callbot eval run` show as errors, not as running for ever
    with store.session() as session:
        # CASE sums count statuses the same way on SQLite and PostgreSQL.
        query = (
            select(
                EvalRun.batch,
                func.min(EvalRun.suite),
                func.min(EvalRun.started_at),
                func.count(),
                func.sum(case((EvalRun.status == "passed", 1), else_=0)),
                func.sum(case((EvalRun.status == "failed", 1), else_=0)),
                func.sum(case((EvalRun.status == "error", 1), else_=0)),
                func.sum(case((EvalRun.status == "running", 1), else_=0)),
            )
            .group_by(EvalRun.batch)
            .order_by(func.min(EvalRun.started_at).desc())
            .limit(limit)
        )
        rows = [
            (batch, suite, f"{started:%Y-%m-%d %H:%M}", n, p, f, e, r)
            for batch, suite, started, n, p, f, e, r in session.execute(query)
        ]
    if not rows:
        click.echo("No suite runs yet: `callbot eval run SUITE --persona KEY@V`.")
        return
    click.echo(table(["batch", "suite", "started", "cases", "passed", "failed", "error", "running"], rows))
