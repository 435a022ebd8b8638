"""The Leaderboard page's data: persona versions ranked (the `leaderboard` view) and retrieval evaluations.

Both come from the analytics snapshot, so `callbot sql` and notebooks see the same numbers; the page only renders.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pandas as pd

    from callbot_core.analytics.engine import Analytics

PERSONAS_SQL = "select * from leaderboard order by pass_rate desc nulls last, persona, persona_version"

# What makes two retrieval evaluations comparable runs of the same thing: the collection (and its embedder, which a
# collection re-created under the same name may change), the question set, and the settings that change the scores.
RETRIEVAL_SETTINGS = ("collection", "questions_file", "k", "threshold", "embedder", "chunk_size", "chunk_overlap")

# The latest run per settings (a rerun replaces the one before on the board; every run stays in `retrieval_evals`),
# best recall first within a collection and question set.
_PARTITION = f"PARTITION BY {', '.join(RETRIEVAL_SETTINGS)}"
RETRIEVAL_SQL = f"""
SELECT
    collection,
    questions_file,
    k,
    threshold,
    chunk_size,
    chunk_overlap,
    embedder,
    recall_at_k,
    mrr,
    format('{{}}/{{}}', unanswerable_flagged, unanswerable) AS unanswerable_flagged,
    questions,
    answerable,
    count(*) OVER ({_PARTITION}) AS runs,
    created_at,
    created_by,
    id AS retrieval_eval_id
FROM retrieval_evals
QUALIFY row_number() OVER ({_PARTITION} ORDER BY created_at DESC, id DESC) = 1
ORDER BY collection, questions_file, recall_at_k DESC NULLS LAST, mrr DESC NULLS LAST, k, threshold, retrieval_eval_id
"""

LEADERBOARD_QUERIES = {"personas": PERSONAS_SQL, "retrieval": RETRIEVAL_SQL}


def leaderboard_data(an: Analytics, *, refresh: bool = True) -> dict[str, pd.DataFrame]:
    """The page's two tables on one refresh: `personas` (the `leaderboard` view, best pass rate first) and
    `retrieval` (see `retrieval_leaderboard`)."""
    return an.frames(LEADERBOARD_QUERIES, refresh=refresh)


def retrieval_leaderboard(an: Analytics, *, refresh: bool = True) -> pd.DataFrame:
    """The latest retrieval evaluation per collection, question set and settings (k, threshold, embedder, chunk
    size and overlap): recall@k, MRR, unanswerable questions flagged as "flagged/unanswerable", how many runs those
    settings had, and when and by whom the shown one ran."""
    return an.df(RETRIEVAL_SQL, refresh=refresh)
