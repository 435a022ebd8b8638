"""The `leaderboard` analytics view: eval runs, their results and conversations, and side-by-side votes."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.analytics import Analytics
from callbot_core.personas.versions import set_production
from callbot_core.store.models import (
    Comparison,
    ComparisonVariant,
    ComparisonVote,
    Conversation,
    EvalResult,
    EvalRun,
    Message,
    PersonaVersion,
    TurnMetrics,
)
from tests.analytics.test_analytics import version_of

T0 = datetime(2026, 2, 1, 9, 0, tzinfo=UTC)
HOT = json.dumps({"temperature": 0.7, "top_p": 0.9}, sort_keys=True)


def conversation(session, version: PersonaVersion, turns: list[tuple[float, float, str]]) -> Conversation:
    """turns: (ttft ms, tokens/s, reply)."""
    conv = Conversation(persona_version_id=version.id, backend="embedded", model="m", channel="text",
                        started_at=T0, status="ended", ended_at=T0 + timedelta(minutes=5))  # fmt: skip
    session.add(conv)
    session.flush()
    for i, (ttft, tps, reply) in enumerate(turns):
        when = T0 + timedelta(seconds=10 * i)
        um = Message(conversation_id=conv.id, role="user", text="hello there", created_at=when)
        am = Message(conversation_id=conv.id, role="assistant", text=reply, created_at=when + timedelta(seconds=1))
        session.add_all([um, am])
        session.flush()
        session.add(
            TurnMetrics(
                conversation_id=conv.id,
                user_message_id=um.id,
                assistant_message_id=am.id,
                backend="embedded",
                model="m",
                ttft_ms=ttft,
                total_ms=ttft * 2,
                prompt_tokens=10,
                completion_tokens=5,
                tokens_per_s=tps,
                created_at=when + timedelta(seconds=1),
            )  # fmt: skip
        )
    session.flush()
    return conv


def run(session, version: PersonaVersion, params: dict | None, conv: Conversation | None, results: list[tuple],
        repeat: int = 0) -> EvalRun:  # fmt: skip
    """results: (kind, passed, score)."""
    row = EvalRun(batch="b1", suite="receptionist", persona_version_id=version.id, params=params, repeat_index=repeat,
                  conversation_id=conv.id if conv else None, started_at=T0, status="passed")  # fmt: skip
    session.add(row)
    session.flush()
    for i, (kind, passed, score) in enumerate(results):
        session.add(EvalResult(eval_run_id=row.id, turn_index=i, kind=kind, spec={"k": kind}, passed=passed,
                               score=score, detail=""))  # fmt: skip
    session.flush()
    return row


def build(store) -> dict[str, int]:
    """Every number the tests expect is worked out by hand from these rows."""
    with store.session() as s:
        rec1 = version_of(s, "receptionist")
        s.add(PersonaVersion(persona_id=rec1.persona_id, version=2, system_prompt="Be brief."))
        s.flush()
        rec2 = version_of(s, "receptionist", 2)
        c1 = conversation(s, rec1, [(100.0, 10.0, "one two three"), (300.0, 30.0, "one two three four five")])
        c2 = conversation(s, rec1, [(200.0, 20.0, "one two three four")])
        run(
            s,
            rec1,
            {"temperature": 0.2},
            c1,
            [("contains", True, None), ("regex", False, None), ("similar_to", True, 0.8), ("judge", True, 4.0)],
        )
        run(s, rec1, {"temperature": 0.2}, c2, [("contains", True, None), ("similar_to", False, 0.4)], repeat=1)
        r3 = run(s, rec2, None, None, [("max_words", True, None), ("judge", False, 2.0)])
        run(s, rec2, {"top_p": 0.9, "temperature": 0.7}, None, [("contains", False, None)])
        # A side-by-side comparison: rec1 without parameters against rec2 hot (keys in another order).
        comp = Comparison(title="hours", blind=True)
        s.add(comp)
        s.flush()
        va = ComparisonVariant(comparison_id=comp.id, position=0, label="A", params=None,
                               conversation_id=conversation(s, rec1, [(400.0, 10.0, "a b")]).id)  # fmt: skip
        vb = ComparisonVariant(comparison_id=comp.id, position=1, label="B", params={"temperature": 0.7, "top_p": 0.9},
                               conversation_id=conversation(s, rec2, []).id)  # fmt: skip
        s.add_all([va, vb])
        s.flush()
        s.add_all([ComparisonVote(comparison_id=comp.id, turn_index=0, variant_id=vb.id),
                   ComparisonVote(comparison_id=comp.id, turn_index=1, variant_id=va.id),
                   ComparisonVote(comparison_id=comp.id, turn_index=2, variant_id=va.id)])  # fmt: skip
        return {"r3": r3.id, "comparison": comp.id, "vb": vb.id, "vb_conversation": vb.conversation_id}


def board(an: Analytics) -> dict[tuple[str, int, str], dict]:
    records = an.query("select * from leaderboard", max_rows=1000, actor=LOCAL_OPERATOR).to_df().to_dict("records")
    return {(r["persona"], r["persona_version"], r["params"]): r for r in records}


def same(value: object, expected: float | None) -> bool:
    if expected is None:
        return value is None or (isinstance(value, float) and math.isnan(value))
    return value == pytest.approx(expected)


def test_leaderboard_numbers(store, tmp_path: Path) -> None:
    ids = build(store)
    an = Analytics(store, tmp_path / "analytics.duckdb")
    rows = board(an)
    assert set(rows) == {
        ("receptionist", 1, '{"temperature": 0.2}'),
        ("receptionist", 1, "{}"),
        ("receptionist", 2, "{}"),
        ("receptionist", 2, HOT),
    }
    warm = rows[("receptionist", 1, '{"temperature": 0.2}')]
    assert (warm["eval_runs"], warm["assertions"], warm["votes"], warm["comparisons"]) == (2, 6, 0, 0)
    assert same(warm["pass_rate"], 4 / 6) and same(warm["mean_similarity"], 0.6) and same(warm["mean_judge_score"], 4)
    # ttft over both runs' turns: 100, 300, 200 → median 200, p95 200 + 0.9 * 100
    assert same(warm["ttft_p50_ms"], 200) and same(warm["ttft_p95_ms"], 290)
    assert same(warm["tokens_per_s_mean"], 20) and same(warm["words_per_turn"], 4)

    plain2 = rows[("receptionist", 2, "{}")]
    assert (plain2["eval_runs"], plain2["assertions"], plain2["votes"], plain2["comparisons"]) == (1, 2, 0, 0)
    assert same(plain2["pass_rate"], 0.5) and same(plain2["mean_similarity"], None)
    assert same(plain2["mean_judge_score"], 2) and same(plain2["ttft_p50_ms"], None)

    hot = rows[("receptionist", 2, HOT)]
    assert (hot["eval_runs"], hot["assertions"], hot["votes"], hot["comparisons"]) == (1, 1, 1, 3)
    assert same(hot["pass_rate"], 0.0)

    plain1 = rows[("receptionist", 1, "{}")]
    assert (plain1["eval_runs"], plain1["assertions"], plain1["votes"], plain1["comparisons"]) == (0, 0, 2, 3)
    assert same(plain1["pass_rate"], None)
    # Only compared, never in a suite: its latency comes from its comparison conversation.
    assert same(plain1["ttft_p50_ms"], 400) and same(plain1["tokens_per_s_mean"], 10)
    assert same(plain1["words_per_turn"], 2)

    # Changes reach the snapshot: the production label, a run's status, a new vote, a deleted variant
    # conversation (cascade).
    set_production(store, "receptionist@2", actor=LOCAL_OPERATOR)
    rows = board(an)
    assert {k: r["production"] for k, r in rows.items()} == {
        ("receptionist", 1, '{"temperature": 0.2}'): False,
        ("receptionist", 1, "{}"): False,
        ("receptionist", 2, "{}"): True,
        ("receptionist", 2, HOT): True,
    }
    with store.session() as s:
        s.get(EvalRun, ids["r3"]).status = "failed"
        s.add(ComparisonVote(comparison_id=ids["comparison"], turn_index=3, variant_id=ids["vb"]))
    rows = board(an)
    assert (rows[("receptionist", 2, HOT)]["votes"], rows[("receptionist", 2, HOT)]["comparisons"]) == (2, 4)
    status = an.query(f"select status from raw.eval_runs where id = {ids['r3']}", actor=LOCAL_OPERATOR).rows
    assert status == [("failed",)]
    with store.session() as s:
        s.query(ComparisonVote).filter(ComparisonVote.variant_id == ids["vb"]).delete()
        s.query(ComparisonVariant).filter(ComparisonVariant.id == ids["vb"]).delete()
    rows = board(an)
    assert rows[("receptionist", 2, HOT)]["votes"] == 0 and rows[("receptionist", 2, HOT)]["comparisons"] == 0
    assert rows[("receptionist", 1, "{}")]["comparisons"] == 2


def test_callbot_sql_shows_the_leaderboard(cli) -> None:  # noqa: F811
    from callbot_core.store import Store

    cli("db", "upgrade")
    store = Store(cli.url)
    build(store)
    store.dispose()
    out = cli("sql", "select persona, persona_version, params, eval_runs, votes from leaderboard order by 2, 3",
              "--format", "json").stdout  # fmt: skip
    assert json.loads(out) == [
        {"persona": "receptionist", "persona_version": 1, "params": '{"temperature": 0.2}', "eval_runs": 2, "votes": 0},
        {"persona": "receptionist", "persona_version": 1, "params": "{}", "eval_runs": 0, "votes": 2},
        {"persona": "receptionist", "persona_version": 2, "params": HOT, "eval_runs": 1, "votes": 1},
        {"persona": "receptionist", "persona_version": 2, "params": "{}", "eval_runs": 1, "votes": 0},
    ]
