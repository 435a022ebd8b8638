"""The Reports page opens a report without a deprecated Streamlit call (the app log stays quiet)."""

from __future__ import annotations

import logging
from pathlib import Path

from callbot_core.store import Store
from callbot_core.store.models import ReportRun, utcnow
from tests.app.helpers import PW, sign_in, view


class _Records(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_opening_a_report_uses_no_deprecated_call(app_store: Store, tmp_path: Path) -> None:
    html = tmp_path / "report.html"
    html.write_text("<html><body><h1>A report</h1></body></html>", encoding="utf-8")
    with app_store.session() as session:
        row = ReportRun(name="performance_report", parameters={}, requested_by="rita", status="succeeded",
                        finished_at=utcnow(), output_html=str(html))  # fmt: skip
        session.add(row)
        session.flush()
        run_id = row.id
    at = sign_in("rita", PW)
    at.switch_page(view("reports")).run()
    # Streamlit's loggers do not propagate to the root logger: listen on its deprecation logger itself.
    records = _Records()
    deprecation_log = logging.getLogger("streamlit.deprecation_util")
    deprecation_log.addHandler(records)
    try:
        at.selectbox(key="reports_open_select").select(run_id).run()
    finally:
        deprecation_log.removeHandler(records)
    assert not at.exception
    assert [b.label for b in at.get("download_button")] == ["Download the report (HTML)"]
    assert records.messages == []


def test_the_persona_is_picked_from_the_store_and_a_refusal_leaves_no_progress_bar(app_store: Store) -> None:
    at = sign_in("rita", PW)
    at.switch_page(view("reports")).run()
    at.selectbox(key="reports_name").select("performance_report").run()
    persona = at.selectbox(key="reports_param_performance_report_persona")
    assert "receptionist" in persona.options and persona.value is None  # None: all personas
    at.text_input(key="reports_param_performance_report_since").input("not a date")
    next(b for b in at.button if b.label == "Run report").click()
    at.run()
    assert [e.value for e in at.error] == [
        "Parameter 'since': 'not a date' is not a date; use YYYY-MM-DD, 'today' or '-Nd' (N days ago)"
    ]
    assert not at.get("progress")  # no "Starting the notebook…" left above the reason
