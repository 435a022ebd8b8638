"""The analytics snapshot's layout: the tables copied from the store (schema `raw`) and the documented views.

Everything here is computed by DuckDB over its own copy of the store, whichever database the store is,
so the numbers mean the same on SQLite and PostgreSQL: `/` on integers is a float division, `day` is the
UTC calendar day, percentiles are `quantile_cont` (linear interpolation, like PostgreSQL's
`percentile_cont`). All times in the snapshot are UTC timestamps without a zone.

Two things are computed once, when a row is copied, rather than by every query: word counts
(`messages.words`, the summaries' word counts) and, on each turn, when it started and how many words the
caller and the bot said (`raw.turn_metrics.started_at`, `user_words`, `bot_words`). Messages never change
once stored, so these stay right; they are what keeps the dashboards fast on a million messages.
A turn's stages (`raw.turn_stages`) are copied as stored; the view adds each one's time to first output. So
are the passages a turn's prompt used (`raw.turn_retrievals`); their `chunk_id` is the one value the store
changes afterwards (set to NULL when the chunk is deleted), and the refresh follows it (see engine.py).
"""

from __future__ import annotations

from dataclasses import dataclass

# Bump when a table's columns, a copy expression or a view changes: an older snapshot is then rebuilt.
SNAPSHOT_FORMAT = 7


@dataclass(frozen=True, slots=True)
class ViewDoc:
    """A view (or table) users may query: its name, what one row is, and each column's meaning."""

    name: str
    description: str
    columns: list[tuple[str, str]]


@dataclass(frozen=True, slots=True)
class Column:
    name: str
    type: str
    # DuckDB expression over the attached store's table (alias `s`); None means the column itself.
    source: str | None = None
    # A JSON column: read as text, and stored in the snapshot as canonical JSON (sorted keys; '{}' for none).
    json: bool = False


def _ts(name: str) -> Column:
    # TIMESTAMPTZ from PostgreSQL becomes UTC wall time (the refresh connection runs with TimeZone=UTC);
    # SQLite's text timestamps (written in UTC by the store) are parsed as they are.
    return Column(name, "TIMESTAMP", f"CAST(s.{name} AS TIMESTAMP)")


