"""The dashboards' query set: one named DuckDB query per chart, all taking the same filters.

Each query takes the named parameters `$since`, `$until` (conversation start, `since <= started_at <
until`, UTC), `$persona` (persona key) and `$backend`; a NULL parameter means "no filter". System metrics
take `$since`/`$until` on `taken_at` only. Latencies and decode speed are over successful turns (a failed
turn's time is the time to its failure); error rates are over all turns.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import pandas as pd

if TYPE_CHECKING:
    from callbot_core.analytics.engine import Analytics


@dataclass(frozen=True, slots=True)
class DashboardFilters:
    since: datetime | None = None
    until: datetime | None = None
    persona: str | None = None
    backend: str | None = None

    def params(self) -> dict[str, Any]:
        """The queries' named parameters; aware datetimes are turned into the snapshot's naive UTC."""
        return {
            "since": _naive_utc(self.since),
            "until": _naive_utc(self.until),
            "persona": self.persona or None,
            "backend": self.backend or None,
        }


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value  # a naive datetime is taken to be UTC already
    return value.astimezone(UTC).replace(tzinfo=None)


# Latency counts per 50 ms bucket, over the whole range: a slow turn keeps its own bucket (a cap once showed 19 s
# turns as 5 s). The chart groups the buckets into bins that fit the data (charts.latency_bins).
HIST_BUCKET_MS = 50

# The filters, once for turn rows (the `turns` view) and once for conversation rows.
_TURN_FILTER = """
    (CAST($since AS TIMESTAMP) IS NULL OR conversation_started_at >= CAST($since AS TIMESTAMP))
    AND (CAST($until AS TIMESTAMP) IS NULL OR conversation_started_at < CAST($until AS TIMESTAMP))
    AND (CAST($persona AS VARCHAR) IS NULL OR persona = CAST($persona AS VARCHAR))
    AND (CAST($backend AS VARCHAR) IS NULL OR backend = CAST($backend AS VARCHAR))
"""
_FILTERED_CONVERSATIONS = """
    SELECT c.id, c.started_at, c.backend, c.summary_short, c.summary_short_words, c.summary_full_words,
           p.key AS persona
    FROM raw.conversations c
    JOIN raw.persona_versions pv ON pv.id = c.persona_version_id
    JOIN raw.personas p ON p.id = pv.persona_id
    WHERE (CAST($since AS TIMESTAMP) IS NULL OR c.started_at >= CAST($since AS TIMESTAMP))
      AND (CAST($until AS TIMESTAMP) IS NULL OR c.started_at < CAST($until AS TIMESTAMP))
      AND (CAST($persona AS VARCHAR) IS NULL OR p.key = CAST($persona AS VARCHAR))
      AND (CAST($backend AS VARCHAR) IS NULL OR c.backend = CAST($backend AS VARCHAR))
"""

DASHBOARD_QUERIES: dict[str, str] = {
    "latency_by_group": f"""
WITH t AS (
    SELECT persona, persona || '@' || persona_version AS version, backend, model, ttft_ms, total_ms
    FROM turns WHERE error IS NULL AND {_TURN_FILTER}
)
SELECT
    CASE WHEN GROUPING(persona) = 0 THEN 'persona' WHEN GROUPING(version) = 0 THEN 'version'
         WHEN GROUPING(backend) = 0 THEN 'backend' ELSE 'model' END AS group_kind,
    coalesce(persona, version, backend, model) AS group_name,
    count(*) AS turns,
    quantile_cont(ttft_ms, 0.5) AS ttft_p50_ms,
    quantile_cont(ttft_ms, 0.95) AS ttft_p95_ms,
    quantile_cont(total_ms, 0.5) AS total_p50_ms,
    quantile_cont(total_ms, 0.95) AS total_p95_ms
FROM t
GROUP BY GROUPING SETS ((persona), (version), (backend), (model))
ORDER BY group_kind, group_name
""",
    "latency_hist": f"""
