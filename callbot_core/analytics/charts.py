"""Dashboard charts (plotly) built from `dashboard_data` frames, and their offline HTML export.

No Streamlit here: the Dashboards page, the export, the report notebooks and the Analytics page's quick chart draw
with these functions, so a chart looks the same wherever it is shown.
"""

from __future__ import annotations

import html
import io
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime

import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import plotly.io as pio

from callbot_core.analytics.dashboard import HIST_BUCKET_MS
from callbot_core.csv_safety import safe_csv_cell

EMPTY_NOTE = "No data for these filters"

# Streamlit's categorical chart colours (its light theme). st.plotly_chart swaps these in on the page for the
# placeholders (#000001…) of the template it makes plotly's default, and only on the page: an exported figure kept
# the placeholders and drew every series near-black. So every figure names its colours itself, from here.
PALETTE: tuple[str, ...] = (
    "#0068c9", "#83c9ff", "#ff2b2b", "#ffabab", "#29b09d", "#7defa1", "#ff8700", "#ffd16a", "#6d3fc0", "#d5dae5",
)  # fmt: skip


def _template() -> go.layout.Template:
    # plotly_white looks like the page (white, light grid); on the page Streamlit lays its fonts over it.
    template = go.layout.Template(pio.templates["plotly_white"])
    template.layout.colorway = PALETTE
    return template


# Given to every figure, so neither the process's default template (Streamlit's in the app, plotly's in a
# notebook) nor the order of series within one chart decides a colour.
TEMPLATE = _template()

DAY_MS = 86_400_000
MAX_DAY_TICKS = 10
MAX_LATENCY_BINS = 40
OVERFLOW_SHARE = 0.99  # the slowest turns past this share of them are drawn together in one labelled bar
_PX_STYLE = {"template": TEMPLATE, "color_discrete_sequence": PALETTE}


def _empty(title: str) -> go.Figure:
    fig = go.Figure()
    fig.update_layout(
        template=TEMPLATE,
        title=title,
        annotations=[{"text": EMPTY_NOTE, "showarrow": False, "xref": "paper", "yref": "paper", "x": 0.5, "y": 0.5}],
        xaxis={"visible": False},
        yaxis={"visible": False},
    )
    return fig


def _layout(fig: go.Figure, title: str) -> go.Figure:
    fig.update_layout(template=TEMPLATE, title=title, margin={"l": 40, "r": 20, "t": 50, "b": 40}, legend_title_text="")
    return fig