# The copied tables. Columns deliberately left out: users' password hashes, e-mail addresses and lockout
# state (anyone may query the snapshot), and the audit log, saved queries and report/pipeline runs.
TABLES: dict[str, list[Column]] = {
    "users": [
        Column("id", "BIGINT"),
        Column("username", "VARCHAR"),
        Column("display_name", "VARCHAR"),
        Column("role", "VARCHAR"),
        _ts("created_at"),
    ],
    "personas": [
        Column("id", "BIGINT"),
        Column("key", "VARCHAR"),
        Column("name", "VARCHAR"),
        Column("description", "VARCHAR"),
        _ts("created_at"),
        Column("archived", "BOOLEAN", "CAST(s.archived AS BOOLEAN)"),
        Column("production_version_id", "BIGINT"),
    ],
    "persona_versions": [
        Column("id", "BIGINT"),
        Column("persona_id", "BIGINT"),
        Column("version", "INTEGER"),
        Column("system_prompt", "VARCHAR"),
        Column("greeting", "VARCHAR"),
        Column("temperature", "DOUBLE"),
        Column("top_p", "DOUBLE"),
        Column("max_tokens", "INTEGER"),
        Column("backend", "VARCHAR"),
        Column("model", "VARCHAR"),
        Column("voice", "VARCHAR"),
        _ts("created_at"),
    ],
    "conversations": [
        Column("id", "BIGINT"),
        Column("user_id", "BIGINT"),
        Column("persona_version_id", "BIGINT"),
        Column("backend", "VARCHAR"),
        Column("model", "VARCHAR"),
        Column("channel", "VARCHAR"),
        _ts("started_at"),
        _ts("ended_at"),
        Column("status", "VARCHAR"),
        Column("summary_short", "VARCHAR"),
        Column("summary_full", "VARCHAR"),
        Column("summary_short_words", "INTEGER", "word_count(s.summary_short)"),
        Column("summary_full_words", "INTEGER", "word_count(s.summary_full)"),
    ],
    "messages": [
        Column("id", "BIGINT"),
        Column("conversation_id", "BIGINT"),
        Column("role", "VARCHAR"),
        Column("text", "VARCHAR"),
        _ts("created_at"),
        Column("token_count", "INTEGER"),
        Column("words", "INTEGER", "word_count(s.text)"),
    ],
    "turn_metrics": [
        Column("id", "BIGINT"),
        Column("conversation_id", "BIGINT"),
        Column("user_message_id", "BIGINT"),
        Column("assistant_message_id", "BIGINT"),
        Column("backend", "VARCHAR"),
        Column("model", "VARCHAR"),
        Column("ttft_ms", "DOUBLE"),
        Column("total_ms", "DOUBLE"),
        Column("prompt_tokens", "INTEGER"),
        Column("completion_tokens", "INTEGER"),
        Column("tokens_per_s", "DOUBLE"),
        Column("backend_prompt_eval_ms", "DOUBLE"),
        Column("backend_eval_ms", "DOUBLE"),
        Column("backend_load_ms", "DOUBLE"),
        Column("backend_total_ms", "DOUBLE"),
        Column("trimmed_messages", "INTEGER"),
        Column("cached", "BOOLEAN"),
        Column("error", "VARCHAR"),
        _ts("created_at"),
        # Filled from the snapshot's own messages when the turn is copied (see the module docstring).
        Column("started_at", "TIMESTAMP", "NULL"),
        Column("user_words", "INTEGER", "NULL"),
        Column("bot_words", "INTEGER", "NULL"),
    ],
    # One row per stage of a turn (validate, prompt, generate, persist...), timed by the turn's one clock.
    "turn_stages": [
        Column("id", "BIGINT"),
        Column("turn_metrics_id", "BIGINT"),
        Column("stage", "VARCHAR"),
        Column("position", "INTEGER"),
        _ts("started_at"),
        _ts("first_output_at"),
        _ts("ended_at"),
        Column("ms", "DOUBLE"),
        Column("error", "VARCHAR"),
    ],
    # One row per passage a turn's prompt used (callbot_core/knowledge), written with the turn like its stages.
    "turn_retrievals": [
        Column("id", "BIGINT"),
        Column("turn_metrics_id", "BIGINT"),
        Column("chunk_id", "BIGINT"),
        Column("collection", "VARCHAR"),
        Column("source", "VARCHAR"),
        Column("page", "INTEGER"),
        Column("heading", "VARCHAR"),
        Column("rank", "INTEGER"),
        Column("similarity", "DOUBLE"),
        Column("low_relevance", "BOOLEAN", "CAST(s.low_relevance AS BOOLEAN)"),
    ],
    # Scenario-suite runs and their assertions' results (callbot_core/evals), and side-by-side comparisons.
    "eval_runs": [
        Column("id", "BIGINT"),
        Column("batch", "VARCHAR"),
        Column("suite", "VARCHAR"),
        Column("persona_version_id", "BIGINT"),
        Column("params", "VARCHAR", json=True),
        Column("repeat_index", "INTEGER"),
        Column("conversation_id", "BIGINT"),
        Column("created_by", "VARCHAR"),
        _ts("started_at"),
        _ts("finished_at"),
        Column("status", "VARCHAR"),
        Column("error", "VARCHAR"),
    ],
    "eval_results": [
        Column("id", "BIGINT"),
        Column("eval_run_id", "BIGINT"),
        Column("turn_index", "INTEGER"),
        Column("kind", "VARCHAR"),
        Column("spec", "VARCHAR", json=True),
        Column("passed", "BOOLEAN", "CAST(s.passed AS BOOLEAN)"),
        Column("score", "DOUBLE"),
        Column("detail", "VARCHAR"),
    ],
    # Retrieval evaluations (`callbot knowledge eval`): one row per run with its settings, one per question.
    "retrieval_evals": [
        Column("id", "BIGINT"),
        Column("collection", "VARCHAR"),
        Column("questions_file", "VARCHAR"),
        Column("k", "INTEGER"),
        Column("threshold", "DOUBLE"),
        Column("embedder", "VARCHAR"),
        Column("chunk_size", "INTEGER"),
        Column("chunk_overlap", "INTEGER"),
        Column("questions", "INTEGER"),
        Column("answerable", "INTEGER"),
        Column("recall_at_k", "DOUBLE"),
        Column("mrr", "DOUBLE"),
        Column("unanswerable_flagged", "INTEGER"),
        Column("unanswerable", "INTEGER"),
        _ts("created_at"),
        Column("created_by", "VARCHAR"),
    ],
    "retrieval_eval_results": [
        Column("id", "BIGINT"),
        Column("retrieval_eval_id", "BIGINT"),
        Column("question", "VARCHAR"),
        Column("expected_sources", "VARCHAR", json=True),
        Column("retrieved_sources", "VARCHAR", json=True),
        Column("first_relevant_rank", "INTEGER"),
        Column("best_similarity", "DOUBLE"),
        Column("low_relevance", "BOOLEAN", "CAST(s.low_relevance AS BOOLEAN)"),
    ],
    "comparisons": [
        Column("id", "BIGINT"),
        Column("title", "VARCHAR"),
        Column("created_by", "BIGINT"),
        _ts("created_at"),
        Column("blind", "BOOLEAN", "CAST(s.blind AS BOOLEAN)"),
    ],
    "comparison_variants": [
        Column("id", "BIGINT"),
        Column("comparison_id", "BIGINT"),
        Column("position", "INTEGER"),
        Column("label", "VARCHAR"),
        Column("conversation_id", "BIGINT"),
        Column("params", "VARCHAR", json=True),
    ],
    "comparison_votes": [
        Column("id", "BIGINT"),
        Column("comparison_id", "BIGINT"),
        Column("turn_index", "INTEGER"),
        Column("variant_id", "BIGINT"),
        Column("voter_id", "BIGINT"),
        _ts("created_at"),
    ],
    "system_metrics": [
        Column("id", "BIGINT"),
        _ts("taken_at"),
        Column("host", "VARCHAR"),
        Column("cpu_percent", "DOUBLE"),
        Column("memory_percent", "DOUBLE"),
        Column("memory_used_mb", "DOUBLE"),
        Column("disk_percent", "DOUBLE"),
        Column("process_rss_mb", "DOUBLE"),
    ],
}

