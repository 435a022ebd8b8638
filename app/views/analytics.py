"""Analytics: read-only SQL over the store's snapshot, canned queries, a quick chart, downloads."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app.common import FAILED, allowed, analytics, client_addr, current_user, run_action, safe_markdown, store
from callbot_core.analytics import VIEW_DOCS
from callbot_core.analytics.charts import (
    QUICK_CHART_AGGREGATES,
    QUICK_CHART_KINDS,
    default_aggregate,
    quick_chart,
    quick_chart_defaults,
    quick_chart_measures,
    table_bytes,
)
from callbot_core.analytics.guard import MAX_SQL_CHARS
from callbot_core.analytics.saved import SavedQueryInfo, delete_query, list_queries, save_query
from callbot_core.errors import CallbotError

SQL = "analytics_sql"
RESULT = "analytics_result"
TAB = "analytics_tab"
RUN_NOW = "analytics_run_now"  # a canned query or a view was picked: run what is now in the editor
LOADED = "analytics_loaded"  # the saved query last loaded, which may be deleted
SAVED = "analytics_saved"  # what the last Save said
QUERY_TAB, VIEWS_TAB = "Query", "Views you can query"
SAVE_FIELDS = ("analytics_save_name", "analytics_save_description", "analytics_save_shared", "analytics_save_overwrite")
CHART_KEYS = ("analytics_chart_kind", "analytics_chart_x", "analytics_chart_y", "analytics_chart_color",
              "analytics_chart_agg")  # fmt: skip

user = current_user()
st.title("Analytics")
st.caption(
    "Read-only SQL (DuckDB dialect) over a snapshot of the store that is brought up to date before each query. "
    "Anything that writes or reaches outside the store is refused."
)


def load(sql: str, query: SavedQueryInfo | None = None) -> None:
    """Button callback (it runs before the page, so it may set the editor): put `sql` in the editor, run it."""
    st.session_state[SQL] = sql
    st.session_state[RUN_NOW] = True
    st.session_state[TAB] = QUERY_TAB
    st.session_state[LOADED] = query.id if query is not None and not query.builtin else None


def save() -> None:
    """Save button callback: saves what the editor holds as submitted with it, then empties the fields."""
    state = st.session_state
    try:
        saved = save_query(
            store(), state.get("analytics_save_name", ""), state.get(SQL, ""), actor=user,
            description=state.get("analytics_save_description", ""), shared=state.get("analytics_save_shared", False),
            overwrite=state.get("analytics_save_overwrite", False),
        )  # fmt: skip
    except CallbotError as exc:
        state[SAVED] = ("error", str(exc))
        return
    state[SAVED] = ("ok", f"Saved {saved.name!r}")
    for key in SAVE_FIELDS:
        state[key] = False if key.endswith(("shared", "overwrite")) else ""


def label(query: SavedQueryInfo) -> str:
    if query.builtin or query.owner == user.username:
        return safe_markdown(query.name)
    return safe_markdown(f"{query.name} · {query.owner}")


queries = list_queries(store(), user.id)
st.session_state.setdefault(SQL, queries[0].sql if queries else "select * from turns limit 10")
query_tab, views_tab = st.tabs([QUERY_TAB, VIEWS_TAB], key=TAB, on_change="rerun")

with views_tab:
    st.caption("Click a name to load `select * from <view> limit 100` into the editor and run it.")
    for doc in VIEW_DOCS:
        st.button(
            doc.name, key=f"analytics_view_{doc.name}", on_click=load,
            args=(f"select * from {doc.name} limit 100",), help=f"Show the first 100 rows of {doc.name}",
        )  # fmt: skip
        st.caption(doc.description)
        st.dataframe(
            pd.DataFrame(doc.columns, columns=["column", "meaning"]), hide_index=True, width="stretch",
            height="content", column_config={"column": st.column_config.TextColumn(width="medium"),
                                             "meaning": st.column_config.TextColumn(width="large")},
        )  # fmt: skip

with query_tab:
    editor, canned = st.columns([3, 1])
    with canned:
        st.markdown("**Canned queries**")
        st.caption("One click loads a query into the editor and runs it.")
        with st.container(height=300, border=False):
            for i, query in enumerate(queries):
                st.button(
                    label(query), key=f"analytics_canned_{query.id or f'builtin_{i}'}", on_click=load,
                    args=(query.sql, query), help=safe_markdown(query.description) or None, width="stretch",
                )  # fmt: skip
        loaded = next((q for q in queries if q.id is not None and q.id == st.session_state.get(LOADED)), None)
        if (
            loaded is not None
            and (loaded.owner == user.username or allowed("query.delete_others"))
            and st.button(f"Delete {label(loaded)}", key="analytics_delete")
            and run_action(delete_query, store(), loaded.id, actor=user) is not FAILED  # type: ignore[arg-type]
        ):
            st.session_state.pop(LOADED, None)
            st.rerun()

    # In a form, Ctrl+Enter (Cmd+Enter) in the editor submits it as its first button, Run, does.
    with editor, st.form("analytics_editor", border=False):
        sql = st.text_area("SQL", key=SQL, height=160, max_chars=MAX_SQL_CHARS)
        c1, c2, c3 = st.columns([1, 1, 2], vertical_alignment="bottom")
        run = c1.form_submit_button("Run", type="primary", key="analytics_run")
        max_rows = c2.number_input("Rows shown", min_value=10, max_value=10_000, value=1000, step=100,
                                   key="analytics_rows")  # fmt: skip
        c3.caption("Ctrl+Enter (⌘+Enter) in the editor runs the query too.")
        with st.expander("Save this query"):
            st.text_input("Name", key="analytics_save_name")
            st.text_input("Description", key="analytics_save_description")
            st.checkbox("Share with every user", key="analytics_save_shared")
            st.checkbox("Replace my query with this name", key="analytics_save_overwrite")
            st.form_submit_button("Save", key="analytics_save", on_click=save)
            outcome = st.session_state.pop(SAVED, None)
            if outcome and outcome[0] == "error":
                st.error(safe_markdown(outcome[1]))
    if outcome and outcome[0] == "ok":
        st.toast(safe_markdown(outcome[1]))

    if run or st.session_state.pop(RUN_NOW, False):
        result = run_action(analytics().query, sql, max_rows=int(max_rows), actor=user, client_addr=client_addr())
        for key in CHART_KEYS:  # a new result starts from the chart that suits it
            st.session_state.pop(key, None)
        if result is FAILED:
            st.session_state.pop(RESULT, None)
        else:
            st.session_state[RESULT] = result

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
            columns = [str(c) for c in frame.columns]
            frame.columns = columns
            first = quick_chart_defaults(frame)
            measures = quick_chart_measures(frame)
            k1, k2, k3, k4, k5 = st.columns(5)
            kind = k1.selectbox("Chart", QUICK_CHART_KINDS, index=QUICK_CHART_KINDS.index(first.kind),
                                key="analytics_chart_kind")  # fmt: skip
            x = k2.selectbox("X", columns, index=columns.index(first.x), key="analytics_chart_x")
            color = k4.selectbox("Colour", [None, *columns], key="analytics_chart_color",
                                 format_func=lambda c: c or "none")  # fmt: skip
            y = agg = None
            if kind == "histogram" or not measures:
                k3.caption("Histogram of X" if kind == "histogram" else "No numeric column: showing a histogram of X")
            else:
                y = k3.selectbox("Y", measures, index=measures.index(first.y) if first.y in measures else 0,
                                 key="analytics_chart_y")  # fmt: skip
                agg = k5.selectbox(
                    "Rows with the same X", QUICK_CHART_AGGREGATES,
                    index=QUICK_CHART_AGGREGATES.index(default_aggregate(y)), key="analytics_chart_agg",
                    format_func=lambda a: "each row" if a == "none" else a,
                    help="Latencies and rates are averaged, counts summed; 'each row' draws the rows as they are.",
                )  # fmt: skip
            try:
                fig = quick_chart(frame, kind="histogram" if y is None else kind, x=x, y=y, color=color,
                                  agg=agg or "count")  # fmt: skip
            except (TypeError, ValueError) as exc:  # columns plotly cannot draw (lists, structs)
                st.info(f"This result cannot be drawn that way: {exc}")
            else:
                st.plotly_chart(fig, key="analytics_chart")