WITH t AS (SELECT persona, ttft_ms, total_ms FROM turns WHERE error IS NULL AND {_TURN_FILTER}),
b AS (
    SELECT 'ttft_ms' AS metric, persona, ttft_ms AS ms FROM t WHERE ttft_ms IS NOT NULL
    UNION ALL
    SELECT 'total_ms' AS metric, persona, total_ms AS ms FROM t WHERE total_ms IS NOT NULL
)
SELECT metric, persona,
       CAST(floor(ms / {HIST_BUCKET_MS}) * {HIST_BUCKET_MS} AS BIGINT) AS bucket_ms,
       count(*) AS turns
FROM b GROUP BY ALL ORDER BY metric, persona, bucket_ms
""",
    "tokens_per_s_daily": f"""
SELECT day, persona, avg(tokens_per_s) AS mean_tokens_per_s, quantile_cont(tokens_per_s, 0.5) AS p50_tokens_per_s
FROM turns WHERE error IS NULL AND tokens_per_s IS NOT NULL AND {_TURN_FILTER}
GROUP BY day, persona ORDER BY day, persona
""",
    "conversations_daily": f"""
SELECT CAST(started_at AS DATE) AS day, persona, count(*) AS conversations
FROM ({_FILTERED_CONVERSATIONS}) c
GROUP BY 1, 2 ORDER BY 1, 2
""",
    "error_rate_daily": f"""
SELECT day, backend, count(*) AS turns, count(error) AS failed, count(error) / count(*) AS error_rate
FROM turns WHERE {_TURN_FILTER}
GROUP BY day, backend ORDER BY day, backend
""",
    "talk_ratio": f"""
WITH c AS ({_FILTERED_CONVERSATIONS}),
w AS (
    SELECT conversation_id,
           sum(words) FILTER (WHERE role = 'user') AS user_words,
           sum(words) FILTER (WHERE role = 'assistant') AS bot_words
    FROM raw.messages WHERE conversation_id IN (SELECT id FROM c) GROUP BY conversation_id
)
SELECT c.persona,
       count(*) AS conversations,
       avg(coalesce(w.user_words, 0)) AS mean_user_words,
       avg(coalesce(w.bot_words, 0)) AS mean_bot_words,
       sum(coalesce(w.user_words, 0)) / nullif(sum(coalesce(w.bot_words, 0)), 0) AS talk_ratio
FROM c LEFT JOIN w ON w.conversation_id = c.id
GROUP BY c.persona ORDER BY c.persona
""",
    "summary_lengths": f"""
SELECT persona, count(*) AS summaries, avg(summary_short_words) AS mean_short_words,
       avg(summary_full_words) AS mean_full_words
FROM ({_FILTERED_CONVERSATIONS}) c
WHERE summary_short IS NOT NULL
GROUP BY persona ORDER BY persona
""",
    "system_metrics": """
SELECT taken_at, host, cpu_percent, memory_percent, disk_percent, process_rss_mb
FROM raw.system_metrics
WHERE (CAST($since AS TIMESTAMP) IS NULL OR taken_at >= CAST($since AS TIMESTAMP))
  AND (CAST($until AS TIMESTAMP) IS NULL OR taken_at < CAST($until AS TIMESTAMP))
ORDER BY taken_at, host
""",
}

DASHBOARD_COLUMNS: dict[str, list[str]] = {
    "latency_by_group": ["group_kind", "group_name", "turns", "ttft_p50_ms", "ttft_p95_ms", "total_p50_ms",
                         "total_p95_ms"],
    "latency_hist": ["metric", "persona", "bucket_ms", "turns"],
    "tokens_per_s_daily": ["day", "persona", "mean_tokens_per_s", "p50_tokens_per_s"],
    "conversations_daily": ["day", "persona", "conversations"],
    "error_rate_daily": ["day", "backend", "turns", "failed", "error_rate"],
    "talk_ratio": ["persona", "conversations", "mean_user_words", "mean_bot_words", "talk_ratio"],
    "summary_lengths": ["persona", "summaries", "mean_short_words", "mean_full_words"],
    "system_metrics": ["taken_at", "host", "cpu_percent", "memory_percent", "disk_percent", "process_rss_mb"],
}  # fmt: skip


def dashboard_data(an: Analytics, filters: DashboardFilters) -> dict[str, pd.DataFrame]:
    """Every dashboard frame, from one refresh of the snapshot and one connection."""
    return an.frames(DASHBOARD_QUERIES, filters.params())