# Words are runs of non-blank characters; the same rule for messages and summaries.
MACROS = """
CREATE OR REPLACE MACRO word_count(s) AS
    CASE WHEN s IS NULL THEN NULL ELSE len(regexp_extract_all(s, '\\S+')) END;
"""

VIEWS: dict[str, str] = {
    "turns": """
SELECT
    tm.id AS turn_id,
    tm.conversation_id,
    coalesce(tm.started_at, tm.created_at) AS started_at,
    tm.created_at AS finished_at,
    CAST(coalesce(tm.started_at, tm.created_at) AS DATE) AS day,
    c.started_at AS conversation_started_at,
    p.key AS persona,
    p.name AS persona_name,
    pv.version AS persona_version,
    c.persona_version_id,
    tm.backend,
    tm.model,
    u.username,
    c.channel,
    tm.ttft_ms,
    tm.total_ms,
    tm.prompt_tokens,
    tm.completion_tokens,
    tm.tokens_per_s,
    tm.trimmed_messages,
    tm.cached,
    tm.error,
    tm.error IS NOT NULL AS failed,
    tm.user_words,
    tm.bot_words,
    tm.user_message_id,
    tm.assistant_message_id
FROM raw.turn_metrics tm
JOIN raw.conversations c ON c.id = tm.conversation_id
JOIN raw.persona_versions pv ON pv.id = c.persona_version_id
JOIN raw.personas p ON p.id = pv.persona_id
LEFT JOIN raw.users u ON u.id = c.user_id
""",
    "turn_stages": """
SELECT
    ts.turn_metrics_id AS turn_id,
    tm.conversation_id,
    tm.user_message_id,
    p.key AS persona,
    pv.version AS persona_version,
    tm.backend,
    tm.model,
    c.channel,
    ts.stage,
    ts.position,
    ts.started_at,
    ts.ended_at,
    ts.ms,
    date_diff('microsecond', ts.started_at, ts.first_output_at) / 1000.0 AS first_output_ms,
    ts.error
FROM raw.turn_stages ts
JOIN raw.turn_metrics tm ON tm.id = ts.turn_metrics_id
JOIN raw.conversations c ON c.id = tm.conversation_id
JOIN raw.persona_versions pv ON pv.id = c.persona_version_id
JOIN raw.personas p ON p.id = pv.persona_id
""",
    "retrievals": """
SELECT
    tr.turn_metrics_id AS turn_id,
    tm.conversation_id,
    coalesce(tm.started_at, tm.created_at) AS started_at,
    p.key AS persona,
    pv.version AS persona_version,
    tm.backend,
    tm.model,
    c.channel,
    tr.collection,
    tr.source,
    tr.page,
    tr.heading,
    tr.chunk_id,
    tr.rank,
    tr.similarity,
    tr.low_relevance
FROM raw.turn_retrievals tr
JOIN raw.turn_metrics tm ON tm.id = tr.turn_metrics_id
JOIN raw.conversations c ON c.id = tm.conversation_id
JOIN raw.persona_versions pv ON pv.id = c.persona_version_id
JOIN raw.personas p ON p.id = pv.persona_id
""",
    "retrieval_evals": """
SELECT
    id,
    collection,
    questions_file,
    k,
    threshold,
    embedder,
    chunk_size,
    chunk_overlap,
    questions,
    answerable,
    recall_at_k,
    mrr,
    unanswerable_flagged,
    unanswerable,
    created_at,
    created_by
FROM raw.retrieval_evals
""",
    "conversations_stats": """
WITH msg AS (
    SELECT conversation_id,
           count(*) AS messages,
           coalesce(sum(words) FILTER (WHERE role = 'user'), 0) AS user_words,
           coalesce(sum(words) FILTER (WHERE role = 'assistant'), 0) AS bot_words,
           max(created_at) AS last_message_at
    FROM raw.messages GROUP BY conversation_id
), t AS (
    SELECT conversation_id,
           count(*) AS turns,
           count(error) AS failed_turns,
           avg(ttft_ms) FILTER (WHERE error IS NULL) AS ttft_mean_ms,
           quantile_cont(ttft_ms, 0.95) FILTER (WHERE error IS NULL) AS ttft_p95_ms,
           avg(total_ms) FILTER (WHERE error IS NULL) AS total_mean_ms,
           quantile_cont(total_ms, 0.95) FILTER (WHERE error IS NULL) AS total_p95_ms,
           avg(tokens_per_s) FILTER (WHERE error IS NULL) AS tokens_per_s_mean,
           sum(completion_tokens) AS completion_tokens
    FROM raw.turn_metrics GROUP BY conversation_id
)
SELECT
    c.id AS conversation_id,
    c.started_at,
    c.ended_at,
    CAST(c.started_at AS DATE) AS day,
    c.status,
    p.key AS persona,
    pv.version AS persona_version,
    c.backend,
    c.model,
    u.username,
    c.channel,
    coalesce(msg.messages, 0) AS messages,
    coalesce(t.turns, 0) AS turns,
    coalesce(t.failed_turns, 0) AS failed_turns,
    date_diff('millisecond', c.started_at, coalesce(c.ended_at, msg.last_message_at, c.started_at)) / 1000.0
        AS duration_s,
    coalesce(msg.user_words, 0) AS user_words,
    coalesce(msg.bot_words, 0) AS bot_words,
    msg.user_words / nullif(msg.bot_words, 0) AS talk_ratio,
    t.ttft_mean_ms,
    t.ttft_p95_ms,
    t.total_mean_ms,
    t.total_p95_ms,
    t.tokens_per_s_mean,
    coalesce(t.completion_tokens, 0) AS completion_tokens,
    c.summary_short_words,
    c.summary_full_words,
    c.summary_short,
    c.summary_full
FROM raw.conversations c
JOIN raw.persona_versions pv ON pv.id = c.persona_version_id
JOIN raw.personas p ON p.id = pv.persona_id
LEFT JOIN raw.users u ON u.id = c.user_id
LEFT JOIN msg ON msg.conversation_id = c.id
LEFT JOIN t ON t.conversation_id = c.id
""",
    "persona_performance": """
WITH conv AS (
    SELECT persona_version_id, count(*) AS conversations, min(started_at) AS first_started_at,
           max(started_at) AS last_started_at
    FROM raw.conversations GROUP BY persona_version_id
), t AS (
    SELECT c.persona_version_id,
           count(*) AS turns,
           count(tm.error) AS failed_turns,
           quantile_cont(tm.ttft_ms, 0.5) FILTER (WHERE tm.error IS NULL) AS ttft_p50_ms,
           quantile_cont(tm.ttft_ms, 0.95) FILTER (WHERE tm.error IS NULL) AS ttft_p95_ms,
           quantile_cont(tm.total_ms, 0.5) FILTER (WHERE tm.error IS NULL) AS total_p50_ms,
           quantile_cont(tm.total_ms, 0.95) FILTER (WHERE tm.error IS NULL) AS total_p95_ms,
           avg(tm.tokens_per_s) FILTER (WHERE tm.error IS NULL) AS tokens_per_s_mean,
           quantile_cont(tm.tokens_per_s, 0.5) FILTER (WHERE tm.error IS NULL) AS tokens_per_s_p50,
           avg(tm.completion_tokens) FILTER (WHERE tm.error IS NULL) AS completion_tokens_mean
    FROM raw.turn_metrics tm JOIN raw.conversations c ON c.id = tm.conversation_id
    GROUP BY c.persona_version_id
)
SELECT
    p.key AS persona,
    p.name AS persona_name,
    pv.version AS persona_version,
    pv.id AS persona_version_id,
    coalesce(conv.conversations, 0) AS conversations,
    coalesce(t.turns, 0) AS turns,
    coalesce(t.failed_turns, 0) AS failed_turns,
    t.failed_turns / nullif(t.turns, 0) AS error_rate,
    t.ttft_p50_ms,
    t.ttft_p95_ms,
    t.total_p50_ms,
    t.total_p95_ms,
    t.tokens_per_s_mean,
    t.tokens_per_s_p50,
    t.completion_tokens_mean,
    conv.first_started_at,
    conv.last_started_at
FROM raw.persona_versions pv
JOIN raw.personas p ON p.id = pv.persona_id
LEFT JOIN conv ON conv.persona_version_id = pv.id
LEFT JOIN t ON t.persona_version_id = pv.id
""",
    "daily_activity": """
WITH conv AS (
    SELECT CAST(started_at AS DATE) AS day, count(*) AS conversations, count(DISTINCT user_id) AS users
    FROM raw.conversations GROUP BY 1
), t AS (
    SELECT CAST(coalesce(started_at, created_at) AS DATE) AS day,
           count(*) AS turns,
           count(error) AS failed_turns,
           quantile_cont(ttft_ms, 0.5) FILTER (WHERE error IS NULL) AS ttft_p50_ms,
           avg(tokens_per_s) FILTER (WHERE error IS NULL) AS tokens_per_s_mean,
           sum(coalesce(user_words, 0) + coalesce(bot_words, 0)) AS words
    FROM raw.turn_metrics GROUP BY 1
)
SELECT
    day,
    coalesce(conv.conversations, 0) AS conversations,
    coalesce(conv.users, 0) AS users,
    coalesce(t.turns, 0) AS turns,
    coalesce(t.failed_turns, 0) AS failed_turns,
    t.failed_turns / nullif(t.turns, 0) AS error_rate,
    t.ttft_p50_ms,
    t.tokens_per_s_mean,
    coalesce(t.words, 0) AS words
FROM conv FULL OUTER JOIN t USING (day)
""",
    "leaderboard": """
WITH runs AS (
    SELECT id, persona_version_id, conversation_id, coalesce(params, '{}') AS params FROM raw.eval_runs
), run_counts AS (
    SELECT persona_version_id, params, count(*) AS eval_runs FROM runs GROUP BY 1, 2
), res AS (
    SELECT r.persona_version_id, r.params,
           count(*) AS assertions,
           avg(CASE WHEN e.passed THEN 1.0 ELSE 0.0 END) AS pass_rate,
           avg(e.score) FILTER (WHERE e.kind = 'similar_to') AS mean_similarity,
           avg(e.score) FILTER (WHERE e.kind = 'judge') AS mean_judge_score
    FROM raw.eval_results e JOIN runs r ON r.id = e.eval_run_id
    GROUP BY 1, 2
), variants AS (
    SELECT v.id, v.comparison_id, v.conversation_id, c.persona_version_id, coalesce(v.params, '{}') AS params
    FROM raw.comparison_variants v JOIN raw.conversations c ON c.id = v.conversation_id
), measured AS (
    -- Latency, speed and length come from every conversation the version and parameter set had: suite runs and
    -- side-by-side comparisons alike, so a version that was only compared still shows its TTFT.
    SELECT persona_version_id, params, conversation_id FROM runs
    UNION ALL
    SELECT persona_version_id, params, conversation_id FROM variants
), lat AS (
    SELECT r.persona_version_id, r.params,
           quantile_cont(tm.ttft_ms, 0.5) FILTER (WHERE tm.error IS NULL) AS ttft_p50_ms,
           quantile_cont(tm.ttft_ms, 0.95) FILTER (WHERE tm.error IS NULL) AS ttft_p95_ms,
           avg(tm.tokens_per_s) FILTER (WHERE tm.error IS NULL) AS tokens_per_s_mean,
           avg(tm.bot_words) FILTER (WHERE tm.error IS NULL) AS words_per_turn
    FROM raw.turn_metrics tm JOIN measured r ON r.conversation_id = tm.conversation_id
    GROUP BY 1, 2
), won AS (
    SELECT v.persona_version_id, v.params, count(*) AS votes
    FROM raw.comparison_votes cv JOIN variants v ON v.id = cv.variant_id
    GROUP BY 1, 2
), took_part AS (
    SELECT v.persona_version_id, v.params, count(DISTINCT (cv.comparison_id, cv.turn_index)) AS comparisons
    FROM variants v JOIN raw.comparison_votes cv ON cv.comparison_id = v.comparison_id
    GROUP BY 1, 2
), cells AS (
    SELECT persona_version_id, params FROM runs
    UNION
    SELECT persona_version_id, params FROM variants
)
SELECT
    p.key AS persona,
    pv.version AS persona_version,
    k.params,
    coalesce(p.production_version_id = pv.id, false) AS production,
    coalesce(rc.eval_runs, 0) AS eval_runs,
    coalesce(res.assertions, 0) AS assertions,
    res.pass_rate,
    res.mean_similarity,
    res.mean_judge_score,
    lat.ttft_p50_ms,
    lat.ttft_p95_ms,
    lat.tokens_per_s_mean,
    lat.words_per_turn,
    coalesce(won.votes, 0) AS votes,
    coalesce(took_part.comparisons, 0) AS comparisons
FROM cells k
JOIN raw.persona_versions pv ON pv.id = k.persona_version_id
JOIN raw.personas p ON p.id = pv.persona_id
LEFT JOIN run_counts rc ON rc.persona_version_id = k.persona_version_id AND rc.params = k.params
LEFT JOIN res ON res.persona_version_id = k.persona_version_id AND res.params = k.params
LEFT JOIN lat ON lat.persona_version_id = k.persona_version_id AND lat.params = k.params
LEFT JOIN won ON won.persona_version_id = k.persona_version_id AND won.params = k.params
LEFT JOIN took_part ON took_part.persona_version_id = k.persona_version_id AND took_part.params = k.params
""",
    "messages": """
SELECT id, conversation_id, role, text, created_at, token_count, words FROM raw.messages
""",
    "system_metrics": """
SELECT id, taken_at, host, cpu_percent, memory_percent, memory_used_mb, disk_percent, process_rss_mb
FROM raw.system_metrics
""",
}

