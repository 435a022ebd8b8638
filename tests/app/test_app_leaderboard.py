"""The Leaderboard page: the columns a researcher compares first come first; an empty pivot says how to fill it; the
Retrieval table shows the latest retrieval evaluation per collection and settings, or says how to make one."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from sqlalchemy import select

from callbot_core.store import Store
from callbot_core.store.models import EvalRun, Persona, PersonaVersion, RetrievalEval
from tests.app.helpers import PW, sign_in, titles, view


def test_votes_come_first_and_an_empty_pivot_says_how_to_fill_it(app_store: Store) -> None:
    with app_store.session() as s:
        version = s.scalar(
            select(PersonaVersion).join(Persona, Persona.id == PersonaVersion.persona_id)
            .where(Persona.key == "support", PersonaVersion.version == 1)
        )  # fmt: skip
        # A suite run that stored no assertions yet: a leaderboard row, but no pass rate to pivot.
        s.add(EvalRun(batch="empty", suite="support", persona_version_id=version.id, params=None, status="running"))

    at = sign_in("vera", PW)
    at.switch_page(view("leaderboard")).run()
    assert titles(at) == ["Leaderboard"], at.exception
    columns = list(at.dataframe[0].value.columns)
    assert columns[:7] == ["version", "params", "production", "votes", "comparisons", "pass_rate", "ttft_p50_ms"]
    assert len(at.dataframe) == 1  # no pivot of nothing, and no retrieval evaluations
    assert any("No suite results yet" in i.value and "Suites tab" in i.value for i in at.info)
    assert any(
        "No retrieval evaluations yet" in i.value
        and "callbot knowledge eval QUESTIONS.jsonl --collection NAME" in i.value
        for i in at.info
    )


def test_the_retrieval_table_shows_the_latest_run_per_settings(app_store: Store) -> None:
    t0 = datetime(2026, 3, 2, 9, tzinfo=UTC)

    def run(k: int, recall: float, flagged: int, when: datetime, by: str) -> RetrievalEval:
        return RetrievalEval(collection="clinic", questions_file="clinic.jsonl", k=k, threshold=0.35,
                             embedder="hash-64", chunk_size=400, chunk_overlap=50, questions=6, answerable=4,
                             recall_at_k=recall, mrr=0.5, unanswerable_flagged=flagged, unanswerable=2,
                             created_at=when, created_by=by)  # fmt: skip

    with app_store.session() as s:
        s.add_all([run(5, 0.5, 0, t0, "rita"), run(5, 0.75, 2, t0 + timedelta(hours=1), "ada"),
                   run(10, 0.9, 1, t0, "rita")])  # fmt: skip
    try:
        at = sign_in("vera", PW)
        at.switch_page(view("leaderboard")).run()
        assert not at.exception, at.exception
        assert "Retrieval" in [h.value for h in at.subheader]
        table = next(d.value for d in at.dataframe if "recall_at_k" in d.value.columns)
        shown = table[["k", "recall_at_k", "unanswerable_flagged", "runs", "created_by"]].to_dict("records")
        assert shown == [
            {"k": 10, "recall_at_k": 0.9, "unanswerable_flagged": "1/2", "runs": 1, "created_by": "rita"},
            {"k": 5, "recall_at_k": 0.75, "unanswerable_flagged": "2/2", "runs": 2, "created_by": "ada"},
        ]
        assert not any("No retrieval evaluations yet" in i.value for i in at.info)
    finally:
        with app_store.session() as s:
            s.query(RetrievalEval).delete()
