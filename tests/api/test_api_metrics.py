"""/metrics: who may read it, and turns, conversations and requests as Prometheus reads them; the Grafana
dashboard asks only for metrics that exist; the Streamlit process serves the same registry on its own port.

The registry is one per process, shared by every test here: each test labels its turns with a model name of its
own, or compares counts before and after.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import streamlit as st
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families
from streamlit.testing.v1 import AppTest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.conversations import metrics as turn_metrics
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import BackendUnavailable, InvalidInput
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.api.conftest import Api, free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana" / "callbot-dashboard.json"


def parse(text: str) -> Samples:
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def scrape(api: Api, credential: str) -> Samples:
    with api.client(credential) as c:
        r = c.get("/metrics")
    assert r.status_code == 200, r.text
    return parse(r.text)


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name`'s samples whose labels include `labels` (0 when there are none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= set(ls))


def new_model() -> str:
    return f"m-{uuid.uuid4().hex[:10]}"


def test_metrics_needs_a_credential_allowed_to_read(api: Api) -> None:
    with api.client() as c:
        r = c.get("/metrics")
        assert (r.status_code, r.json()["error"]["code"]) == (401, "unauthorized")
    with api.client(api.key("researcher", scopes="chat")) as c:
        r = c.get("/metrics")
        assert (r.status_code, r.json()["error"]["code"]) == (403, "forbidden")
        assert "'read' scope" in r.json()["error"]["message"]
    with api.client(api.key("viewer", scopes="read", name="scraper")) as c:
        r = c.get("/metrics")
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/plain")
        names = {n for n, _ in parse(r.text)}
        assert {"process_resident_memory_bytes", "callbot_active_conversations"} <= names
        assert "# TYPE callbot_turn_ttft_seconds histogram" in r.text
        open_metrics = c.get("/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
        assert open_metrics.headers["content-type"].startswith("application/openmetrics-text")
        assert open_metrics.text.rstrip().endswith("# EOF")
    with api.client(api.token("viewer")) as c:
        assert c.get("/metrics").status_code == 200


def test_turns_show_as_histograms_tokens_and_errors_by_kind(api: Api) -> None:
    reader = api.key("viewer", scopes="read")
    model = new_model()
    before = scrape(api, reader)
    conv = api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted", model=model)
    for _ in range(2):
        assert api.service.send(conv.id, "When do you open?", actor=LOCAL_OPERATOR).text() == "We open at 8."
    api.backend.fail_after = 1  # one piece, then the server goes away
    with pytest.raises(BackendUnavailable):
        api.service.send(conv.id, "And on Sunday?", actor=LOCAL_OPERATOR).text()
    api.backend.fail_after = None
    with api.service.send(conv.id, "Never mind", actor=LOCAL_OPERATOR) as stream:
        next(iter(stream))  # the caller hangs up after the first piece
    with pytest.raises(InvalidInput):
        api.service.send(conv.id, "   ", actor=LOCAL_OPERATOR)  # refused before the conversation is read

    after = scrape(api, reader)
    ours = {"backend": "scripted", "model": model, "persona": "receptionist"}
    assert value(after, "callbot_turn_ttft_seconds_count", **ours) == 2
    assert value(after, "callbot_turn_duration_seconds_count", **ours) == 2
    assert value(after, "callbot_turns_total", outcome="ok", **ours) == 2
    assert value(after, "callbot_turns_total", outcome="failed", **ours) == 2
    # 4 + 4 pieces from the good turns, 1 before the failure, 1 read before hanging up.
    assert value(after, "callbot_tokens_generated_total", **ours) == 10
    assert value(after, "callbot_turn_errors_total", kind="backend_unavailable", **ours) == 1
    assert value(after, "callbot_turn_errors_total", kind="interrupted", **ours) == 1
    # Stages that ended without error: generate only in the good turns, validate and persist in all four.
    stage_counts = {
        stage: value(after, "callbot_turn_stage_seconds_count", stage=stage, **ours)
        for stage in ("validate", "prompt", "generate", "persist")
    }
    assert stage_counts == {"validate": 4, "prompt": 4, "generate": 2, "persist": 4}
    # The first token comes within generation, and generation within the turn.
    ttft = value(after, "callbot_turn_ttft_seconds_sum", **ours)
    generate = value(after, "callbot_turn_stage_seconds_sum", stage="generate", **ours)
    total = value(after, "callbot_turn_duration_seconds_sum", **ours)
    assert 0 < ttft <= generate <= total
    # The empty message was refused before any conversation was read: no backend, model or persona to name.
    refused = {"kind": "invalid_input", "backend": "unknown", "model": "unknown", "persona": "unknown"}
    errors = "callbot_turn_errors_total"
    assert value(after, errors, **refused) - value(before, errors, **refused) == 1


def test_label_values_are_clipped(api: Api) -> None:
    long_model = "x" * 100 + uuid.uuid4().hex
    conv = api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted", model=long_model)
    api.service.send(conv.id, "Hello", actor=LOCAL_OPERATOR).text()
    after = scrape(api, api.key("viewer", scopes="read"))
    assert value(after, "callbot_turn_ttft_seconds_count", model=long_model[:64]) >= 1
    too_long = {v for (n, ls) in after for _, v in ls if n.startswith("callbot_") and len(v) > 64}
    assert not too_long


def test_active_conversations_are_counted_in_the_store(api: Api) -> None:
    reader = api.key("viewer", scopes="read")
    first = api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted")
    api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted")
    api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted", channel="api")
    counted = scrape(api, reader)
    assert {ch: value(counted, "callbot_active_conversations", channel=ch) for ch in ("text", "api", "voice")} == {
        "text": 2,
        "api": 1,
        "voice": 0,
    }
    # Ended by another process sharing the store: the count follows at the next scrape.
    ConversationService(api.store, api.settings).end(first.id, actor=LOCAL_OPERATOR)
    assert value(scrape(api, reader), "callbot_active_conversations", channel="text") == 1


def test_http_requests_are_timed_by_route_template(api: Api) -> None:
    admin = api.key("admin", scopes="admin,read", name="boss")
    before = scrape(api, admin)
    with api.client(admin) as c:
        assert c.delete("/v1/apikeys/987654").status_code == 404
        assert c.get("/nope/987654").status_code == 404
        assert c.get("/v1/apikeys").status_code == 200
    after = scrape(api, admin)

    def delta(**labels: str) -> float:
        name = "callbot_http_request_duration_seconds_count"
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta(route="/v1/apikeys/{key_id}", method="DELETE", status="404") == 1
    assert delta(route="unmatched", method="GET", status="404") == 1
    assert delta(route="/v1/apikeys", method="GET", status="200") == 1
    assert delta(route="/metrics", method="GET", status="200") == 1  # the first scrape, counted once it answered
    assert not [ls for (_, ls) in after if any("987654" in v for _, v in ls)]


def _metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers, ranges, grouping
    clauses, Grafana variables, functions and numbers are taken out."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]|\$\w+", "", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", expr)
    words = (m for m in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr) if not expr[m.end() :].lstrip().startswith("("))
    return {m.group() for m in words} - {"and", "or", "unless", "bool", "offset"}


def _exported_names() -> set[str]:
    """Every sample name the registry exports, also for families that have no sample yet."""
    suffixes = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_count", "_sum", "_created"),
                "summary": ("_count", "_sum", "_created"), "gauge": ("",), "info": ("_info",)}  # fmt: skip
    names: set[str] = set()
    for family in REGISTRY.collect():
        names.update(family.name + s for s in suffixes.get(family.type, ("",)))
        names.update(s.name for s in family.samples)
    return names


def test_the_grafana_dashboard_asks_for_metrics_that_exist(api: Api) -> None:
    conv = api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted")
    api.service.send(conv.id, "Hello", actor=LOCAL_OPERATOR).text()  # so the labelled families have samples too
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["schemaVersion"] >= 36
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"

    exported = _exported_names()
    exprs = {panel["title"]: [t["expr"] for t in panel["targets"]] for panel in dashboard["panels"]}
    # A variable's `label_values(metric, label)`: the metric must exist too.
    exprs["variable job"] = [re.sub(r"label_values\((\w+),.*", r"\1", variables["job"]["definition"])]
    used: set[str] = set()
    for title, panel_exprs in exprs.items():
        names = set().union(*(_metric_names(e) for e in panel_exprs))
        assert names, f"{title}: no metric found in {panel_exprs}"
        assert names <= exported, f"{title}: {sorted(names - exported)} not exported"
        used |= names
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
    # Every asked-for view is there: TTFT, turn, stages, tokens, errors, active, HTTP, memory.
    assert {
        "callbot_turn_ttft_seconds_bucket", "callbot_turn_duration_seconds_bucket", "callbot_turn_stage_seconds_bucket",
        "callbot_tokens_generated_total", "callbot_turn_errors_total", "callbot_active_conversations",
        "callbot_http_request_duration_seconds_bucket", "process_resident_memory_bytes",
    } <= used  # fmt: skip
    # The check itself catches a typo.
    assert not _metric_names("rate(callbot_turn_ttft_second_count[5m])") <= exported


@pytest.fixture
def app_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    port = free_port()
    url = f"sqlite:///{tmp_path / 'app.db'}"
    store = Store(url)
    store.upgrade()
    store.dispose()
    for key, val in {"CALLBOT_DATABASE_URL": url, "CALLBOT_RUNTIME_DIR": str(tmp_path / "runtime"),
                     "CALLBOT_METRICS_PORT": str(port), "CALLBOT_LLM_BACKEND": "embedded"}.items():  # fmt: skip
        monkeypatch.setenv(key, val)
    get_settings.cache_clear()
    st.cache_resource.clear()
    yield port
    get_settings.cache_clear()
    st.cache_resource.clear()


def test_the_app_serves_the_same_registry_on_its_metrics_port(app_env: int) -> None:
    port = app_env
    app = Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py"
    at = AppTest.from_file(str(app), default_timeout=60)
    at.run()
    assert not at.exception, at.exception
    r = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10)  # loopback, no credential
    assert r.status_code == 200
    names = {n for n, _ in parse(r.text)}
    assert {"process_resident_memory_bytes", "callbot_active_conversations"} <= names
    assert "# TYPE callbot_turn_ttft_seconds histogram" in r.text
    # A rerun, or a new session, does not start a second server on the port.
    at.run()
    AppTest.from_file(str(app), default_timeout=60).run()
    assert not turn_metrics.serve_metrics(port)
    assert httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).status_code == 200
    # The app's turns reach it: its service carries the observer.
    from app.common import service

    assert any(isinstance(o, turn_metrics.PrometheusObserver) for o in service().observers)