_TURN_COLUMNS = [
    ("turn_id", "the turn's id (turn_metrics.id)"),
    ("conversation_id", "its conversation"),
    ("started_at", "when the caller's message arrived (UTC)"),
    ("finished_at", "when the turn was stored: reply complete, or the failure (UTC)"),
    ("day", "UTC date of started_at"),
    ("conversation_started_at", "when its conversation started (UTC)"),
    ("persona", "persona key, e.g. receptionist"),
    ("persona_name", "persona display name"),
    ("persona_version", "persona version number"),
    ("persona_version_id", "persona_versions.id"),
    ("backend", "LLM backend that served the turn (embedded, ollama, openai)"),
    ("model", "model name on that backend"),
    ("username", "who held the conversation (NULL: the command line without signing in)"),
    ("channel", "text, voice, api or simulated"),
    ("ttft_ms", "time to first token, ms"),
    ("total_ms", "whole turn, ms (for a failed turn: until it failed)"),
    ("prompt_tokens", "tokens in the prompt"),
    ("completion_tokens", "tokens in the reply (NULL when failed)"),
    ("tokens_per_s", "decode speed of the reply"),
    ("trimmed_messages", "history messages dropped to fit the context window"),
    ("cached", "the reply came from the API's response cache, not the backend"),
    ("error", "what failed, or NULL"),
    ("failed", "error IS NOT NULL"),
    ("user_words", "words in the caller's message"),
    ("bot_words", "words in the reply (NULL when failed)"),
    ("user_message_id", "messages.id of the caller's message"),
    ("assistant_message_id", "messages.id of the reply (NULL when failed)"),
]