def series_colours(names: Iterable[str]) -> dict[str, str]:
    """A colour per name, from the sorted names: the same persona gets the same colour in every chart drawn from
    the same frames, whichever personas one chart happens to lack."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(sorted({str(n) for n in names}))}


def _persona_colours(frames: Mapping[str, pd.DataFrame]) -> dict[str, str]:
    names: list[str] = []
    for name in ("latency_hist", "tokens_per_s_daily", "conversations_daily", "talk_ratio", "summary_lengths"):
        df = frames.get(name)
        if df is not None and "persona" in df:
            names.extend(df["persona"].dropna().astype(str))
    groups = frames.get("latency_by_group")
    if groups is not None and not groups.empty:
        names.extend(groups.loc[groups["group_kind"] == "persona", "group_name"].dropna().astype(str))
    return series_colours(names)


# -- latency distributions -------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class LatencyBins:
    """How 50 ms buckets are drawn: bins `width` ms wide from 0, and every turn from `overflow_ms` on (None: no
    turn is that slow) in one last bar of the same width, labelled as what it is."""

    width: int
    overflow_ms: int | None
    slowest_bucket_ms: int


def _bin_widths() -> Iterable[int]:
    yield HIST_BUCKET_MS
    for power in range(2, 12):  # 100 ms … 500,000 s: round widths that are whole numbers of buckets
        for step in (1, 2, 5):
            yield step * 10**power


def latency_bins(buckets: pd.DataFrame) -> LatencyBins:
    """Bins for a histogram frame (`bucket_ms`, `turns`), from its data: at most MAX_LATENCY_BINS round-width bins
    up to the bucket holding the 99th percentile turn; anything slower goes to the overflow bar."""
    counts = buckets.groupby("bucket_ms")["turns"].sum().sort_index()
    reached = counts.cumsum() >= OVERFLOW_SHARE * counts.sum()
    top_bucket = int(counts.index[int(reached.to_numpy().argmax())])
    slowest = int(counts.index.max())
    upper = top_bucket + HIST_BUCKET_MS
    width = next(w for w in _bin_widths() if math.ceil(upper / w) <= MAX_LATENCY_BINS)
    edge = math.ceil(upper / width) * width
    return LatencyBins(width, edge if slowest >= edge else None, slowest)


def latency_histogram(frames: Mapping[str, pd.DataFrame], metric: str = "ttft_ms") -> go.Figure:
    title = f"{'Time to first token' if metric == 'ttft_ms' else 'Total turn time'} by persona (ms)"
    df = frames["latency_hist"]
    df = df[df["metric"] == metric]
    if df.empty:
        return _empty(title)
    bins = latency_bins(df)
    width, edge, slowest = bins.width, bins.overflow_ms, bins.slowest_bucket_ms
    colours = _persona_colours(frames)
    fig = go.Figure()
    for persona, rows in df.groupby("persona", sort=True):
        lows = rows["bucket_ms"].astype("int64") // width * width
        if edge is not None:
            lows = lows.clip(upper=edge)
        turns = rows.groupby(lows.to_numpy())["turns"].sum().sort_index()
        hover = [
            f"{low:,} ms or more (the slowest {slowest:,}–{slowest + HIST_BUCKET_MS:,} ms): {n:,} turn(s)"
            if low == edge
            else f"{low:,}–{low + width:,} ms: {n:,} turn(s)"
            for low, n in turns.items()
        ]
        fig.add_bar(
            x=[low + width / 2 for low in turns.index], y=turns.tolist(), width=width, name=str(persona),
            marker={"color": colours.get(str(persona), PALETTE[0]),
                    "pattern": {"shape": ["/" if low == edge else "" for low in turns.index]}},
            opacity=0.75, hovertext=hover, hovertemplate="%{hovertext}<extra>%{fullData.name}</extra>",
        )  # fmt: skip
    fig.update_layout(barmode="overlay", bargap=0)
    axis_title = f"ms ({width:,} ms bins)"
    if edge is not None:
        axis_title = f"ms ({width:,} ms bins; the hatched bar is every turn of {edge:,} ms or more)"
        top = max(y for t in fig.data for x, y in zip(t.x, t.y, strict=True) if x > edge)
        fig.add_annotation(x=edge + width / 2, y=top, text=f"≥ {edge:,} ms", showarrow=False, yanchor="bottom")
    fig.update_xaxes(title=axis_title, rangemode="tozero")
    fig.update_yaxes(title="turns")
    return _layout(fig, title)


def latency_by_group(frames: Mapping[str, pd.DataFrame], group_kind: str = "persona") -> go.Figure:
    title = f"Latency p50 / p95 by {group_kind} (ms)"
    df = frames["latency_by_group"]
    df = df[df["group_kind"] == group_kind]
    if df.empty:
        return _empty(title)
    measures = {"ttft_p50_ms": "TTFT p50", "ttft_p95_ms": "TTFT p95", "total_p50_ms": "total p50",
                "total_p95_ms": "total p95"}  # fmt: skip
    long = df.rename(columns=measures).melt(
        id_vars=["group_name"], value_vars=list(measures.values()), var_name="measure", value_name="ms"
    )
    fig = px.bar(long, x="group_name", y="ms", color="measure", barmode="group", **_PX_STYLE)
    fig.update_xaxes(title=group_kind, type="category")
    return _layout(fig, title)


# -- daily series ----------------------------------------------------------------------------------------------


def _daily_axis(fig: go.Figure, days: pd.Series) -> go.Figure:
    """Ticks on whole days (every few days over a long period), and a range of at least one day: plotly makes a
    single day's axis a few milliseconds wide, ticked 23:59:59.999."""
    days = pd.to_datetime(days).dt.normalize()
    first, last = days.min(), days.max()
    step = max(1, math.ceil(((last - first).days + 1) / MAX_DAY_TICKS))
    half = pd.Timedelta(hours=12)
    fig.update_xaxes(
        type="date", tickformat="%Y-%m-%d", hoverformat="%Y-%m-%d", tick0=first.isoformat(), dtick=step * DAY_MS,
        range=[(first - half).isoformat(), (last + half).isoformat()], title="day (UTC)",
    )  # fmt: skip
    for trace in fig.data:
        if trace.type == "bar":
            trace.width = 0.8 * DAY_MS
    return fig


