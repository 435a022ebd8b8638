"""The Analytics, Dashboards and Reports pages through AppTest, on a store with a few real turns."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.analytics import VIEW_DOCS
from callbot_core.analytics.saved import BUILTIN_QUERIES
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import AuditLog
from tests.analytics.test_charts import assert_readable_colours, figures_in_html
from tests.app.helpers import ADMIN_PW, PW, button, sign_in, titles, view
from tests.fake_ollama import FakeOllama


@pytest.fixture(scope="module")
def with_turns(app_store: Store, fake_ollama: FakeOllama) -> Store:
    backend = OllamaBackend(fake_ollama.url, default_model="smollm2:135m")
    service = ConversationService(app_store, Settings(_env_file=None), backends=lambda name: backend)  # type: ignore[call-arg]
    for persona, questions in (("receptionist", ["Opening hours?", "Parking?"]), ("support", ["Where is my parcel?"])):
        info = service.start(persona, actor=LOCAL_OPERATOR)
        for q in questions:
            service.send(info.id, q, actor=LOCAL_OPERATOR).text()
    return app_store


def _numbers(values):  # type: ignore[no-untyped-def]
    """A figure's numbers as plotly's JSON holds them: a list, or a typed array in base64."""
    if isinstance(values, dict):
        return np.frombuffer(base64.b64decode(values["bdata"]), dtype=values["dtype"]).tolist()
    return values


def _analytics(username: str = "rita", password: str = PW):  # type: ignore[no-untyped-def]
    at = sign_in(username, password)
    at.switch_page(view("analytics")).run()
    assert titles(at) == ["Analytics"], at.exception
    return at


def test_sql_console_runs_a_query_and_offers_downloads(with_turns: Store) -> None:
    at = _analytics()
    at.text_area(key="analytics_sql").input("select persona, count(*) as turns from turns group by 1 order by 1")
    button(at, "Run").click()
    at.run()
    assert not at.exception, at.exception
    frame = next(df.value for df in at.dataframe if "turns" in df.value.columns)
    assert dict(zip(frame["persona"], frame["turns"], strict=True)) == {"receptionist": 2, "support": 1}
    labels = [b.label for b in at.get("download_button")]
    assert "Download CSV" in labels and "Download Parquet" in labels
    assert at.get("plotly_chart")  # the quick chart builder drew the result


def test_sql_console_csv_download_neutralises_formulas(with_turns: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    downloads: dict[str | None, bytes] = {}
    store_file = MemoryMediaFileStorage.load_and_get_id

    def keep(self, data, mimetype, kind, filename=None):  # type: ignore[no-untyped-def]
        downloads[filename] = data
        return store_file(self, data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    at = _analytics()
    at.text_area(key="analytics_sql").input("select * from (values ('=1+1', -3), ('@SUM(A1)', 4)) t(text, n)")
    button(at, "Run").click()
    at.run()
    assert not at.exception and not at.error, at.exception or [e.value for e in at.error]
    assert downloads["query.csv"].decode().splitlines() == ["text,n", "'=1+1,-3", "'@SUM(A1),4"]


def test_sql_console_refuses_writes(with_turns: Store) -> None:
    at = _analytics()
    at.text_area(key="analytics_sql").input("drop table messages")
    button(at, "Run").click()
    at.run()
    assert at.error and "drop" in at.error[0].value.lower()
    with with_turns.session() as session:
        assert session.scalars(select(AuditLog).where(AuditLog.action == "sql.refused")).first() is not None


def test_builtin_queries_load_and_run(with_turns: Store) -> None:
    at = _analytics()
    for query in BUILTIN_QUERIES:
        button(at, query.name).click()
        at.run()
        assert not at.error, (query.name, [e.value for e in at.error])
        assert at.text_area(key="analytics_sql").value == query.sql


def test_a_canned_query_runs_in_one_click_and_loads_into_the_editor(with_turns: Store) -> None:
    at = _analytics()
    button(at, "Turns per persona").click()
    at.run()
    assert not at.exception and not at.error, at.exception or [e.value for e in at.error]
    assert at.text_area(key="analytics_sql").value == BUILTIN_QUERIES[0].sql
    frame = next(df.value for df in at.dataframe if "turns" in df.value.columns)
    assert dict(zip(frame["persona"], frame["turns"], strict=True)) == {"receptionist": 2, "support": 1}


def test_ctrl_enter_in_the_editor_runs_the_query(with_turns: Store) -> None:
    """A text area commits on Ctrl+Enter; only inside a form does Ctrl+Enter also submit, as the form's first
    submit button would (the browser test presses the keys)."""
    at = _analytics()
    editor = at.text_area(key="analytics_sql")
    assert editor.form_id, "the editor is not in a form: Ctrl+Enter would only commit the text"
    submits = [b for b in at.button if b.form_id == editor.form_id]
    assert submits and submits[0].label == "Run", [b.label for b in submits]
    editor.input("select 41 + 1 as answer")
    submits[0].click()
    at.run()
    frame = next(df.value for df in at.dataframe if "answer" in df.value.columns)
    assert frame["answer"].tolist() == [42]


def test_the_chart_builder_averages_latencies_by_default(with_turns: Store) -> None:
    at = _analytics()
    at.text_area(key="analytics_sql").input("select turn_id, persona, persona_version, ttft_ms from turns")
    button(at, "Run").click()
    at.run()
    assert not at.exception and not at.error, at.exception or [e.value for e in at.error]
    chosen = {k: at.selectbox(key=f"analytics_chart_{k}").value for k in ("kind", "x", "y", "agg")}
    assert chosen == {"kind": "bar", "x": "persona", "y": "ttft_ms", "agg": "mean"}
    frame = next(df.value for df in at.dataframe if "ttft_ms" in df.value.columns)
    expected = frame.groupby("persona")["ttft_ms"].mean().to_dict()
    (trace,) = json.loads(at.get("plotly_chart")[0].proto.spec)["data"]
    assert dict(zip(trace["x"], _numbers(trace["y"]), strict=True)) == pytest.approx(expected)


def test_a_view_name_loads_its_first_rows(with_turns: Store) -> None:
    at = _analytics()
    views = next(t for t in at.tabs if t.label == "Views you can query")
    assert len(views.dataframe) == len(VIEW_DOCS)  # every view's columns, in a tab of their own
    views.button(key="analytics_view_turns").click()
    at.run()
    assert not at.exception and not at.error, at.exception or [e.value for e in at.error]
    assert at.text_area(key="analytics_sql").value == "select * from turns limit 100"
    assert at.session_state["analytics_tab"] == "Query"
    frame = next(df.value for df in at.dataframe if "ttft_ms" in df.value.columns)
    assert len(frame) == 3


def test_a_saved_query_can_be_shared(with_turns: Store) -> None:
    at = _analytics()
    at.text_area(key="analytics_sql").input("select count(*) as n from turns")
    at.text_input(key="analytics_save_name").input("How many turns")
    at.checkbox(key="analytics_save_shared").check()
    button(at, "Save").click()
    at.run()
    assert not at.error, [e.value for e in at.error]
    other = _analytics("admin", ADMIN_PW)
    assert any("How many turns" in b.label and "rita" in b.label for b in other.button)


def test_saving_twice_says_why_and_a_loaded_query_of_ones_own_can_be_deleted(with_turns: Store) -> None:
    at = _analytics()
    at.text_area(key="analytics_sql").input("select 1 as one")
    at.text_input(key="analytics_save_name").input("Just one")
    button(at, "Save").click()
    at.run()
    assert not at.error and at.text_input(key="analytics_save_name").value == ""  # saved: the fields are emptied
    at.text_input(key="analytics_save_name").input("Just one")
    button(at, "Save").click()
    at.run()
    assert [e.value for e in at.error] == [
        "You already have a query called 'Just one': choose another name or overwrite it"
    ]
    assert at.text_input(key="analytics_save_name").value == "Just one"  # kept, to change or overwrite

    button(at, "Just one").click()  # loads and runs it, and offers to delete it
    at.run()
    assert at.text_area(key="analytics_sql").value == "select 1 as one"
    button(at, "Delete Just one").click()
    at.run()
    assert not at.error and not [b for b in at.button if b.label == "Just one"]


def test_dashboards_draw_every_chart_and_export(with_turns: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    downloads: dict[str | None, bytes] = {}
    store_file = MemoryMediaFileStorage.load_and_get_id

    def keep(self, data, mimetype, kind, filename=None):  # type: ignore[no-untyped-def]
        downloads[filename] = data
        return store_file(self, data, mimetype, kind, filename)

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", keep)
    at = sign_in("vera", PW)  # viewers read dashboards too
    at.switch_page(view("dashboards")).run()
    assert titles(at) == ["Dashboards"], at.exception
    assert len(at.get("plotly_chart")) == 12
    button(at, "Export dashboard").click()
    at.run()
    labels = [b.label for b in at.get("download_button")]
    assert "Download dashboard (HTML, works offline)" in labels
    assert any(label.startswith("Download its data") for label in labels)
    # The exported file draws each series in a colour of its own, not Streamlit's near-black placeholders.
    figures = figures_in_html(downloads["callbot-dashboard.html"].decode("utf-8"))
    assert len(figures) == 12 and assert_readable_colours(figures) >= 10


@pytest.mark.slow
def test_reports_page_runs_a_report_and_opens_it(with_turns: Store) -> None:
    at = sign_in("rita", PW)
    at.switch_page(view("reports")).run()
    assert titles(at) == ["Reports"], at.exception
    at.selectbox(key="reports_name").select("performance_report").run()
    button(at, "Run report").click()
    at.run(timeout=300)
    assert not at.exception, at.exception
    assert any("finished" in s.value for s in at.success), [e.value for e in at.error]
    assert any(b.label == "Download the report (HTML)" for b in at.get("download_button"))


def test_leaderboard_shows_the_table_and_pivot_and_promotes(with_turns: Store) -> None:
    from callbot_core.store.models import EvalResult, EvalRun, Persona, PersonaVersion

    with with_turns.session() as s:
        version = s.scalar(
            select(PersonaVersion).join(Persona, Persona.id == PersonaVersion.persona_id)
            .where(Persona.key == "receptionist", PersonaVersion.version == 1)
        )  # fmt: skip
        run = EvalRun(batch="lb", suite="receptionist", persona_version_id=version.id, params={"temperature": 0.2},
                      status="passed")  # fmt: skip
        s.add(run)
        s.flush()
        s.add_all([EvalResult(eval_run_id=run.id, turn_index=0, kind="contains", passed=True, detail=""),
                   EvalResult(eval_run_id=run.id, turn_index=0, kind="regex", passed=False, detail="")])  # fmt: skip

    viewer = sign_in("vera", PW)  # viewers see the leaderboard, but cannot promote
    viewer.switch_page(view("leaderboard")).run()
    assert titles(viewer) == ["Leaderboard"], viewer.exception
    assert len(viewer.dataframe) == 2 and not [b for b in viewer.button if b.label == "Promote to production"]
    table = viewer.dataframe[0].value
    row = table[table["version"] == "receptionist@1"].iloc[0]
    assert row["params"] == '{"temperature": 0.2}' and row["pass_rate"] == 0.5 and row["assertions"] == 2

    at = sign_in("rita", PW)
    at.switch_page(view("leaderboard")).run()
    assert titles(at) == ["Leaderboard"], at.exception
    at.selectbox(key="lb_promote").select("receptionist@1").run()
    button(at, "Promote to production").click()
    at.run()
    assert not at.error and [s.value for s in at.success] == ["receptionist@1 is now the production version."]
    table = at.dataframe[0].value  # the page ran again: the table shows the label where it now is
    assert bool(table[table["version"] == "receptionist@1"].iloc[0]["production"]) is True
    with with_turns.session() as s:
        persona = s.scalar(select(Persona).where(Persona.key == "receptionist"))
        assert persona.production_version_id == version.id
