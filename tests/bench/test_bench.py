"""The benchmark scripts run, and end with one parseable RESULT line (tiny sizes: no timing asserted)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _result(script: str, *args: str) -> dict[str, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_") or k == "CALLBOT_TEST_DATABASE_URL"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), *args], capture_output=True, text=True, env=env, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    last = proc.stdout.strip().splitlines()[-1]
    assert last.startswith("RESULT "), last
    pairs = dict(item.split("=", 1) for item in last.split()[1:])
    assert all(re.fullmatch(r"-?\d+(\.\d+)?", v) for v in pairs.values()), pairs
    return {k: float(v) for k, v in pairs.items()}


def test_turn_overhead_reports_both_databases() -> None:
    if not os.environ.get("CALLBOT_TEST_DATABASE_URL"):
        pytest.skip("the PostgreSQL half needs CALLBOT_TEST_DATABASE_URL")
    r = _result("turn_overhead.py", "--conversations", "2", "--turns", "3")
    assert r["own_p95_ms_sqlite"] > 0 and r["own_p95_ms_postgres"] > 0
    assert r["own_p50_ms_sqlite"] <= r["own_p95_ms_sqlite"]
    assert r["peak_rss_mb"] > 10


@pytest.mark.model
def test_llm_overhead_compares_like_with_like() -> None:
    r = _result("llm_overhead.py", "--rounds", "1", "--max-tokens", "8")
    assert r["raw_decode_tps"] > 0 and r["service_decode_tps"] > 0
    assert r["decode_ratio"] == pytest.approx(r["service_decode_tps"] / r["raw_decode_tps"], rel=1e-2)
    assert "ttft_overhead_ms" in r and r["peak_rss_mb"] > 50
    # What the reset costs is reported as the difference of the two raw paths (timings are not asserted).
    # Printed to 3 decimals, so the difference of the printed values may be off by 0.001.
    reset_cost = r["raw_ttft_ms"] - r["cached_ttft_ms"]
    assert r["cached_ttft_ms"] > 0 and r["seed_reset_ttft_ms"] == pytest.approx(reset_cost, abs=0.01)


@pytest.mark.browser
def test_app_load_times_both_pages() -> None:
    # Same rule as tests/test_browser.py: no chromium is a skip on a laptop and a failure in CI.
    from tests.browser.helpers import IN_CI, chromium_missing_reason

    missing = chromium_missing_reason()
    if missing:
        if IN_CI:
            pytest.fail(f"CI=true but {missing}: the app load bench must run in CI")
        pytest.skip(missing)
    r = _result("app_load.py", "--conversations", "50", "--runs", "1")
    assert {"chat_ready_s", "conversations_ready_s", "seed_s", "peak_rss_mb", "app_rss_mb"} <= r.keys()
    assert r["conversations"] == 50 and r["messages"] == 500
    assert 0 < r["chat_ready_s"] < 30 and 0 < r["conversations_ready_s"] < 30
    assert r["app_rss_mb"] > 50


@pytest.mark.slow
def test_analytics_compares_duckdb_with_both_stores() -> None:
    if not os.environ.get("CALLBOT_TEST_DATABASE_URL"):
        pytest.skip("the PostgreSQL half needs CALLBOT_TEST_DATABASE_URL")
    r = _result("analytics.py", "--conversations", "200", "--runs", "1")
    assert r["conversations"] == 200 and r["messages"] == 2000
    assert r["results_match"] == 1  # the snapshot, SQLite and PostgreSQL agree on every frame
    assert r["dashboard_total_s"] > 0 and r["sqlite_total_s"] > 0 and r["postgres_total_s"] > 0
    assert r["duckdb_vs_sqlite_ratio"] == pytest.approx(r["sqlite_total_s"] / r["dashboard_total_s"], rel=0.1)
    assert r["refresh_nochange_ms"] > 0 and r["initial_snapshot_s"] > 0 and r["peak_rss_mb"] > 50


@pytest.mark.model
def test_eval_throughput_runs_both_modes() -> None:
    r = _result("eval_throughput.py", "--cases", "2", "--rounds", "1", "--max-tokens", "8")
    assert {"cases_per_s_sequential", "cases_per_s_concurrent", "concurrency_speedup", "peak_rss_mb"} <= r.keys()
    assert r["cases"] == 4 and r["cases_per_s_sequential"] > 0 and r["cases_per_s_concurrent"] > 0
    expected = r["cases_per_s_concurrent"] / r["cases_per_s_sequential"]
    assert r["concurrency_speedup"] == pytest.approx(expected, rel=0.05, abs=0.002)
    assert r["peak_rss_mb"] > 50


@pytest.mark.model
def test_knowledge_reports_ingest_query_and_turn_figures() -> None:
    r = _result(
        "knowledge.py", "--chunks", "2000", "--ingest-docs", "2", "--slice-docs", "1", "--paragraphs", "4",
        "--queries", "10", "--rounds", "1",
    )  # fmt: skip
    keys = {
        "ingest_vs_raw_ratio", "ingest_chunks_per_s", "raw_chunks_per_s", "query_p50_ms_100k", "query_p95_ms_100k",
        "embed_p50_ms", "bm25_build_s_100k", "retrieval_ttft_overhead_ms", "passages_prompt_ms", "peak_rss_mb",
    }  # fmt: skip
    assert keys <= r.keys()
    assert r["chunks"] == 2000 and r["ingest_chunks"] > 0
    assert r["ingest_vs_raw_ratio"] > 0 and r["ingest_chunks_per_s"] > 0 and r["raw_chunks_per_s"] > 0
    assert 0 < r["ingest_encode_share"] <= 1
    assert 0 < r["query_p50_ms_100k"] <= r["query_p95_ms_100k"] and r["embed_p50_ms"] > 0
    assert r["bm25_build_s_100k"] > 0 and r["retrieve_stage_p50_ms"] > 0
    # The overhead is a difference of two medians (it may come out negative); both TTFTs are real.
    assert r["ttft_retrieval_ms"] > 0 and r["ttft_static_ms"] > 0
    assert r["retrieval_ttft_overhead_ms"] == pytest.approx(r["ttft_retrieval_ms"] - r["ttft_static_ms"], abs=0.01)
    assert r["passages_prompt_ms"] == pytest.approx(r["ttft_static_fresh_ms"] - r["ttft_plain_fresh_ms"], abs=0.01)
    assert r["peak_rss_mb"] > 100