def tokens_per_s(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Decode speed over time (mean tokens/s per day)"
    df = frames["tokens_per_s_daily"]
    if df.empty:
        return _empty(title)
    fig = px.line(df, x="day", y="mean_tokens_per_s", color="persona", markers=True,
                  color_discrete_map=_persona_colours(frames), **_PX_STYLE)  # fmt: skip
    return _layout(_daily_axis(fig, df["day"]), title)


def conversations_per_day(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Conversations per day and persona"
    df = frames["conversations_daily"]
    if df.empty:
        return _empty(title)
    fig = px.bar(df, x="day", y="conversations", color="persona", color_discrete_map=_persona_colours(frames),
                 **_PX_STYLE)  # fmt: skip
    return _layout(_daily_axis(fig, df["day"]), title)


def error_rate(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Error rate per day and backend"
    df = frames["error_rate_daily"]
    if df.empty:
        return _empty(title)
    fig = px.line(df, x="day", y="error_rate", color="backend", markers=True,
                  color_discrete_map=series_colours(df["backend"]), **_PX_STYLE)  # fmt: skip
    fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(_daily_axis(fig, df["day"]), title)


# -- conversations and the machine ------------------------------------------------------------------------------


def talk_ratio(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Talk ratio (caller words per bot word) by persona"
    df = frames["talk_ratio"]
    if df.empty:
        return _empty(title)
    fig = px.bar(df, x="persona", y="talk_ratio", hover_data=["mean_user_words", "mean_bot_words"], **_PX_STYLE)
    fig.update_xaxes(type="category")
    return _layout(fig, title)


def summary_lengths(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "Summary length by persona (words)"
    df = frames["summary_lengths"]
    if df.empty:
        return _empty(title)
    long = df.rename(columns={"mean_short_words": "short summary", "mean_full_words": "full summary"}).melt(
        id_vars=["persona"], value_vars=["short summary", "full summary"], var_name="summary", value_name="words"
    )
    fig = px.bar(long, x="persona", y="words", color="summary", barmode="group", **_PX_STYLE)
    fig.update_xaxes(type="category")
    return _layout(fig, title)


def system_metrics(frames: Mapping[str, pd.DataFrame]) -> go.Figure:
    title = "System: CPU, memory and disk (%)"
    df = frames["system_metrics"]
    if df.empty:
        return _empty(title)
    long = df.melt(id_vars=["taken_at"], value_vars=["cpu_percent", "memory_percent", "disk_percent"],
                   var_name="measure", value_name="percent")  # fmt: skip
    fig = px.line(long, x="taken_at", y="percent", color="measure", markers=True, **_PX_STYLE)
    taken = pd.to_datetime(df["taken_at"])
    if taken.min() == taken.max():  # one snapshot: an hour either side, not a millisecond-wide axis
        fig.update_xaxes(range=[(taken.min() - pd.Timedelta(hours=1)).isoformat(),
                                (taken.max() + pd.Timedelta(hours=1)).isoformat()])  # fmt: skip
    fig.update_yaxes(rangemode="tozero")
    return _layout(fig, title)


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


# -- other tables: the report notebooks' and the Analytics page's --------------------------------------------------


def bar_chart(
    df: pd.DataFrame, *, x: str, y: str, title: str, color: str | None = None, percent: bool = False
) -> go.Figure:
    """Bars of `y` by `x` (a category), coloured by `color`, in the dashboards' style: for tables the dashboard
    frames do not hold, such as the persona report's per-version figures."""
    if df.empty:
        return _empty(title)
    colours = series_colours(df[color].dropna()) if color else None
    fig = px.bar(df, x=x, y=y, color=color, color_discrete_map=colours, **_PX_STYLE)
    fig.update_xaxes(type="category")
    if percent:
        fig.update_yaxes(tickformat=".0%", rangemode="tozero")
    return _layout(fig, title)


QUICK_CHART_KINDS = ("bar", "line", "scatter", "histogram")
QUICK_CHART_AGGREGATES = ("mean", "median", "sum", "min", "max", "count", "none")
# Columns that count things: summed when rows are grouped. Any other number (a latency, a rate, a speed) is
# averaged: a sum of latencies means nothing.
_COUNT_NAMES = {"n", "count", "turns", "conversations", "users", "failures", "failed", "failed_turns", "messages",
                "votes", "comparisons", "summaries", "assertions", "suite_runs", "runs", "rows"}  # fmt: skip


def _is_identifier(name: str) -> bool:
    name = name.lower()
    return name in {"id", "version"} or name.endswith(("_id", "_version"))


def _is_count(name: str) -> bool:
    name = name.lower()
    return name in _COUNT_NAMES or name.startswith(("n_", "num_", "count_")) or name.endswith("_count")


@dataclass(frozen=True, slots=True)
class QuickChart:
    kind: str
    x: str
    y: str | None
    agg: str


def quick_chart_measures(frame: pd.DataFrame) -> list[str]:
    """Numeric columns worth plotting as Y, measures first (ids and version numbers last)."""
    numeric = [str(c) for c in frame.columns
               if pd.api.types.is_numeric_dtype(frame[c]) and not pd.api.types.is_bool_dtype(frame[c])]  # fmt: skip
    return sorted(numeric, key=_is_identifier)


def default_aggregate(y: str | None) -> str:
    return "sum" if y is not None and _is_count(y) else "mean"


def quick_chart_defaults(frame: pd.DataFrame) -> QuickChart:
    """What the chart builder starts with for a result: X a time if there is one (a line), else a category (bars);
    Y the first measure, not an id; latencies and rates averaged, counts summed; no measure: a histogram of X."""
    columns = [str(c) for c in frame.columns]
    times = [c for c in columns if pd.api.types.is_datetime64_any_dtype(frame[c])]
    labels = [c for c in columns if not pd.api.types.is_numeric_dtype(frame[c]) and c not in times]
    measures = [c for c in quick_chart_measures(frame) if not _is_identifier(c)]
    x = (times or labels or columns)[0]
    y = next((c for c in measures if c != x), None)
    if y is None:
        return QuickChart("histogram", x, None, "count")
    return QuickChart("line" if x in times else "bar" if x in labels else "scatter", x, y, default_aggregate(y))


def quick_chart(
    frame: pd.DataFrame, *, kind: str, x: str, y: str | None = None, color: str | None = None, agg: str = "mean"
) -> go.Figure:
    """The Analytics page's chart of a query result. Bars and lines of rows that share an X (and colour) show
    their `agg` (mean, sum, …; "none" draws the rows as they are): stacked bars would add latencies up."""
    if kind not in QUICK_CHART_KINDS:
        raise ValueError(f"unknown chart {kind!r}; use one of {', '.join(QUICK_CHART_KINDS)}")
    if agg not in QUICK_CHART_AGGREGATES:
        raise ValueError(f"unknown aggregate {agg!r}; use one of {', '.join(QUICK_CHART_AGGREGATES)}")
    colours = series_colours(frame[color].dropna()) if color else None
    if kind == "histogram" or y is None:
        fig = px.histogram(frame, x=x, color=color, color_discrete_map=colours, **_PX_STYLE)
        return _layout(fig, f"Rows by {x}")
    data, title = frame, f"{y} by {x}"
    keys = [k for k in dict.fromkeys([x, color]) if k]
    if agg != "none" and y not in keys:
        data = frame.groupby(keys, dropna=False, sort=True)[y].agg(agg).reset_index()
        title = f"{agg} of {y} by {x}"
    elif kind == "line":
        data = frame.sort_values(x)
    fig = getattr(px, kind)(data, x=x, y=y, color=color, color_discrete_map=colours, **_PX_STYLE)
    return _layout(fig, title)


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
