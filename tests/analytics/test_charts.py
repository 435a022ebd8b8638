"""The dashboard charts as plotly figure objects: latency bins from the data with a labelled overflow bin, one bar
width across personas, day ticks on daily series, the page's colours in the exported HTML, the notebooks drawing
through the same functions, and the Analytics page's quick chart (its defaults and its mean of latencies)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go
import plotly.io as pio
import pytest

from callbot_core.analytics import Analytics, DashboardFilters, charts, dashboard_data
from callbot_core.analytics.dashboard import DASHBOARD_COLUMNS
from tests.analytics.test_analytics import add_conversation, version_of

DAY_MS = 86_400_000
NOTEBOOKS = Path(__file__).resolve().parents[2] / "callbot_core" / "jobs" / "notebooks"
# plotly.js's own colorway: what a trace without a colour of its own and without a template colorway is drawn in.
PLOTLY_JS_COLORWAY = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
                      "#bcbd22", "#17becf"]  # fmt: skip


# -- helpers ---------------------------------------------------------------------------------------------------


def frames_with(**given: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """Every dashboard frame, empty with its columns unless given."""
    frames = {name: pd.DataFrame({c: [] for c in columns}) for name, columns in DASHBOARD_COLUMNS.items()}
    frames.update(given)
    return frames


def hist_frame(rows: list[tuple[str, str, int, int]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["metric", "persona", "bucket_ms", "turns"])


def bars(fig: go.Figure) -> list[dict[str, Any]]:
    """Every bar of a bar figure: its trace's name, left and right edge (x units), height and hover text."""
    out = []
    for trace in fig.data:
        n = len(trace.x)
        widths = trace.width if isinstance(trace.width, tuple | list) else [trace.width] * n
        hover = trace.hovertext if isinstance(trace.hovertext, tuple | list) else [trace.hovertext] * n
        for x, y, w, h in zip(trace.x, trace.y, widths, hover, strict=True):
            assert w is not None, f"trace {trace.name!r} has no explicit bar width"
            out.append({"name": trace.name, "left": x - w / 2, "right": x + w / 2, "turns": y, "hover": h or ""})
    return out


def figures_in_html(page: str) -> list[dict[str, Any]]:
    """The figures (data and layout, as plotly.js receives them) embedded in a page by `Plotly.newPlot(...)`."""
    decoder = json.JSONDecoder()

    def after_comma(at: int) -> int:
        return re.compile(r"\s*,\s*").match(page, at).end()  # type: ignore[union-attr]

    figures = []
    for match in re.finditer(r'Plotly\.newPlot\(\s*(?=")', page):
        _div_id, at = decoder.raw_decode(page, match.end())
        data, at = decoder.raw_decode(page, after_comma(at))
        layout, _ = decoder.raw_decode(page, after_comma(at))
        figures.append({"data": data, "layout": layout})
    return figures


def series_colours(figure: dict[str, Any]) -> dict[str, str]:
    """Each trace's colour as plotly.js resolves it: its own marker or line colour, else the layout's or the
    template's colorway, else plotly.js's default colorway."""
    layout = figure["layout"]
    colorway = layout.get("colorway") or layout.get("template", {}).get("layout", {}).get("colorway")
    colorway = colorway or PLOTLY_JS_COLORWAY
    colours = {}
    for i, trace in enumerate(figure["data"]):
        own = (trace.get("marker") or {}).get("color") or (trace.get("line") or {}).get("color")
        colours[trace.get("name") or f"trace {i}"] = own if isinstance(own, str) else colorway[i % len(colorway)]
    return colours


def near_black(colour: str) -> bool:
    channels = [int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4)]
    return max(channels) < 0x40


def assert_readable_colours(figures: list[dict[str, Any]]) -> int:
    """Every series has a colour that is not near-black, and the series of one chart have different colours.
    Returns how many series were checked."""
    checked = 0
    for figure in figures:
        colours = series_colours(figure)
        title = ((figure["layout"].get("title") or {}).get("text")) or "?"
        dark = {name: c for name, c in colours.items() if near_black(c)}
        assert not dark, f"{title}: near-black series {dark}"
        assert len(set(colours.values())) == len(colours), f"{title}: series share colours {colours}"
        checked += len(colours)
    return checked


