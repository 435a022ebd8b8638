"""Side-by-side comparisons on SQLite and PostgreSQL: one stored conversation per variant, the same
turn sent to all of them concurrently, votes, the blind reveal rule, and input that is refused."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import create_user
from callbot_core.backends.llm import ChatMessage, GenerationParams, Token, Usage
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import InvalidInput, NotFound
from callbot_core.experiments.comparisons import (
    Variant,
    get_comparison,
    list_comparisons,
    send_turn,
    start_comparison,
    vote,
    vote_tally,
)
from callbot_core.store.models import (
    AuditLog,
    Comparison,
    ComparisonVariant,
    ComparisonVote,
    Conversation,
    Message,
    TurnMetrics,
)
from tests.engine.scripted import Scripted
from tests.fake_ollama import FakeOllama

PW = "long-enough-1"


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama(reply=("We", " open", " at", " 8", ".")) as server:
        yield server


@pytest.fixture
def service(store, settings, fake: FakeOllama) -> ConversationService:
    backend = OllamaBackend(fake.url, default_model="smollm2:135m", connect_timeout_s=0.5, read_timeout_s=2)
    return ConversationService(store, settings, backends=lambda name: backend)


def _count(store, model) -> int:  # type: ignore[no-untyped-def]
    with store.session() as session:
        return session.scalar(select(func.count()).select_from(model))


def test_a_parallel_comparison_stores_one_conversation_per_variant(service, store, fake) -> None:
    rita = create_user(store, "rita", PW, role="researcher", actor=LOCAL_OPERATOR)
    info = start_comparison(
        service,
        [Variant("receptionist@1"), Variant("receptionist@1", {"temperature": 0.2, "seed": 7})],
        actor=rita,
        title="hours",
    )
    assert [v.label for v in info.variants] == ["A", "B"]
    assert info.variants[1].params == {"temperature": 0.2, "seed": 7}
    assert info.variants[1].describe() == "receptionist@1 · temperature=0.2 · seed=7"

    replies = send_turn(service, info.id, "  When do you open?  ", actor=LOCAL_OPERATOR)
    assert [r.label for r in replies] == ["A", "B"]
    for reply in replies:
        assert reply.error is None and reply.text == "We open at 8."
        assert reply.words == 4 and reply.completion_tokens == 5
        assert reply.ttft_ms is not None and reply.ttft_ms > 0
    send_turn(service, info.id, "And on Sundays?", actor=LOCAL_OPERATOR)

    with store.session() as session:
        conversations = session.scalars(
            select(Conversation)
            .join(ComparisonVariant, ComparisonVariant.conversation_id == Conversation.id)
            .where(ComparisonVariant.comparison_id == info.id)
        ).all()
        assert len(conversations) == 2 and {c.channel for c in conversations} == {"text"}
        assert {c.user_id for c in conversations} == {rita.id}
        for conversation in conversations:
            asked = session.scalars(
                select(Message.text)
                .where(Message.conversation_id == conversation.id, Message.role == "user")
                .order_by(Message.id)
            ).all()
            assert asked == ["When do you open?", "And on Sundays?"]
        audit = session.scalars(select(AuditLog).where(AuditLog.action == "comparison.start")).one()
        assert audit.actor == "rita" and audit.target == f"comparison#{info.id}"
    # The override reached the backend for B only; A kept the persona's own temperature.
    temperatures = sorted(r.body["options"]["temperature"] for r in fake.chat_requests[:2])
    assert 0.2 in temperatures and len(set(temperatures)) == 2

    detail = get_comparison(store, info.id)
    assert [t.user_text for t in detail.turns] == ["When do you open?", "And on Sundays?"]
    assert all(r is not None and r.text == "We open at 8." for t in detail.turns for r in t.replies)
    assert [(v.persona_key, v.persona_version) for v in detail.variants] == [("receptionist", 1)] * 2
    assert list_comparisons(store)[0].id == info.id and list_comparisons(store)[0].variants == 2


class _BarrierBackend(Scripted):
    """A backend whose streams only go on once every variant is streaming: proof they run side by side."""

    name = "barrier"
    where = "memory"
    default_model = "barrier"

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)

    def stream(self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None):  # type: ignore[no-untyped-def]
        self.barrier.wait()  # raises BrokenBarrierError (a failed turn) if the variants ran one by one
        yield Token("Side")
        yield Token(" by side", usage=Usage(completion_tokens=2))


def test_variants_on_a_remote_backend_really_run_in_parallel(store, settings) -> None:
    backend = _BarrierBackend(3)
    service = ConversationService(store, settings, backends=lambda name: backend)
    info = start_comparison(
        service, [Variant("receptionist"), Variant("support"), Variant("assistant")], actor=LOCAL_OPERATOR
    )
    replies = send_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR)
    assert [r.error for r in replies] == [None, None, None]
    assert [r.text for r in replies] == ["Side by side"] * 3


def test_a_failing_variant_does_not_fail_the_others(store, settings, fake) -> None:
    good = OllamaBackend(fake.url, default_model="smollm2:135m", connect_timeout_s=0.5, read_timeout_s=2)
    with FakeOllama(mode="error500") as broken_server:
        broken = OllamaBackend(broken_server.url, default_model="smollm2:135m", connect_timeout_s=0.5)
        service = ConversationService(store, settings, backends=lambda name: broken if name == "broken" else good)
        info = start_comparison(service, [Variant("receptionist"), Variant("support")], actor=LOCAL_OPERATOR)
        with store.session() as session:  # point B at the broken server
            row = session.get(Conversation, info.variants[1].conversation_id)
            assert row is not None
            row.backend = "broken"
        replies = send_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR)
    assert replies[0].error is None and replies[0].text
    assert replies[1].error and "500" in replies[1].error and replies[1].text == ""
    detail = get_comparison(store, info.id)
    assert detail.turns[0].replies[1] is not None and detail.turns[0].replies[1].error
    with pytest.raises(InvalidInput, match="failed"):
        vote(store, info.id, 0, info.variants[1].id, actor=LOCAL_OPERATOR)


def test_votes_are_stored_overwritten_and_checked(service, store) -> None:
    rita = create_user(store, "rita", PW, role="researcher", actor=LOCAL_OPERATOR)
    admin = create_user(store, "ada", PW, role="admin", actor=LOCAL_OPERATOR)
    info = start_comparison(service, [Variant("receptionist@1"), Variant("support")], actor=LOCAL_OPERATOR)
    other = start_comparison(service, [Variant("receptionist@1"), Variant("support")], actor=LOCAL_OPERATOR)
    a, b = info.variants
    send_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR)

    vote(store, info.id, 0, a.id, actor=rita)
    vote(store, info.id, 0, b.id, actor=rita)  # changes her mind: replaces, does not add
    vote(store, info.id, 0, b.id, actor=admin)
    with store.session() as session:
        stored = session.execute(select(ComparisonVote.voter_id, ComparisonVote.variant_id)).all()
        assert sorted(stored) == sorted([(rita.id, b.id), (admin.id, b.id)])
        assert session.scalar(select(func.count()).where(AuditLog.action == "comparison.vote")) == 3
    assert vote_tally(store, info.id) == {"A": 0, "B": 2}
    assert get_comparison(store, info.id).tally() == {a.id: 0, b.id: 2}

    with pytest.raises(InvalidInput, match="not part of comparison"):
        vote(store, info.id, 0, other.variants[0].id, actor=rita)
    with pytest.raises(InvalidInput, match="no turn 1"):
        vote(store, info.id, 1, a.id, actor=rita)
    with pytest.raises(InvalidInput, match="no turn -1"):
        vote(store, info.id, -1, a.id, actor=rita)
    with pytest.raises(NotFound):
        vote(store, 999_999, 0, a.id, actor=rita)
    assert _count(store, ComparisonVote) == 2


def test_blind_comparisons_reveal_identities_only_after_the_vote(service, store) -> None:
    rita = create_user(store, "rita", PW, role="researcher", actor=LOCAL_OPERATOR)
    vic = create_user(store, "vic", PW, role="researcher", actor=LOCAL_OPERATOR)
    info = start_comparison(service, [Variant("receptionist"), Variant("support")], blind=True, actor=rita)
    send_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR)
    send_turn(service, info.id, "Anyone there?", actor=LOCAL_OPERATOR)
    detail = get_comparison(store, info.id)
    assert detail.blind and not detail.reveal(0, rita.id) and not detail.reveal(1, rita.id)

    vote(store, info.id, 0, info.variants[1].id, actor=rita)
    detail = get_comparison(store, info.id)
    assert detail.reveal(0, rita.id)
    assert not detail.reveal(1, rita.id), "a vote reveals only the turn it was given on"
    assert not detail.reveal(0, vic.id), "one voter's vote reveals nothing to another"

    open_info = start_comparison(service, [Variant("receptionist"), Variant("support")], actor=LOCAL_OPERATOR)
    send_turn(service, open_info.id, "Hello?", actor=LOCAL_OPERATOR)
    assert get_comparison(store, open_info.id).reveal(0, vic.id)


@pytest.mark.parametrize("n", [0, 1, 5])
def test_a_comparison_needs_two_to_four_variants(service, store, n: int) -> None:
    with pytest.raises(InvalidInput, match="2 to 4 variants"):
        start_comparison(service, [Variant("receptionist")] * n, actor=LOCAL_OPERATOR)
    assert _count(store, Comparison) == 0 and _count(store, Conversation) == 0


@pytest.mark.parametrize(
    ("params", "match"),
    [
        ({"temperature": 3}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": 2.5}, "max_tokens"),
        ({"seed": -1}, "seed"),
        ({"temperature": True}, "temperature"),
        ({"stop": ["x"]}, "Unknown variant parameter"),
    ],
)
def test_bad_parameters_or_personas_store_nothing(service, store, params: dict, match: str) -> None:
    with pytest.raises(InvalidInput, match=match):
        start_comparison(service, [Variant("receptionist"), Variant("receptionist", params)], actor=LOCAL_OPERATOR)
    with pytest.raises(NotFound, match="nobody"):
        start_comparison(service, [Variant("receptionist"), Variant("nobody@1")], actor=LOCAL_OPERATOR)
    assert _count(store, Comparison) == 0 and _count(store, Conversation) == 0


@pytest.mark.parametrize("text", ["", "   \n ", None])
def test_an_empty_turn_stores_nothing_anywhere(service, store, fake, text: object) -> None:
    info = start_comparison(
        service, [Variant("receptionist"), Variant("support"), Variant("assistant")], actor=LOCAL_OPERATOR
    )
    before = (_count(store, Message), _count(store, TurnMetrics))
    with pytest.raises(InvalidInput):
        send_turn(service, info.id, text, actor=LOCAL_OPERATOR)
    assert (_count(store, Message), _count(store, TurnMetrics)) == before
    assert fake.chat_requests == []


def test_a_comparison_on_the_embedded_model(store, settings, embedded) -> None:
    service = ConversationService(store, settings, backends=lambda name: embedded)
    info = start_comparison(
        service,
        [Variant("receptionist@1", {"max_tokens": 6, "seed": 1}), Variant("receptionist@1", {"max_tokens": 6})],
        blind=True,
        actor=LOCAL_OPERATOR,
    )
    replies = send_turn(service, info.id, "What are your opening hours?", actor=LOCAL_OPERATOR)
    for reply in replies:
        assert reply.error is None and reply.text, reply
        assert reply.completion_tokens is not None and 1 <= reply.completion_tokens <= 6
        # Run one after another on the model lock, so a TTFT is this variant's own, not a wait for the other.
        assert reply.ttft_ms is not None and reply.ttft_ms < 30_000
    detail = get_comparison(store, info.id)
    assert len(detail.turns) == 1 and all(r is not None and r.text for r in detail.turns[0].replies)
