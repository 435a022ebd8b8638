"""Permissions on the turn path, checked in the engine on SQLite and PostgreSQL: a viewer may not chat, compare,
vote, run suites or simulate calls, and nothing is stored when refused; a researcher may, and what they do is
attributed to them. A fast backend registered through the real registry stands in for the model."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import UserInfo, create_user
from callbot_core.errors import PermissionDenied
from callbot_core.experiments.comparisons import Variant, send_turn, start_comparison, vote
from callbot_core.experiments.evals import parse_suite, run_suite
from callbot_core.experiments.simulated import CallerPersona, simulate_call
from callbot_core.store.models import (
    Comparison,
    ComparisonVote,
    Conversation,
    EvalRun,
    Message,
    TurnMetrics,
    TurnStage,
)

PW = "long-enough-1"
SUITE = parse_suite("name: perms\nturns:\n  - say: When do you open?\n    expect:\n      - max_words: 40\n")
TABLES = (Conversation, Message, TurnMetrics, TurnStage, Comparison, ComparisonVote, EvalRun)


@pytest.fixture
def vera(store) -> UserInfo:
    return create_user(store, "vera", PW, role="viewer", actor=LOCAL_OPERATOR)


@pytest.fixture
def rita(store) -> UserInfo:
    return create_user(store, "rita", PW, role="researcher", actor=LOCAL_OPERATOR)


def _counts(store) -> dict[str, int]:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return {t.__tablename__: session.scalar(select(func.count()).select_from(t)) for t in TABLES}


def test_a_viewer_may_not_chat_and_nothing_is_stored(service, store, vera, rita, backend) -> None:
    before = _counts(store)
    with pytest.raises(PermissionDenied, match=r"vera \(viewer\) may not chat"):
        service.start("receptionist", actor=vera)
    assert _counts(store) == before

    info = service.start("receptionist", actor=rita)
    before = _counts(store)
    with pytest.raises(PermissionDenied, match="may not chat"):
        service.send(info.id, "When do you open?", actor=vera)
    with pytest.raises(PermissionDenied, match="Sign in first"):
        service.send(info.id, "When do you open?", actor=None)  # type: ignore[arg-type]
    with pytest.raises(PermissionDenied, match="may not chat"):
        simulate_call(service, "receptionist@1", CallerPersona(goal="hours", turns=1), actor=vera)
    with pytest.raises(PermissionDenied, match="may not chat"):
        service.end(info.id, actor=vera)
    with pytest.raises(PermissionDenied, match="may not chat"):
        service.summarise(info.id, actor=vera)
    assert _counts(store) == before and backend.requests == []
    with store.session() as session:
        ended = session.get(Conversation, info.id)
        assert (ended.status, ended.summary_short) == ("active", None)


def test_forgetting_the_actor_fails_loudly(service, rita) -> None:
    with pytest.raises(TypeError, match="actor"):
        service.start("receptionist")  # type: ignore[call-arg]
    info = service.start("receptionist", actor=rita)
    with pytest.raises(TypeError, match="actor"):
        service.send(info.id, "hi")  # type: ignore[call-arg]
    with pytest.raises(TypeError, match="actor"):
        run_suite(service, SUITE, ["receptionist@1"])  # type: ignore[call-arg]


def test_a_viewer_may_not_compare_vote_or_run_suites(service, store, vera, rita, backend) -> None:
    before = _counts(store)
    with pytest.raises(PermissionDenied, match="may not compare"):
        start_comparison(service, [Variant("receptionist"), Variant("support")], actor=vera)
    with pytest.raises(PermissionDenied, match="may not run scenario suites"):
        run_suite(service, SUITE, ["receptionist@1"], actor=vera)
    assert _counts(store) == before

    info = start_comparison(service, [Variant("receptionist"), Variant("support")], actor=rita)
    send_turn(service, info.id, "When do you open?", actor=rita)
    before = _counts(store)
    requests = len(backend.requests)
    with pytest.raises(PermissionDenied, match="may not compare"):
        send_turn(service, info.id, "And on Sundays?", actor=vera)
    with pytest.raises(PermissionDenied, match="may not compare"):
        vote(store, info.id, 0, info.variants[0].id, actor=vera)
    assert _counts(store) == before and len(backend.requests) == requests


def test_a_researcher_may_do_all_of_it_and_is_credited(service, store, rita) -> None:
    info = service.start("receptionist", actor=rita)
    assert service.send(info.id, "When do you open?", actor=rita).text() == "We open at 8."

    comparison = start_comparison(service, [Variant("receptionist"), Variant("support")], actor=rita)
    replies = send_turn(service, comparison.id, "When do you open?", actor=rita)
    assert [r.error for r in replies] == [None, None]
    vote(store, comparison.id, 0, comparison.variants[1].id, actor=rita)

    batch = run_suite(service, SUITE, ["receptionist@1"], actor=rita, concurrency=1)
    assert [c.status for c in batch.cells] == ["passed"]
    call = simulate_call(
        service, "receptionist@1", CallerPersona(goal="hours", turns=1, opening="When do you open?"), actor=rita
    )
    assert call.error is None and len(call.turns) == 1

    with store.session() as session:
        assert session.get(Conversation, info.id).user_id == rita.id  # type: ignore[union-attr]
        assert session.get(Conversation, call.conversation_id).user_id == rita.id  # type: ignore[union-attr]
        assert session.get(Comparison, comparison.id).created_by == rita.id  # type: ignore[union-attr]
        assert session.scalars(select(ComparisonVote.voter_id)).all() == [rita.id]
        assert session.scalars(select(EvalRun.created_by)).all() == ["rita"]
        # The suite's conversation is the researcher's too.
        run_conversation = session.scalar(select(EvalRun.conversation_id))
        assert session.get(Conversation, run_conversation).user_id == rita.id  # type: ignore[union-attr]


def test_the_local_operator_acts_without_a_user(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    service.send(info.id, "hi", actor=LOCAL_OPERATOR).text()
    with store.session() as session:
        assert session.get(Conversation, info.id).user_id is None  # type: ignore[union-attr]


def test_only_its_owner_or_an_admin_may_change_a_conversation(service, store, rita) -> None:
    rob = create_user(store, "rob", PW, role="researcher", actor=LOCAL_OPERATOR)
    ada = create_user(store, "ada", PW, role="admin", actor=LOCAL_OPERATOR)
    info = service.start("receptionist", actor=rita)
    before = _counts(store)
    with pytest.raises(PermissionDenied, match=rf"rob \(researcher\) may not change conversation {info.id}"):
        service.send(info.id, "When do you open?", actor=rob)
    with pytest.raises(PermissionDenied, match="only the user who started it or an admin"):
        service.end(info.id, actor=rob)
    with pytest.raises(PermissionDenied, match="may not change"):
        service.summarise(info.id, actor=rob)
    assert _counts(store) == before
    with store.session() as session:
        assert session.get(Conversation, info.id).status == "active"  # not ended by the refused call

    with service.send(info.id, "When do you open?", actor=rita) as turn:
        assert turn.text()
    with service.send(info.id, "And on Saturdays?", actor=ada) as turn:  # an admin may step in
        assert turn.text()
    service.end(info.id, actor=ada)
    with store.session() as session:
        assert session.get(Conversation, info.id).status == "ended"