@pytest.fixture
def streamlit_process() -> Iterator[None]:
    """Plotly as the app's process has it: importing st.plotly_chart makes Streamlit's theme template (whose
    colours are placeholders the page replaces, #000001…) the default for every figure built afterwards."""
    before = pio.templates.default
    from streamlit.elements.lib.streamlit_plotly_theme import configure_streamlit_plotly_theme

    configure_streamlit_plotly_theme()
    assert pio.templates.default == "streamlit"
    yield
    pio.templates.default = before


def one_day_frames(day: str = "2026-03-04") -> dict[str, pd.DataFrame]:
    when = pd.Timestamp(day)
    return frames_with(
        latency_hist=hist_frame(
            [
                ("ttft_ms", "receptionist", 100, 3),
                ("ttft_ms", "support", 150, 2),
                ("ttft_ms", "sales", 200, 1),
                ("total_ms", "receptionist", 900, 3),
                ("total_ms", "support", 1200, 2),
                ("total_ms", "sales", 2000, 1),
            ]
        ),  # fmt: skip
        latency_by_group=pd.DataFrame(
            [("persona", p, 3, 100.0, 150.0, 900.0, 1500.0) for p in ("receptionist", "support", "sales")],
            columns=DASHBOARD_COLUMNS["latency_by_group"],
        ),
        tokens_per_s_daily=pd.DataFrame(
            [(when, p, 20.0 + i, 20.0 + i) for i, p in enumerate(("receptionist", "support", "sales"))],
            columns=DASHBOARD_COLUMNS["tokens_per_s_daily"],
        ),
        conversations_daily=pd.DataFrame(
            [(when, p, 1 + i) for i, p in enumerate(("receptionist", "support", "sales"))],
            columns=DASHBOARD_COLUMNS["conversations_daily"],
        ),
        error_rate_daily=pd.DataFrame(
            [(when, "embedded", 4, 1, 0.25), (when, "ollama", 2, 0, 0.0)], columns=DASHBOARD_COLUMNS["error_rate_daily"]
        ),
        talk_ratio=pd.DataFrame([("receptionist", 2, 5.0, 8.0, 0.6)], columns=DASHBOARD_COLUMNS["talk_ratio"]),
        summary_lengths=pd.DataFrame([("receptionist", 2, 3.0, 9.0)], columns=DASHBOARD_COLUMNS["summary_lengths"]),
        system_metrics=pd.DataFrame(
            [(when + pd.Timedelta(hours=h), "h1", 10.0 * h, 40.0, 50.0, 200.0) for h in (1, 2)],
            columns=DASHBOARD_COLUMNS["system_metrics"],
        ),
    )


# -- latency histograms ----------------------------------------------------------------------------------------


def test_slow_turns_land_in_bins_that_hold_them(store, tmp_path: Path) -> None:
    """Turns of 19 and 27 s were shown in the 5,000 ms bin: every turn must sit in a bar whose range holds it."""
    started = datetime.now(UTC) - timedelta(hours=2)
    totals = {"receptionist": [400.0, 650.0, 19_000.0, 27_310.0], "support": [520.0]}
    with store.session() as s:
        for persona, values in totals.items():
            turns = [(f"question {i}", started + timedelta(minutes=i), "answer", 90.0 + i, total, 5, 20.0)
                     for i, total in enumerate(values)]  # fmt: skip
            add_conversation(s, version_of(s, persona), backend="embedded", model="m1", user=None, started=started,
                             turns=turns)  # fmt: skip
    frames = dashboard_data(Analytics(store, tmp_path / "a.duckdb"), DashboardFilters())
    hist = frames["latency_hist"]
    total_buckets = sorted(hist[hist["metric"] == "total_ms"]["bucket_ms"].tolist())
    assert total_buckets == [400, 500, 650, 19_000, 27_300], "the data behind the chart is not capped either"

    drawn = bars(charts.latency_histogram(frames, "total_ms"))
    assert sum(b["turns"] for b in drawn) == 5
    for persona, values in totals.items():
        for value in values:
            holding = [b for b in drawn if b["name"] == persona and b["left"] <= value < b["right"]]
            assert len(holding) == 1, (persona, value, drawn)


