"""Reports: notebook runs (papermill), opened as HTML; researchers and admins start runs with parameters."""

from __future__ import annotations

import html
from pathlib import Path

import pandas as pd
import streamlit as st

from app.common import FAILED, allowed, current_user, run_action, settings, store
from callbot_core.errors import CallbotError
from callbot_core.jobs.reports import DATE_PARAMETERS, REPORTS, get_run, list_runs, report_parameters, run_report
from callbot_core.personas.catalog import persona_catalog

OPEN = "reports_open_id"
REPORT_HEIGHT_PX = 900


def _sandboxed(page: str) -> str:
    """A page holding `page` in an iframe whose scripts run in an opaque origin of their own.

    A report is HTML made from the store's data and the run's parameters, and opened by everyone: whatever got
    into it must not act as the reader. `st.iframe` alone would not do, because its iframe is allowed both
    scripts and the app's origin, so a script in it could read the app's cookies and page through `parent`.
    Inside it, `sandbox="allow-scripts"` without `allow-same-origin` lets plotly draw the charts, but gives the
    report an origin of its own ("null"): `parent`, `top`, cookies and storage are out of its reach.
    """
    return (
        "<style>html, body { margin: 0; height: 100%; }</style>"
        f'<iframe sandbox="allow-scripts" title="Report" style="border: 0; width: 100%; height: 100%" '
        f'srcdoc="{html.escape(page, quote=True)}"></iframe>'
    )


user = current_user()
st.title("Reports")

may_run = allowed("report.run")
if may_run:
    with st.expander("Run a report", expanded=False):
        name = st.selectbox("Report", sorted(REPORTS), key="reports_name")
        defaults = report_parameters(name)
        if not allowed("report.other_database"):
            # Hidden for those the engine would refuse it: it reads whatever that URL reaches.
            defaults.pop("database_url", None)
        values: dict[str, str] = {}
        columns = st.columns(max(1, len(defaults)))
        for column, (key, default) in zip(columns, defaults.items(), strict=False):
            if key == "persona":
                # Chosen from the store's personas, not typed: a key that exists is the only one the run accepts.
                keys = [p.key for p in persona_catalog(store())]
                values[key] = (
                    column.selectbox(
                        key, keys, index=None, placeholder="All personas", key=f"reports_param_{name}_{key}"
                    )
                    or ""
                )
                continue
            values[key] = column.text_input(
                key, value="" if default is None else str(default), key=f"reports_param_{name}_{key}",
                help="YYYY-MM-DD, 'today' or '-7d' (seven days ago); leave empty for all"
                if key in DATE_PARAMETERS else "Leave empty for the default (the configured store)",
            )  # fmt: skip
        if st.button("Run report", type="primary", key="reports_run"):
            bar = st.progress(0.0, text="Starting the notebook…")

            def _progress(done: int, total: int) -> None:
                bar.progress(done / total if total else 1.0, text=f"Cell {done} of {total}")

            params = {k: v for k, v in values.items() if v.strip()}
            run = run_action(run_report, store(), name, params, actor=user, progress=_progress, settings=settings())
            if run is FAILED:
                bar.empty()  # refused before it started: no "Starting the notebook…" left above the reason
            else:
                st.session_state[OPEN] = run.id
                if run.status == "failed":
                    bar.empty()
                    st.error(f"Report run {run.id} failed: {run.error}")
                else:
                    bar.progress(1.0, text="Done")
                    st.success(f"Report run {run.id} finished.")

runs = list_runs(store(), limit=200)
if not runs:
    st.info("No report runs yet." + (" Run one above, or `callbot report run performance_report`." if may_run else ""))
    st.stop()

st.dataframe(
    pd.DataFrame(
        [
            {
                "id": r.id,
                "report": r.name,
                "parameters": ", ".join(f"{k}={v}" for k, v in (r.parameters or {}).items()),
                "by": r.requested_by or "",
                "started": r.started_at.strftime("%Y-%m-%d %H:%M:%S"),
                "finished": r.finished_at.strftime("%H:%M:%S") if r.finished_at else "",
                "status": r.status,
            }
            for r in runs
        ]
    ),
    hide_index=True,
    width="stretch",
    key="reports_table",
)

labels = {r.id: f"#{r.id} · {r.name} · {r.status} · {r.started_at:%Y-%m-%d %H:%M}" for r in runs}
current = st.session_state.get(OPEN)
chosen = st.selectbox(
    "Open a report", list(labels), format_func=labels.get, placeholder="Choose a run",
    index=list(labels).index(current) if current in labels else None, key="reports_open_select",
)  # fmt: skip
if chosen is not None:
    st.session_state[OPEN] = chosen
    try:
        run = get_run(store(), chosen)
    except CallbotError as exc:
        st.error(str(exc))
        st.stop()
    if run.status == "failed":
        st.error(f"This run failed: {run.error}")
    html_path = Path(run.output_html) if run.output_html else None
    if html_path is not None and html_path.is_file():
        page = html_path.read_text(encoding="utf-8")
        st.download_button("Download the report (HTML)", page.encode("utf-8"), html_path.name, "text/html",
                           key="reports_download")  # fmt: skip
        st.iframe(_sandboxed(page), height=REPORT_HEIGHT_PX)  # the report scrolls inside its own frame
    elif run.status == "running":
        st.info("This run is still going.")
    else:
        st.warning("This run has no HTML output.")
