"""Dashboards: the store's performance and conversation charts, filtered, exportable as offline HTML."""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

import streamlit as st

from app.common import analytics, client_addr, current_user, filter_picker, store
from callbot_core.access import audit
from callbot_core.analytics import DashboardFilters, dashboard_data
from callbot_core.analytics.charts import dashboard_figures, dashboard_html, dashboard_table, table_bytes
from callbot_core.backends.llm import available_backends
from callbot_core.errors import CallbotError
from callbot_core.personas.catalog import persona_catalog

EXPORT = "dash_export_files"

user = current_user()
st.title("Dashboards")

with st.container(border=True):
    f1, f2, f3 = st.columns([3, 2, 2])
    today = datetime.now(UTC).date()
    dates = f1.date_input(
        "Conversations started between", (today - timedelta(days=30), today), max_value=today,
        key="dash_dates", format="YYYY-MM-DD",
    )  # fmt: skip
    persona = filter_picker("Persona", [p.key for p in persona_catalog(store())], key="dash_persona", where=f2)
    backend = filter_picker("Backend", available_backends(), key="dash_backend", where=f3)

since = until = None
if isinstance(dates, tuple | list) and len(dates) == 2:
    since = datetime.combine(dates[0], time.min, tzinfo=UTC)
    until = datetime.combine(dates[1], time.min, tzinfo=UTC) + timedelta(days=1)
filters = DashboardFilters(
    since=since,
    until=until,
    persona=persona,
    backend=backend,
)
subtitle = (
    f"{dates[0]} to {dates[-1]} · persona {persona or 'All'} · backend {backend or 'All'}"
    if isinstance(dates, tuple | list) and dates
    else ""
)

try:
    frames = dashboard_data(analytics(), filters)
except CallbotError as exc:
    st.error(str(exc))
    st.stop()
figures = dashboard_figures(frames)

with st.container(border=True):
    st.markdown("**Export dashboard**")
    e1, e2, e3 = st.columns([2, 1, 3])
    fmt = e2.selectbox("Data as", ["csv", "parquet"], key="dash_export_fmt", label_visibility="collapsed")
    if e1.button("Export dashboard", key="dash_export"):
        st.session_state[EXPORT] = (
            dashboard_html(figures, title="Callbot Workbench dashboard", subtitle=subtitle).encode("utf-8"),
            table_bytes(dashboard_table(frames), fmt),
            fmt,
        )
        audit.log(store(), "dashboard.export", actor=user.username, detail={"filters": subtitle, "format": fmt},
                  client_addr=client_addr())  # fmt: skip
    prepared = st.session_state.get(EXPORT)
    if prepared:
        page, data, data_fmt = prepared
        with e3:
            st.download_button("Download dashboard (HTML, works offline)", page, "callbot-dashboard.html", "text/html",
                               key="dash_download_html")  # fmt: skip
            st.download_button(f"Download its data ({data_fmt.upper()})", data, f"callbot-dashboard.{data_fmt}",
                               key="dash_download_data")  # fmt: skip

names = list(figures)
for left, right in zip(names[::2], names[1::2] + [None] * (len(names) % 2), strict=True):
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures[left], key=f"dash_{left}")
    if right:
        c2.plotly_chart(figures[right], key=f"dash_{right}")
