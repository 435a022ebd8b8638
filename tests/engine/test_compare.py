"""Side-by-side comparisons on SQLite and PostgreSQL: one stored conversation per variant, the same
turn sent to all of them concurrently (one after another on a serial backend), votes, the blind reveal rule and
shuffled columns, streaming, and input that is refused."""

from __future__ import annotations

import random
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
    stream_turn,
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


# -- blind order, serial backends, streaming, identical variants (issue 11) ---------------------------------


def _setup_order(info) -> tuple[int, ...]:  # type: ignore[no-untyped-def]
    """Which variant, by the order it was set up in, each column (A, B, …) shows."""
    return tuple(v.setup_position for v in info.variants)


def test_blind_comparisons_shuffle_their_columns_and_keep_the_order(service, store) -> None:
    temps = (0.1, 0.2, 0.3)
    variants = [Variant("receptionist@1", {"temperature": t}) for t in temps]
    orders = set()
    for _ in range(12):  # the app's own shuffle: 6 orders, all 12 alike by chance ~ 3e-9
        info = start_comparison(service, variants, blind=True, actor=LOCAL_OPERATOR)
        assert [v.label for v in info.variants] == ["A", "B", "C"]
        assert sorted(_setup_order(info)) == [0, 1, 2]
        # Each column is the variant set up at its setup_position: the shuffle moves whole variants.
        assert [v.params["temperature"] for v in info.variants] == [temps[i] for i in _setup_order(info)]
        orders.add(_setup_order(info))
        # Stored: reading it back (twice, after a turn) gives the same columns.
        send_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR)
        for _ in range(2):
            again = get_comparison(store, info.id)
            assert [(v.id, v.label, v.setup_position, v.params) for v in again.variants] == [
                (v.id, v.label, v.setup_position, v.params) for v in info.variants
            ]
    assert len(orders) > 1, "Variant A was the same set-up variant in every blind comparison"

    # A seeded generator gives the same sequence of orders again, and over 20 comparisons both orders of two.
    def orders_with(seed: int) -> list[tuple[int, ...]]:
        rng = random.Random(seed)
        pair = [Variant("receptionist@1"), Variant("support@1")]
        return [
            _setup_order(start_comparison(service, pair, blind=True, actor=LOCAL_OPERATOR, rng=rng)) for _ in range(20)
        ]

    seeded = orders_with(11)
    assert seeded == orders_with(11) and set(seeded) == {(0, 1), (1, 0)}


def test_open_comparisons_keep_the_order_they_were_set_up_in(service) -> None:
    rng = random.Random(3)
    for _ in range(6):
        info = start_comparison(
            service, [Variant("receptionist@1"), Variant("support@1")], actor=LOCAL_OPERATOR, rng=rng
        )
        assert _setup_order(info) == (0, 1) and [v.persona_key for v in info.variants] == ["receptionist", "support"]


def test_a_blind_comparison_names_its_own_columns(service, store) -> None:
    with pytest.raises(InvalidInput, match="blind"):
        start_comparison(
            service, [Variant("receptionist", label="old"), Variant("support", label="new")], blind=True,
            actor=LOCAL_OPERATOR,
        )  # fmt: skip
    assert _count(store, Comparison) == 0 and _count(store, Conversation) == 0


class _SerialRecorder(Scripted):
    """A backend that, like the embedded model, says it runs one request at a time, and records whether two
    requests ever overlapped: each stream waits a little for a second one to arrive, so an overlap is seen."""

    name = "serial-recorder"
    where = "memory"
    default_model = "serial-1"
    serial = True

    def __init__(self) -> None:
        super().__init__()
        self.active = 0
        self.overlaps = 0
        self.temperatures: list[float] = []
        self._cond = threading.Condition()

    def stream(self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None):  # type: ignore[no-untyped-def]
        with self._cond:
            self.active += 1
            self.temperatures.append(params.temperature)
            self._cond.notify_all()
            # Waits for another request (an overlap) up to 0.2 s; alone, it just goes on.
            self._cond.wait_for(lambda: self.active > 1, timeout=0.2)
            if self.active > 1:
                self.overlaps += 1
        try:
            yield Token("One")
            yield Token(" at", usage=None)
            yield Token(" a time", usage=Usage(completion_tokens=3))
        finally:
            with self._cond:
                self.active -= 1


def test_variants_on_a_serial_backend_run_one_after_another_in_column_order(store, settings) -> None:
    backend = _SerialRecorder()
    service = ConversationService(store, settings, backends=lambda name: backend)
    variants = [Variant("receptionist@1", {"temperature": t}) for t in (0.1, 0.2, 0.3)]
    info = start_comparison(service, variants, blind=True, actor=LOCAL_OPERATOR, rng=random.Random(1))
    assert _setup_order(info) != (0, 1, 2), "pick a seed that shuffles"
    shown = [v.params["temperature"] for v in info.variants]

    with stream_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR) as run:
        assert run.serial and run.user_text == "Hello?"
        assert [v.id for v in run.variants] == [v.id for v in info.variants]
        events = list(run)
    assert backend.overlaps == 0 and backend.temperatures == shown
    # Streamed one column at a time, in column order: each variant's pieces, then its stored reply.
    order = [e.variant_id for e in events]
    assert order == sorted(order, key=[v.id for v in info.variants].index)
    assert "".join(e.piece for e in events if e.variant_id == info.variants[0].id) == "One at a time"
    done = [e.reply for e in events if e.reply is not None]
    assert [r.variant_id for r in done] == [v.id for v in info.variants]
    assert [r.text for r in run.replies] == ["One at a time"] * 3 and all(r.error is None for r in run.replies)

    # send_turn runs the same way.
    send_turn(service, info.id, "Again?", actor=LOCAL_OPERATOR)
    assert backend.overlaps == 0 and backend.temperatures == shown * 2