def test_the_slowest_hundredth_goes_to_a_labelled_overflow_bin() -> None:
    """A few very slow turns do not squash the others into one bar: past the 99th percentile they share an
    overflow bar, which says what it holds."""
    rows = [("total_ms", "receptionist", 300 + 50 * (i % 10), 20) for i in range(10)]  # 200 turns, 300-750 ms
    rows.append(("total_ms", "receptionist", 27_300, 1))
    fig = charts.latency_histogram(frames_with(latency_hist=hist_frame(rows)), "total_ms")
    drawn = bars(fig)
    assert sum(b["turns"] for b in drawn) == 201
    last = max(drawn, key=lambda b: b["left"])
    assert last["turns"] == 1 and last["left"] <= 27_300 and last["right"] < 27_300  # the overflow bar ...
    assert last["left"] >= 800 and "or more" in last["hover"]  # ... starts past the bulk and says so
    labels = [a.text for a in fig.layout.annotations]
    assert any(text.startswith("≥") and f"{int(last['left']):,}" in text for text in labels), labels
    assert "or more" in fig.layout.xaxis.title.text
    ordinary = [b for b in drawn if b is not last]
    assert max(b["right"] for b in ordinary) <= last["left"]  # the other bins end where the overflow begins
    assert len(ordinary) >= 5  # the 300-750 ms bulk is spread over several bins, not one


def test_bars_have_one_width_across_personas() -> None:
    """Plotly sizes a trace's bars from the spacing of its own x values: a persona with one bucket got one bar as
    wide as the chart. Every bar is as wide as the bin."""
    rows = [("ttft_ms", "receptionist", b, 2) for b in (0, 50, 100, 150)] + [("ttft_ms", "support", 1000, 1)]
    fig = charts.latency_histogram(frames_with(latency_hist=hist_frame(rows)), "ttft_ms")
    widths = {b["right"] - b["left"] for b in bars(fig)}
    assert len(widths) == 1, widths
    assert {t.name for t in fig.data} == {"receptionist", "support"}


# -- daily series --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tokens_per_s", "conversations_per_day", "error_rate"])
def test_daily_series_tick_by_day(name: str) -> None:
    """One day of data gave an axis a few milliseconds wide, ticked 23:59:59.999: a daily series ticks by day."""
    fig = getattr(charts, name)(one_day_frames())
    axis = fig.layout.xaxis
    assert axis.tickformat and not re.search(r"%[HIMSLfp]", axis.tickformat), axis.tickformat
    assert isinstance(axis.dtick, int | float) and axis.dtick >= DAY_MS and axis.dtick % DAY_MS == 0, axis.dtick
    low, high = (pd.Timestamp(v) for v in axis.range)
    assert low < pd.Timestamp("2026-03-04") < high and high - low >= pd.Timedelta(days=1)
    for trace in fig.data:
        if trace.type == "bar":
            assert trace.width is not None and 0 < trace.width <= DAY_MS


def test_daily_ticks_thin_out_over_a_long_period() -> None:
    days = pd.date_range("2026-01-01", periods=90, freq="D")
    frames = frames_with(conversations_daily=pd.DataFrame({"day": days, "persona": "receptionist", "conversations": 1}))
    axis = charts.conversations_per_day(frames).layout.xaxis
    assert axis.dtick % DAY_MS == 0 and 90 * DAY_MS / axis.dtick <= 12


# -- colours ---------------------------------------------------------------------------------------------------


def test_the_exported_dashboard_has_the_page_colours(streamlit_process: None) -> None:
    """In the app's process every series was #000001…: colours Streamlit replaces on the page only, so the exported
    file drew every series near-black. The figures carry the page's colours themselves."""
    figures = charts.dashboard_figures(one_day_frames())
    page = charts.dashboard_html(figures, title="t")
    embedded = figures_in_html(page)
    assert len(embedded) == len(figures) == 12
    assert assert_readable_colours(embedded) >= 20
    used = {c for figure in embedded for c in series_colours(figure).values()}
    assert used <= set(charts.PALETTE), used - set(charts.PALETTE)


