"""SQL over HTTP (the console's guard, caps and audit) and runs started in the background: reports and suites."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from callbot_core.store.models import AuditLog, EvalRun, ReportRun
from tests.api.conftest import Api


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def _count(api: Api, model: type) -> int:
    with api.store.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


def _audit(api: Api, action: str) -> list[AuditLog]:
    with api.store.session() as s:
        rows = list(s.scalars(select(AuditLog).where(AuditLog.action == action).order_by(AuditLog.id)))
        s.expunge_all()
        return rows


def _poll(read: Callable[[], dict[str, Any]], done: Callable[[dict[str, Any]], bool], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    state = read()
    while not done(state) and time.monotonic() < deadline:
        time.sleep(0.2)  # polling the run's status, as a client would
        state = read()
    return state


# -- SQL ------------------------------------------------------------------------------------------------------


def test_sql_reads_the_store_caps_rows_and_is_audited(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        cid = c.post("/v1/conversations", json={"persona": "receptionist"}).json()["id"]
        assert c.post(f"/v1/conversations/{cid}/turns", json={"text": "Hours?"}).status_code == 200
    with api.client(api.key("viewer", scopes="read")) as c:  # anyone who may read may query
        r = c.post("/v1/sql", json={"sql": "select conversation_id, channel, completion_tokens from turns"})
        assert r.status_code == 200, r.text
        result = r.json()
        assert result["columns"] == ["conversation_id", "channel", "completion_tokens"]
        assert result["rows"] == [[cid, "api", 4]]
        assert result["truncated"] is False

        r = c.post(
            "/v1/sql",
            json={"sql": "select range as n, timestamp '2024-01-02 03:04:05' as at from range(50)", "limit": 5},
        )
        assert r.status_code == 200, r.text
        capped = r.json()
        assert [row[0] for row in capped["rows"]] == [0, 1, 2, 3, 4] and capped["truncated"] is True
        assert capped["rows"][0][1] == "2024-01-02T03:04:05"  # a timestamp, as ISO text
    (query,) = [a for a in _audit(api, "sql.query") if "range(50)" in a.detail["sql"]]
    assert query.actor == "viewer-user" and query.detail["status"] == "ok" and query.detail["truncated"] is True


@pytest.mark.parametrize(
    "sql",
    [
        "drop table conversations",
        "delete from messages",
        "select 1; select 2",
        "copy turns to '/tmp/x.csv'",
        "select * from read_csv('/etc/passwd')",
    ],  # fmt: skip
)
def test_sql_that_writes_or_reaches_outside_is_refused_and_audited(api: Api, sql: str) -> None:
    with api.client(api.key("researcher")) as c:
        r = c.post("/v1/sql", json={"sql": sql})
    assert _error(r) == (422, "sql_refused"), r.text
    assert "\n" not in r.json()["error"]["message"]
    refused = _audit(api, "sql.refused")
    assert [(a.actor, a.detail["sql"]) for a in refused] == [("researcher-user", sql)]


def test_bad_sql_requests(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        assert _error(c.post("/v1/sql", json={"sql": "selec 1"})) == (422, "invalid_input")
        assert _error(c.post("/v1/sql", json={"sql": "select 1", "limit": 10_001})) == (422, "invalid_request")
        assert _error(c.post("/v1/sql", json={"sql": 1})) == (422, "invalid_request")
        assert _error(c.post("/v1/sql", json={})) == (422, "invalid_request")
        assert _error(c.post("/v1/sql", json={"sql": "select 'a\u0000'"})) == (422, "invalid_request")
    with api.client(api.key("researcher", scopes="chat")) as c:  # running SQL needs the read scope
        assert _error(c.post("/v1/sql", json={"sql": "select 1"})) == (403, "forbidden")
    failed = _audit(api, "sql.query")
    assert [a.detail["status"] for a in failed] == ["failed"]  # the syntax error, recorded


# -- report runs ----------------------------------------------------------------------------------------------


def test_report_runs_are_checked_before_anything_is_stored(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        names = {r["name"]: r["parameters"] for r in c.get("/v1/reports").json()}
        assert "persona_report" in names and "since" in names["persona_report"]
        for body, status, code in (
            ({"report": "nope"}, 404, "not_found"),
            ({"report": "persona_report", "parameters": {"since": "last week"}}, 422, "invalid_input"),
            ({"report": "persona_report", "parameters": {"colour": "red"}}, 422, "invalid_input"),
            ({"report": "persona_report", "parameters": {"persona": "nobody"}}, 422, "invalid_input"),
            ({"report": "persona_report", "parameters": {"database_url": "sqlite:////tmp/x.db"}}, 403, "forbidden"),
            ({"report": "persona_report", "parameters": [1]}, 422, "invalid_request"),
        ):
            assert _error(c.post("/v1/reports/runs", json=body)) == (status, code), body
        assert _error(c.get("/v1/reports/runs/999999")) == (404, "not_found")
    with api.client(api.key("viewer")) as c:
        assert _error(c.post("/v1/reports/runs", json={"report": "persona_report"})) == (403, "forbidden")
    assert _count(api, ReportRun) == 0


@pytest.mark.slow  # a Jupyter kernel starts and runs the notebook: ~10-20 s
def test_a_report_run_starts_in_the_background_and_its_status_is_read_back(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        r = c.post("/v1/reports/runs", json={"report": "persona_report", "parameters": {"since": "-7d"}})
        assert r.status_code == 202, r.text
        run = r.json()
        assert run["status"] == "running" and run["requested_by"] == "researcher-user"
        assert run["parameters"]["since"] and run["has_html"] is False
        state = _poll(lambda: c.get(f"/v1/reports/runs/{run['id']}").json(), lambda s: s["status"] != "running", 180)
        assert state["status"] == "succeeded", state["error"]
        assert state["has_html"] and state["duration_s"] > 0
        html = c.get(f"/v1/reports/runs/{run['id']}/html")
        assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
        assert html.headers["content-security-policy"].startswith("sandbox")
        assert "<html" in html.text.lower()
        assert run["id"] in [r["id"] for r in c.get("/v1/reports/runs").json()]


# -- suite runs -----------------------------------------------------------------------------------------------

SUITE = """name: hours
persona: receptionist@1
turns:
  - say: When do you open?
    expect:
      - contains: open
  - say: Thanks
    expect:
      - max_words: 10
