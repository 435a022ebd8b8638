"""A real Prometheus server (Debian's `/usr/bin/prometheus`) scrapes the live API on loopback with a read key, and
the TTFT series of turns made through the API's service comes back through Prometheus's own query API. A scrape
without the key is refused, so that target is down.

SQLite only: what is under test is the scrape, not the store (test_api_metrics.py covers both stores).
"""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR
from tests.api.conftest import Api, free_port

PROMETHEUS = Path("/usr/bin/prometheus")
TIMEOUT_S = 30

pytestmark = pytest.mark.skipif(
    not PROMETHEUS.exists() and os.environ.get("CI", "").lower() != "true",
    reason="Debian's prometheus is not installed (apt-get install prometheus; .ci/run installs it)",
)

CONFIG = """\
global:
  scrape_interval: 1s
  scrape_timeout: 1s
scrape_configs:
  - job_name: callbot
    metrics_path: /metrics
    authorization:
      credentials: {key}
    static_configs:
      - targets: ["{target}"]
  - job_name: anonymous
    metrics_path: /metrics
    static_configs:
      - targets: ["{target}"]
"""


class Prometheus:
    def __init__(self, url: str) -> None:
        self.url = url

    def query(self, promql: str) -> list[dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=5)
        r.raise_for_status()
        body = r.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def targets(self) -> dict[str, dict[str, Any]]:
        r = httpx.get(f"{self.url}/api/v1/targets", params={"state": "active"}, timeout=5)
        r.raise_for_status()
        return {t["labels"]["job"]: t for t in r.json()["data"]["activeTargets"]}


def wait_for(check: Callable[[], Any], what: str) -> Any:
    """Poll `check` until it returns something true (Prometheus scrapes every second), or fail naming `what`."""
    deadline = time.monotonic() + TIMEOUT_S
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(0.25)  # polling Prometheus's HTTP API: there is no event to wait on
    pytest.fail(f"{what} within {TIMEOUT_S} s (last seen: {last!r})")


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Callable[[str, str], Prometheus]]:
    procs: list[subprocess.Popen[bytes]] = []

    def start(target: str, key: str) -> Prometheus:
        config = tmp_path / "prometheus.yml"
        config.write_text(CONFIG.format(key=key, target=target))
        port = free_port()
        log = (tmp_path / "prometheus.log").open("wb")
        proc = subprocess.Popen(
            [str(PROMETHEUS), f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        procs.append(proc)
        server = Prometheus(f"http://127.0.0.1:{port}")

        def ready() -> bool:
            if proc.poll() is not None:
                pytest.fail(f"prometheus exited: {(tmp_path / 'prometheus.log').read_text()[-2000:]}")
            try:
                return httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200
            except httpx.TransportError:
                return False

        wait_for(ready, "Prometheus was not ready")
        return server

    yield start
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("store_url", ["sqlite"], indirect=True)
def test_prometheus_scrapes_ttft_with_a_read_key_and_not_without(
    api: Api, prometheus: Callable[[str, str], Prometheus]
) -> None:
    key = api.key("viewer", scopes="read", name="prometheus")
    server = prometheus(api.url.removeprefix("http://"), key)
    model = f"prom-{uuid.uuid4().hex[:8]}"
    turns = 3
    conv = api.service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted", model=model)
    for _ in range(turns):
        api.service.send(conv.id, "When do you open?", actor=LOCAL_OPERATOR).text()

    series = f'callbot_turn_ttft_seconds_count{{job="callbot", model="{model}", persona="receptionist"}}'

    def scraped_all() -> list[dict[str, Any]] | None:
        result = server.query(series)
        return result if result and float(result[0]["value"][1]) == turns else None

    result = wait_for(scraped_all, f"{series} did not reach {turns}")
    assert len(result) == 1 and result[0]["metric"]["backend"] == "scripted"
    tokens = server.query(f'sum(callbot_tokens_generated_total{{job="callbot", model="{model}"}})')
    assert float(tokens[0]["value"][1]) == turns * len(api.backend.pieces)

    # The scrape without a key is refused: that target is down with the 401 as its error, and `up` says so.
    down = wait_for(lambda: (t := server.targets().get("anonymous")) and t["health"] == "down" and t, "no 401 seen")
    assert "401" in down["lastError"]

    def up() -> dict[str, str] | None:  # polled: one scrape of a loaded machine may time out (1 s)
        jobs = {r["metric"]["job"]: r["value"][1] for r in server.query("up")}
        return jobs if jobs == {"callbot": "1", "anonymous": "0"} else None

    wait_for(up, "up was not 1 for the key's job and 0 for the anonymous one")