def test_a_persona_keeps_its_colour_across_charts(streamlit_process: None) -> None:
    """Colours went by order within each chart: a persona missing from one chart shifted the others' colours."""
    frames = one_day_frames()
    conversations = frames["conversations_daily"]
    frames["conversations_daily"] = conversations[conversations["persona"] != "receptionist"]
    figures = charts.dashboard_figures(frames)
    by_persona: dict[str, set[str]] = {}
    for name in ("ttft_distribution", "total_distribution", "tokens_per_s", "conversations_per_day"):
        for trace in figures[name].data:
            colour = trace.marker.color if trace.type == "bar" else trace.line.color
            by_persona.setdefault(trace.name, set()).add(colour)
    assert set(by_persona) == {"receptionist", "support", "sales"}
    assert all(len(colours) == 1 for colours in by_persona.values()), by_persona


# -- the report notebooks --------------------------------------------------------------------------------------


def _code(notebook: Path) -> str:
    cells = json.loads(notebook.read_text(encoding="utf-8"))["cells"]
    return "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")


@pytest.mark.parametrize("notebook", sorted(NOTEBOOKS.glob("*.ipynb")), ids=lambda p: p.stem)
def test_the_notebooks_draw_through_the_dashboard_chart_functions(notebook: Path) -> None:
    code = _code(notebook)
    assert "charts." in code
    assert not re.search(r"\bplotly\.(express|graph_objects)\b|\bpx\.|\bgo\.", code), notebook.name


def test_version_bars_take_the_palette_and_a_percent_axis() -> None:
    versions = pd.DataFrame({"persona": ["receptionist", "receptionist", "support"],
                             "version": ["receptionist@1", "receptionist@2", "support@1"],
                             "error_rate": [0.0, 0.25, 0.5]})  # fmt: skip
    fig = charts.bar_chart(versions, x="version", y="error_rate", color="persona", title="Error rate", percent=True)
    assert fig.layout.yaxis.tickformat == ".0%"
    assert {t.marker.color for t in fig.data} <= set(charts.PALETTE) and len(fig.data) == 2


# -- the Analytics page's quick chart --------------------------------------------------------------------------


def test_quick_chart_defaults_to_a_category_and_a_latency() -> None:
    frame = pd.DataFrame({"turn_id": [1, 2, 3], "persona": ["a", "a", "b"], "persona_version": [1, 1, 2],
                          "ttft_ms": [100.0, 300.0, 50.0], "failed": [False, False, True]})  # fmt: skip
    choice = charts.quick_chart_defaults(frame)
    assert (choice.kind, choice.x, choice.y, choice.agg) == ("bar", "persona", "ttft_ms", "mean")

    daily = pd.DataFrame({"day": pd.to_datetime(["2026-01-01", "2026-01-02"]), "conversations": [3, 4]})
    choice = charts.quick_chart_defaults(daily)
    assert (choice.kind, choice.x, choice.y, choice.agg) == ("line", "day", "conversations", "sum")

    text_only = pd.DataFrame({"error": ["x", "y"]})
    assert charts.quick_chart_defaults(text_only).kind == "histogram"


def test_quick_chart_averages_latencies_instead_of_stacking_them() -> None:
    frame = pd.DataFrame({"persona": ["a", "a", "b"], "ttft_ms": [100.0, 300.0, 50.0]})
    fig = charts.quick_chart(frame, kind="bar", x="persona", y="ttft_ms", agg="mean")
    (trace,) = fig.data
    assert dict(zip(trace.x, trace.y, strict=True)) == {"a": 200.0, "b": 50.0}
    assert "mean" in fig.layout.title.text and "ttft_ms" in fig.layout.title.text
    summed = charts.quick_chart(frame, kind="bar", x="persona", y="ttft_ms", agg="sum").data[0]
    assert dict(zip(summed.x, summed.y, strict=True)) == {"a": 400.0, "b": 50.0}
    raw = charts.quick_chart(frame, kind="scatter", x="persona", y="ttft_ms", agg="none").data[0]
    assert list(raw.y) == [100.0, 300.0, 50.0]