def test_variants_on_a_concurrent_backend_stream_side_by_side(store, settings) -> None:
    backend = _BarrierBackend(2)
    service = ConversationService(store, settings, backends=lambda name: backend)
    info = start_comparison(service, [Variant("receptionist"), Variant("support")], actor=LOCAL_OPERATOR)
    with stream_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR) as run:
        assert not run.serial
        events = list(run)
    for variant in info.variants:
        assert "".join(e.piece for e in events if e.variant_id == variant.id) == "Side by side"
    assert [r.text for r in run.replies] == ["Side by side"] * 2


def test_a_comparison_turn_left_mid_stream_stores_every_variant_as_interrupted(store, settings) -> None:
    backend = _SerialRecorder()
    service = ConversationService(store, settings, backends=lambda name: backend)
    info = start_comparison(
        service, [Variant("receptionist"), Variant("support"), Variant("assistant")], actor=LOCAL_OPERATOR
    )
    with stream_turn(service, info.id, "Hello?", actor=LOCAL_OPERATOR) as run:
        first = next(iter(run))
        assert first.variant_id == info.variants[0].id and first.piece == "One"
    # Every variant has its turn (aligned by index): the caller's words kept, the turn marked interrupted.
    detail = get_comparison(store, info.id)
    assert [t.user_text for t in detail.turns] == ["Hello?"]
    replies = detail.turns[0].replies
    assert all(r is not None and r.error and "interrupted" in r.error for r in replies), replies
    assert backend.temperatures == [0.5], "the variants after the first never reached the model"


@pytest.mark.parametrize(
    "variants",
    [
        [Variant("receptionist"), Variant("receptionist@1")],  # the latest version is version 1
        [Variant("receptionist@1", {"temperature": 0.5}), Variant("receptionist@1")],  # 0.5 is its own
        [Variant("support"), Variant("receptionist", {"seed": 3}), Variant("receptionist@1", {"seed": 3})],
    ],
)
def test_identical_variants_are_refused_and_nothing_is_stored(service, store, fake, variants) -> None:
    audits = _count(store, AuditLog)
    with pytest.raises(InvalidInput, match=r"Variants \d and \d are the same") as refused:
        start_comparison(service, variants, blind=True, actor=LOCAL_OPERATOR, backend="ollama")
    assert "receptionist@1" in str(refused.value)
    assert _count(store, Comparison) == 0 and _count(store, Conversation) == 0
    assert _count(store, AuditLog) == audits and fake.chat_requests == []


def test_ending_a_comparison_ends_its_conversations_even_without_turns(service, store) -> None:
    from callbot_core.access.permissions import OperatorActor
    from callbot_core.errors import PermissionDenied
    from callbot_core.experiments.comparisons import end_comparison

    info = start_comparison(service, [Variant("receptionist@1"), Variant("tutor@1")], actor=LOCAL_OPERATOR)

    def statuses() -> list[str]:
        with store.session() as session:
            return sorted(
                session.scalars(
                    select(Conversation.status)
                    .join(ComparisonVariant, ComparisonVariant.conversation_id == Conversation.id)
                    .where(ComparisonVariant.comparison_id == info.id)
                )
            )

    assert statuses() == ["active", "active"]
    with pytest.raises(PermissionDenied):
        end_comparison(store, info.id, actor=OperatorActor(username="vera", role="viewer"))
    assert end_comparison(store, info.id, actor=LOCAL_OPERATOR) == 2
    assert statuses() == ["ended", "ended"]
    assert end_comparison(store, info.id, actor=LOCAL_OPERATOR) == 0  # ending twice is harmless
    with pytest.raises(NotFound):
        end_comparison(store, info.id + 999, actor=LOCAL_OPERATOR)


def test_a_comparison_left_without_a_turn_is_ended_after_an_hour(service, store) -> None:
    from datetime import timedelta

    from callbot_core.experiments.comparisons import ABANDONED_AFTER, end_abandoned, list_comparisons
    from callbot_core.store.models import utcnow

    silent = start_comparison(service, [Variant("receptionist@1"), Variant("tutor@1")], actor=LOCAL_OPERATOR)
    spoken = start_comparison(service, [Variant("receptionist@1"), Variant("tutor@1")], actor=LOCAL_OPERATOR)
    send_turn(service, spoken.id, "Hello?", actor=LOCAL_OPERATOR)

    def statuses(info) -> set[str]:  # type: ignore[no-untyped-def]
        with store.session() as session:
            ids = [v.conversation_id for v in info.variants]
            return set(session.scalars(select(Conversation.status).where(Conversation.id.in_(ids))))

    assert end_abandoned(store) == 0 and statuses(silent) == {"active"}  # just started: not abandoned yet
    later = utcnow() + ABANDONED_AFTER + timedelta(minutes=1)
    assert end_abandoned(store, now=later) == 2
    assert statuses(silent) == {"ended"} and statuses(spoken) == {"active"}  # one that was spoken to stays
    list_comparisons(store)  # listing runs the sweep too (nothing left to end)
    assert statuses(spoken) == {"active"}