VIEW_DOCS: list[ViewDoc] = [
    ViewDoc(
        "turns",
        "One row per turn (a caller message and the bot's reply), failed turns included.",
        _TURN_COLUMNS,
    ),
    ViewDoc(
        "turn_stages",
        "One row per stage of a turn, in the order the stages ran (validate, prompt, generate, persist; more as "
        "capabilities are added). All of a turn's stages are timed by one clock, so their ms add up to no more "
        "than the turn took. A failed turn has rows for the stages that ran, the error on the one that failed.",
        [
            ("turn_id", "the turn (turns.turn_id, turn_metrics.id)"),
            ("conversation_id", "its conversation"),
            ("user_message_id", "messages.id of the caller's message"),
            ("persona", "persona key"),
            ("persona_version", "persona version number"),
            ("backend", "LLM backend that served the turn"),
            ("model", "model name on that backend"),
            ("channel", "text, voice, api or simulated"),
            ("stage", "the stage's name: validate, prompt, generate, persist..."),
            ("position", "its place in the turn's stage list, 0 first"),
            ("started_at", "when the stage started (UTC)"),
            ("ended_at", "when it ended (UTC)"),
            ("ms", "how long it took, ms"),
            (
                "first_output_ms",
                "ms from the stage's start to its first output (generate: to the first token, "
                "the turn's TTFT); NULL for stages without output",
            ),
            ("error", "why the stage failed, or NULL"),
        ],
    ),
    ViewDoc(
        "retrievals",
        "One row per passage of a knowledge collection that a turn's prompt used, in rank order (the prompt "
        "numbers them [1], [2]...); a turn that used none has no row. Source, page and heading are as they were "
        "when the turn ran, also after the document was re-ingested or deleted.",
        [
            ("turn_id", "the turn (turns.turn_id, turn_metrics.id)"),
            ("conversation_id", "its conversation"),
            ("started_at", "when the turn's caller message arrived (UTC)"),
            ("persona", "persona key"),
            ("persona_version", "persona version number"),
            ("backend", "LLM backend that served the turn"),
            ("model", "model name on that backend"),
            ("channel", "text, voice, api or simulated"),
            ("collection", "the knowledge collection searched"),
            ("source", "the passage's document (file name)"),
            ("page", "its page in that document, NULL when the format has none"),
            ("heading", "the heading the passage sits under, or NULL"),
            ("chunk_id", "the stored chunk (knowledge_chunks.id); NULL once the chunk was deleted or re-ingested"),
            ("rank", "its place among the turn's passages, 1 = best"),
            ("similarity", "cosine similarity of passage and question, 0..1 (NULL when not known)"),
            (
                "low_relevance",
                "the turn's flag, the same on each of its rows: its best similarity was below the relevance "
                "threshold, so the documents probably do not answer the question",
            ),
        ],
    ),
    ViewDoc(
        "retrieval_evals",
        "One row per retrieval evaluation run (`callbot knowledge eval`): a question set against a collection, "
        "with the settings it ran with and its scores. Its questions, one row each, are in "
        "raw.retrieval_eval_results (retrieval_eval_id = id).",
        [
            ("id", "retrieval_evals.id"),
            ("collection", "the knowledge collection evaluated"),
            ("questions_file", "the question set's file name"),
            ("k", "passages retrieved per question"),
            ("threshold", "the relevance threshold: a best similarity below it flags the question low_relevance"),
            ("embedder", "the embedding model of the collection"),
            ("chunk_size", "the collection's chunk size then (its documents' most common), NULL if unknown"),
            ("chunk_overlap", "the collection's chunk overlap then (its documents' most common), NULL if unknown"),
            ("questions", "questions asked"),
            ("answerable", "questions with expected sources (the documents answer them)"),
            (
                "recall_at_k",
                "share of an answerable question's expected sources among its k passages, averaged, 0..1 "
                "(NULL without answerable questions)",
            ),
            (
                "mrr",
                "mean reciprocal rank: 1 / rank of the first passage from an expected source (0 when none), "
                "averaged over the answerable questions, 0..1",
            ),
            ("unanswerable_flagged", "questions the documents do not answer that were flagged low relevance"),
            ("unanswerable", "questions the documents do not answer (no expected sources)"),
            ("created_at", "when it ran (UTC)"),
            ("created_by", "who ran it (NULL: the command line without signing in)"),
        ],
    ),
    ViewDoc(
        "conversations_stats",
        "One row per conversation with its counts, talk and latency figures. Latencies are over successful "
        "turns; words count every user and assistant message (the greeting is bot talk).",
        [
            ("conversation_id", "conversations.id"),
            ("started_at", "start (UTC)"),
            ("ended_at", "end (UTC), NULL while active"),
            ("day", "UTC date of started_at"),
            ("status", "active or ended"),
            ("persona", "persona key"),
            ("persona_version", "persona version number"),
            ("backend", "backend chosen for the conversation"),
            ("model", "model chosen for the conversation"),
            ("username", "who held it (NULL: command line)"),
            ("channel", "text, voice, api or simulated"),
            ("messages", "stored messages (greeting included)"),
            ("turns", "turns, failed ones included"),
            ("failed_turns", "turns that failed"),
            ("duration_s", "seconds from start to end (or to the last message while active)"),
            ("user_words", "words the caller said"),
            ("bot_words", "words the bot said"),
            ("talk_ratio", "user_words / bot_words (NULL if the bot said nothing)"),
            ("ttft_mean_ms", "mean time to first token"),
            ("ttft_p95_ms", "95th percentile time to first token"),
            ("total_mean_ms", "mean turn time"),
            ("total_p95_ms", "95th percentile turn time"),
            ("tokens_per_s_mean", "mean decode speed"),
            ("completion_tokens", "reply tokens in total"),
            ("summary_short_words", "words in the short summary (NULL if none)"),
            ("summary_full_words", "words in the full summary (NULL if none)"),
            ("summary_short", "the short summary"),
            ("summary_full", "the full summary"),
        ],
    ),
    ViewDoc(
        "persona_performance",
        "One row per persona version (unused versions included). Latency and speed over successful turns; "
        "error_rate over all turns.",
        [
            ("persona", "persona key"),
            ("persona_name", "persona display name"),
            ("persona_version", "version number"),
            ("persona_version_id", "persona_versions.id"),
            ("conversations", "conversations held with this version"),
            ("turns", "turns, failed ones included"),
            ("failed_turns", "turns that failed"),
            ("error_rate", "failed_turns / turns, 0..1 (NULL without turns)"),
            ("ttft_p50_ms", "median time to first token"),
            ("ttft_p95_ms", "95th percentile time to first token"),
            ("total_p50_ms", "median turn time"),
            ("total_p95_ms", "95th percentile turn time"),
            ("tokens_per_s_mean", "mean decode speed"),
            ("tokens_per_s_p50", "median decode speed"),
            ("completion_tokens_mean", "mean reply length in tokens"),
            ("first_started_at", "first conversation's start (UTC)"),
            ("last_started_at", "latest conversation's start (UTC)"),
        ],
    ),
    ViewDoc(
        "daily_activity",
        "One row per UTC day with conversations started and turns taken that day.",
        [
            ("day", "UTC date"),
            ("conversations", "conversations started"),
            ("users", "distinct signed-in users who started one"),
            ("turns", "turns taken (by the turn's start)"),
            ("failed_turns", "turns that failed"),
            ("error_rate", "failed_turns / turns, 0..1"),
            ("ttft_p50_ms", "median time to first token of successful turns"),
            ("tokens_per_s_mean", "mean decode speed of successful turns"),
            ("words", "words said by callers and the bot in those turns"),
        ],
    ),
    ViewDoc(
        "leaderboard",
        "One row per persona version and parameter set that was evaluated by a scenario suite or took part "
        "in a side-by-side comparison. Eval figures come from the assertions of that version and parameter "
        "set's suite runs; latency, speed and words from its conversations in suite runs and side-by-side "
        "comparisons (successful turns); votes from the side-by-side comparisons.",
        [
            ("persona", "persona key"),
            ("persona_version", "version number"),
            ("params", "generation parameters as canonical JSON (sorted keys), '{}' for none"),
            ("production", "true when this version carries the persona's production label now"),
            ("eval_runs", "suite runs (one per suite, version, parameter set and repeat)"),
            ("assertions", "assertion results of those runs"),
            ("pass_rate", "passed / assertions, 0..1 (NULL without assertions)"),
            ("mean_similarity", "mean cosine similarity of the similar_to assertions"),
            ("mean_judge_score", "mean LLM-judge score (1-5) of the judge assertions"),
            ("ttft_p50_ms", "median time to first token in its suite-run and comparison conversations"),
            ("ttft_p95_ms", "95th percentile time to first token in its suite-run and comparison conversations"),
            ("tokens_per_s_mean", "mean decode speed in its suite-run and comparison conversations"),
            ("words_per_turn", "mean words per bot reply in its suite-run and comparison conversations"),
            ("votes", "side-by-side votes won"),
            ("comparisons", "side-by-side turns voted on in which this version and parameter set took part"),
        ],
    ),
    ViewDoc(
        "messages",
        "Every stored message: the transcripts.",
        [
            ("id", "messages.id"),
            ("conversation_id", "its conversation"),
            ("role", "user, assistant or system"),
            ("text", "what was said"),
            ("created_at", "when (UTC)"),
            ("token_count", "tokens, when known"),
            ("words", "words (runs of non-blank characters)"),
        ],
    ),
    ViewDoc(
        "system_metrics",
        "Machine and process snapshots taken by the metrics pipeline.",
        [
            ("id", "system_metrics.id"),
            ("taken_at", "when (UTC)"),
            ("host", "machine name"),
            ("cpu_percent", "CPU use, %"),
            ("memory_percent", "memory use, %"),
            ("memory_used_mb", "memory used, MB"),
            ("disk_percent", "disk use of the runtime folder's disk, %"),
            ("process_rss_mb", "resident memory of the process that took it, MB"),
        ],
    ),
]

RAW_TABLES_NOTE = (
    "The copied store tables are also readable as raw.users (no password hashes or e-mail), raw.personas, "
    "raw.persona_versions, raw.conversations, raw.messages, raw.turn_metrics, raw.turn_stages, "
    "raw.turn_retrievals, raw.system_metrics, raw.eval_runs, raw.eval_results, raw.comparisons, "
    "raw.comparison_variants, raw.comparison_votes, raw.retrieval_evals and raw.retrieval_eval_results "
    "(JSON columns as canonical JSON text). "
    "Times are UTC. word_count(text) counts words the way the views do."
)
