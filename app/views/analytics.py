"""Analytics: read-only SQL over the store's snapshot, canned queries, a quick chart, downloads."""

from __future__ import annotations

import pandas as pd
import plotly.express as px
import streamlit as st

from app.common import FAILED, allowed, analytics, client_addr, current_user, run_action, safe_markdown, store
from callbot_core.analytics import VIEW_DOCS
from callbot_core.analytics.charts import table_bytes
from callbot_core.analytics.guard import MAX_SQL_CHARS
from callbot_core.analytics.saved import delete_query, list_queries, save_query

SQL = "analytics_sql"
RESULT = "analytics_result"
CHART_KINDS = ("bar", "line", "scatter", "histogram")

user = current_user()
st.title("Analytics")
st.caption(
    "Read-only SQL (DuckDB dialect) over a snapshot of the store that is brought up to date before each query. "
    "Anything that writes or reaches outside the store is refused."
)

queries = list_queries(store(), user.id)
left, right = st.columns([2, 1])
with right:
    st.markdown("**Canned queries**")
    labels = {
        i: f"{q.name}" + (" (built in)" if q.builtin else f" · {q.owner}" + (" · shared" if q.shared else ""))
        for i, q in enumerate(queries)
    }
    picked = st.selectbox(
        "Canned query", list(labels), format_func=labels.get, index=None, placeholder="Choose a query",
        key="analytics_canned", label_visibility="collapsed",
    )  # fmt: skip
    if picked is not None:
        chosen = queries[picked]
        st.caption(safe_markdown(chosen.description or ""))
        if st.button("Load into the editor", key="analytics_load"):
            st.session_state[SQL] = chosen.sql
            st.rerun()
        may_delete = not chosen.builtin and (chosen.owner == user.username or allowed("query.delete_others"))
        if (
            may_delete
            and st.button("Delete this saved query", key="analytics_delete")
            and run_action(delete_query, store(), chosen.id, actor=user) is not FAILED  # type: ignore[arg-type]
        ):
            st.session_state.pop("analytics_canned", None)
            st.rerun()
    with st.expander("Views you can query"):
        for view in VIEW_DOCS:
            st.markdown(f"**`{view.name}`** — {view.description}")
            st.dataframe(pd.DataFrame(view.columns, columns=["column", "meaning"]), hide_index=True, width="stretch")

with left:
    st.session_state.setdefault(SQL, queries[0].sql if queries else "select * from turns limit 10")
    sql = st.text_area("SQL", key=SQL, height=160, max_chars=MAX_SQL_CHARS)
    c1, c2, c3 = st.columns([1, 1, 2])
    max_rows = c2.number_input("Rows shown", min_value=10, max_value=10_000, value=1000, step=100, key="analytics_rows")
    if c1.button("Run", type="primary", key="analytics_run"):
        result = run_action(analytics().query, sql, max_rows=int(max_rows), actor=user, client_addr=client_addr())
        if result is FAILED:
            st.session_state.pop(RESULT, None)
        else:
            st.session_state[RESULT] = result

    with st.expander("Save this query"), st.form("analytics_save", clear_on_submit=True):
        name = st.text_input("Name", key="analytics_save_name")
        description = st.text_input("Description", key="analytics_save_description")
        shared = st.checkbox("Share with every user", key="analytics_save_shared")
        overwrite = st.checkbox("Replace my query with this name", key="analytics_save_overwrite")
        if st.form_submit_button("Save"):
            saved = run_action(
                save_query, store(), name, sql, actor=user, description=description, shared=shared, overwrite=overwrite
            )
            if saved is not FAILED:
                st.toast(f"Saved {safe_markdown(repr(saved.name))}")

result = st.session_state.get(RESULT)
if result is not None:
    frame = result.to_df()
    note = f"{len(frame):,} row(s) in {result.elapsed_ms:,.0f} ms"
    if result.truncated:
        note += f" · only the first {len(frame):,} are shown: add a LIMIT or aggregate, or use `callbot sql --out`"
    st.caption(note)
    st.dataframe(frame, hide_index=True, width="stretch", key="analytics_table")

    d1, d2, _ = st.columns([1, 1, 4])
    d1.download_button("Download CSV", table_bytes(frame, "csv"), "query.csv", "text/csv", key="analytics_csv")
    d2.download_button(
        "Download Parquet", table_bytes(frame, "parquet"), "query.parquet", "application/vnd.apache.parquet",
        key="analytics_parquet",
    )  # fmt: skip

    if len(frame.columns) and len(frame):
        st.subheader("Chart")
        columns = list(frame.columns)
        k1, k2, k3, k4 = st.columns(4)
        kind = k1.selectbox("Chart", CHART_KINDS, key="analytics_chart_kind")
        x = k2.selectbox("X", columns, key="analytics_chart_x")
        color = k4.selectbox("Colour", [None, *columns], key="analytics_chart_color", format_func=lambda c: c or "none")
        numeric = [c for c in columns if pd.api.types.is_numeric_dtype(frame[c])]
        if kind == "histogram" or not numeric:
            k3.caption("Histogram of X" if kind == "histogram" else "No numeric column: showing a histogram of X")
            fig = px.histogram(frame, x=x, color=color)
        else:
            y = k3.selectbox("Y", numeric, key="analytics_chart_y")
            fig = getattr(px, kind)(frame, x=x, y=y, color=color)
        st.plotly_chart(fig, key="analytics_chart")
