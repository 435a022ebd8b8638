"""Dashboard charts (plotly) built from `dashboard_data` frames, and their offline HTML export.

No Streamlit here: the Dashboards page, the export and the notebooks draw the same figures.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping
from datetime import UTC, datetime

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from callbot_core.csv_safety import safe_csv_cell

EMPTY_NOTE = "No data for these filters"


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        title=title,
        annotations=[{"text": EMPTY_NOTE, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return fig


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(title=title, margin={"l": 40, "r": 20, "t": 50, "b": 40}, legend_title_text="")
    return fig


def latency_histogram(frames: Mapping[str, pd.DataFrame], metric: str = "ttft_ms") -> go.Figure:
    title = f"{'Time to first token' if metric == 'ttft_ms' else 'Total turn time'} by persona (ms)"
    df = frames["latency_hist"]
    df = df[df["metric"] == metric]
    if df.empty:
        return _empty(title)
    fig = px.bar(df, x="bucket_ms", y="turns", color="persona", barmode="overlay", opacity=0.7)
    fig.update_xaxes(title="ms (50 ms buckets)")
    return _layout(fig, title)


def latency_by_group(frames: Mapping[str, pd.DataFrame], group_kind: str = "persona") -> go.Figure:
    title = f"Latency p50 / p95 by {group_kind} (ms)"
    df = frames["latency_by_group"]
    df = df[df["group_kind"] == group_kind]
    if df.empty:
        return _empty(title)
    long = df.melt(
        id_vars=["group_name"],
        value_vars=["ttft_p50_ms", "ttft_p95_ms", "total_p50_ms", "total_p95_ms"],
        var_name="measure",
        value_name="ms",
    )
    fig = px.bar(long, x="group_name", y="ms", color="measure", barmode="group")
    fig.update_xaxes(title=group_kind)
    return _layout(fig, title)


def tokens_per_s(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Decode speed over time (mean tokens/s per day)"
    df = frames["tokens_per_s_daily"]
    if df.empty:
        return _empty(title)
    return _layout(px.line(df, x="day", y="mean_tokens_per_s", color="persona", markers=True), title)


def conversations_per_day(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Conversations per day and persona"
    df = frames["conversations_daily"]
    if df.empty:
        return _empty(title)
    return _layout(px.bar(df, x="day", y="conversations", color="persona"), title)


def error_rate(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Error rate per day and backend"
    df = frames["error_rate_daily"]
    if df.empty:
        return _empty(title)
    fig = px.line(df, x="day", y="error_rate", color="backend", markers=True)
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(fig, title)


def talk_ratio(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Talk ratio (caller words per bot word) by persona"
    df = frames["talk_ratio"]
    if df.empty:
        return _empty(title)
    return _layout(px.bar(df, x="persona", y="talk_ratio", hover_data=["mean_user_words", "mean_bot_words"]), title)


def summary_lengths(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Summary length by persona (words)"
    df = frames["summary_lengths"]
    if df.empty:
        return _empty(title)
    long = df.melt(id_vars=["persona"], value_vars=["mean_short_words", "mean_full_words"], var_name="summary",
                   value_name="words")  # fmt: skip
    return _layout(px.bar(long, x="persona", y="words", color="summary", barmode="group"), title)


def system_metrics(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "System: CPU, memory and disk (%)"
    df = frames["system_metrics"]
    if df.empty:
        return _empty(title)
    long = df.melt(id_vars=["taken_at"], value_vars=["cpu_percent", "memory_percent", "disk_percent"],
                   var_name="measure", value_name="percent")  # fmt: skip
    return _layout(px.line(long, x="taken_at", y="percent", color="measure"), title)


def dashboard_figures(frames: Mapping[str, pd.DataFrame]) -> dict[str, go.Figure]:
    """Every dashboard chart, in display order, by a stable name."""
    return {
        "ttft_distribution": latency_histogram(frames, "ttft_ms"),
        "total_distribution": latency_histogram(frames, "total_ms"),
        "latency_by_persona": latency_by_group(frames, "persona"),
        "latency_by_version": latency_by_group(frames, "version"),
        "latency_by_backend": latency_by_group(frames, "backend"),
        "latency_by_model": latency_by_group(frames, "model"),
        "tokens_per_s": tokens_per_s(frames),
        "conversations_per_day": conversations_per_day(frames),
        "error_rate": error_rate(frames),
        "talk_ratio": talk_ratio(frames),
        "summary_lengths": summary_lengths(frames),
        "system_metrics": system_metrics(frames),
    }


def dashboard_html(figures: Mapping[str, go.Figure], *, title: str, subtitle: str = "") -> str:
    """One standalone HTML file: plotly.js is embedded once, so it opens offline."""
    parts = []
    for i, fig in enumerate(figures.values()):
        parts.append(fig.to_html(full_html=False, include_plotlyjs=(i == 0), default_width="100%"))
    made = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (
        "<!DOCTYPE html><html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title>"
        "<style>body{font-family:sans-serif;margin:2em;} .chart{margin-bottom:2em;}</style></head><body>"
        f"<h1>{html.escape(title)}</h1><p>{html.escape(subtitle)} · exported {made}</p>"
        + "".join(f"<div class='chart'>{p}</div>" for p in parts)
        + "</body></html>"
    )


def dashboard_table(frames: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """The data behind the dashboard as one long table: a `dataset` column names each frame."""
    tables = [df.assign(dataset=name) for name, df in frames.items() if not df.empty]
    if not tables:
        return pd.DataFrame({"dataset": pd.Series(dtype="string")})
    out = pd.concat(tables, ignore_index=True, sort=False)
    return out[["dataset", *[c for c in out.columns if c != "dataset"]]]


def table_bytes(df: pd.DataFrame, fmt: str) -> bytes:
    """CSV or Parquet bytes of a frame (Parquet written by DuckDB, so no pyarrow is needed).

    CSV is for spreadsheets, so text cells that would run as formulas are neutralised (csv_safety); numbers
    and typed Parquet data are left as they are. Lines end in CRLF (RFC 4180): only then does pandas quote a
    cell holding a bare carriage return, which a spreadsheet would otherwise split into a new row whose first
    cell no longer starts with the neutralising quote.
    """
    if fmt == "csv":
        return spreadsheet_safe(df).to_csv(index=False, lineterminator="\r\n").encode("utf-8")
    if fmt == "parquet":
        import os
        import tempfile

        import duckdb

        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "data.parquet")
            con = duckdb.connect()
            try:
                con.register("frame", df)
                con.execute(f"COPY frame TO '{path}' (FORMAT parquet)")
            finally:
                con.close()
            with open(path, "rb") as fh:
                return fh.read()
    raise ValueError(f"unknown table format {fmt!r}; use csv or parquet")


def spreadsheet_safe(df: pd.DataFrame) -> pd.DataFrame:
    """A copy of `df` whose text cells go through `safe_csv_cell`; numeric columns are not touched."""
    out = df.copy()
    for name in out.columns:
        column = out[name]
        if (
            column.dtype == object
            or pd.api.types.is_string_dtype(column.dtype)
            or isinstance(column.dtype, pd.CategoricalDtype)
        ):
            out[name] = column.map(safe_csv_cell)
    return out


def figure_to_html_bytes(fig: go.Figure) -> bytes:
    buffer = io.StringIO()
    fig.write_html(buffer, include_plotlyjs=True, full_html=True)
    return buffer.getvalue().encode("utf-8")