"""


def test_a_suite_run_starts_in_the_background_and_reports_its_summary(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        r = c.post("/v1/evals/runs", json={"suite_yaml": SUITE, "params": {"temperature": [0.2, 0.7]}})
        assert r.status_code == 202, r.text
        batch = r.json()["batch"]
        assert r.json()["suite"] == "hours" and r.json()["cells_total"] == 2
        state = _poll(lambda: c.get(f"/v1/evals/runs/{batch}").json(), lambda s: s["status"] != "running", 60)
        assert state["status"] == "finished", state
        assert state["cells"]["passed"] == 2 and state["cells_done"] == 2 and state["finished_at"]
        summary = {tuple(sorted(row["params"].items())): row for row in state["summary"]}
        assert set(summary) == {(("temperature", 0.2),), (("temperature", 0.7),)}
        assert all(row["passed"] == 1 and row["pass_rate"] == 1.0 for row in summary.values())
        assert "receptionist" in c.get("/v1/evals/suites").json()
    with api.store.session() as s:
        assert set(s.scalars(select(EvalRun.batch))) == {batch}


def test_suite_runs_are_checked_before_anything_is_stored(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        for body, status, code in (
            ({"suite": "no-such-suite"}, 404, "not_found"),
            ({"suite": "../../etc/passwd"}, 404, "not_found"),
            ({"suite": "receptionist", "suite_yaml": SUITE}, 422, "invalid_request"),
            ({}, 422, "invalid_request"),
            ({"suite_yaml": "name: x\nturns: []\n"}, 422, "invalid_input"),
            ({"suite_yaml": SUITE, "personas": ["nobody@1"]}, 404, "not_found"),
            ({"suite_yaml": SUITE, "params": {"warmth": [1]}}, 422, "invalid_input"),
            ({"suite_yaml": SUITE, "params": {"temperature": [9]}}, 422, "invalid_input"),
            ({"suite_yaml": SUITE, "params": {"max_tokens": [1.5]}}, 422, "invalid_input"),
            ({"suite_yaml": SUITE, "repeat": 0}, 422, "invalid_request"),
        ):
            assert _error(c.post("/v1/evals/runs", json=body)) == (status, code), body
        assert _error(c.get("/v1/evals/runs/20990101-000000-abcdef")) == (404, "not_found")
    with api.client(api.key("viewer")) as c:
        assert _error(c.post("/v1/evals/runs", json={"suite_yaml": SUITE})) == (403, "forbidden")
    assert _count(api, EvalRun) == 0
