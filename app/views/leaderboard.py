"""Leaderboard: persona versions and parameter sets ranked by their suite results and side-by-side votes, and the
latest retrieval evaluation of each knowledge collection and settings.

The numbers are the analytics views' (`leaderboard`, `retrieval_evals`; callbot_core/analytics/leaderboard.py), so
`callbot sql` and notebooks see the same.
"""

from __future__ import annotations

import streamlit as st

from app.common import FAILED, allowed, analytics, current_user, run_action, store
from callbot_core.analytics.leaderboard import leaderboard_data
from callbot_core.errors import CallbotError
from callbot_core.personas.versions import set_production

user = current_user()
st.title("Leaderboard")
st.caption(
    "One row per persona version and parameter set: votes from side-by-side comparisons, pass rate and scores "
    "from scenario-suite runs, latency and length from its suite-run and comparison conversations. "
    'The same numbers: `callbot sql "select * from leaderboard"`.'
)

NOTICE = "leaderboard_notice"
notice = st.session_state.pop(NOTICE, None)
if notice:
    st.success(notice)

try:
    data = leaderboard_data(analytics())
except CallbotError as exc:
    st.error(str(exc))
    st.stop()

board, retrieval = data["personas"], data["retrieval"]

if board.empty:
    st.info("Nothing to rank yet: run a scenario suite (`callbot eval run`) or vote on the Compare page.")
else:
    board.insert(0, "version", board["persona"] + "@" + board["persona_version"].astype(str))
    # What a researcher compares first stands first: who it is, the votes just cast, the suite's verdict, then the rest.
    FIRST = ["version", "params", "production", "votes", "comparisons", "pass_rate", "ttft_p50_ms"]
    shown = board.drop(columns=["persona", "persona_version"])
    shown = shown[[c for c in FIRST if c in shown] + [c for c in shown if c not in FIRST]]
    st.dataframe(
        shown,
        hide_index=True,
        width="stretch",
        column_config={
            "pass_rate": st.column_config.ProgressColumn("pass_rate", min_value=0.0, max_value=1.0),
            "production": st.column_config.CheckboxColumn("production"),
            "mean_similarity": st.column_config.NumberColumn("mean_similarity", format="%.2f"),
            "mean_judge_score": st.column_config.NumberColumn("mean_judge_score", format="%.1f"),
            "ttft_p50_ms": st.column_config.NumberColumn("ttft_p50_ms", format="%.0f"),
            "ttft_p95_ms": st.column_config.NumberColumn("ttft_p95_ms", format="%.0f"),
            "tokens_per_s_mean": st.column_config.NumberColumn("tokens_per_s_mean", format="%.1f"),
            "words_per_turn": st.column_config.NumberColumn("words_per_turn", format="%.1f"),
        },
    )

    st.subheader("Pass rate by version and parameters")
    if board["pass_rate"].isna().all():
        st.info(
            "No suite results yet: run a scenario suite on the Personas page (Suites tab) or with "
            "`callbot eval run SUITE --persona KEY@N` to fill this table."
        )
    else:
        pivot = board.pivot_table(index="version", columns="params", values="pass_rate", aggfunc="mean", dropna=False)
        st.dataframe(
            pivot, width="stretch", column_config={c: st.column_config.NumberColumn(format="%.2f") for c in pivot}
        )

    if allowed("persona.promote"):
        st.subheader("Promote to production")
        c1, c2 = st.columns([3, 1])
        choice = c1.selectbox("Version", sorted(board["version"].unique()), key="lb_promote")
        promote = c2.button("Promote to production", key="lb_promote_btn", disabled=not choice)
        if promote and run_action(set_production, store(), choice, actor=user) is not FAILED:
            # Rerun so the table above shows the label where it now is.
            st.session_state[NOTICE] = f"{choice} is now the production version."
            st.rerun()

st.subheader("Retrieval")
st.caption(
    "The latest retrieval evaluation of each knowledge collection, question set and settings (k, threshold, "
    "embedder, chunk size and overlap): recall@k and MRR over the questions the documents answer, and how many of "
    "those they do not answer were flagged low relevance. Every run: "
    '`callbot sql "select * from retrieval_evals order by created_at desc"`.'
)
if retrieval.empty:
    st.info("No retrieval evaluations yet: run `callbot knowledge eval QUESTIONS.jsonl --collection NAME`.")
else:
    st.dataframe(
        retrieval,
        hide_index=True,
        width="stretch",
        column_config={
            "questions_file": st.column_config.TextColumn("question set"),
            "threshold": st.column_config.NumberColumn("threshold", format="%.2f"),
            "recall_at_k": st.column_config.ProgressColumn("recall@k", min_value=0.0, max_value=1.0, format="%.2f"),
            "mrr": st.column_config.NumberColumn("MRR", format="%.2f"),
            "unanswerable_flagged": st.column_config.TextColumn(
                "unanswerable flagged", help="questions the documents do not answer flagged low relevance / all such"
            ),
            "runs": st.column_config.NumberColumn("runs", help="runs with these settings; the latest is shown"),
            "created_at": st.column_config.DatetimeColumn("when (UTC)", format="YYYY-MM-DD HH:mm"),
            "created_by": st.column_config.TextColumn("by"),
            "retrieval_eval_id": st.column_config.NumberColumn("eval id"),
        },
    )
