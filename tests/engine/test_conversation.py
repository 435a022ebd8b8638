"""The conversation service on SQLite and PostgreSQL: real turns with the embedded model, failures
through an Ollama-protocol server that stalls, errors or is down, and bad input that stores nothing."""

from __future__ import annotations

import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm import GenerationParams
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.conversations.service import ConversationService
from callbot_core.conversations.transcripts import get_conversation, list_conversations, search
from callbot_core.errors import (
    BackendResponseError,
    BackendTimeout,
    BackendUnavailable,
    Conflict,
    InvalidInput,
    NotFound,
)
from callbot_core.store.models import Conversation, Message, TurnMetrics
from tests.fake_ollama import FakeOllama, down_url

TINY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=8, seed=42)


def _counts(store) -> tuple[int, int, int]:
    with store.session() as session:
        return (
            session.scalar(select(func.count()).select_from(Conversation)),
            session.scalar(select(func.count()).select_from(Message)),
            session.scalar(select(func.count()).select_from(TurnMetrics)),
        )


@pytest.fixture
def service(store, settings, embedded) -> ConversationService:
    return ConversationService(store, settings, backends=lambda name: embedded)


def _ollama_service(store, settings, url: str, read_timeout_s: float = 0.5) -> ConversationService:
    backend = OllamaBackend(url, default_model="smollm2:135m", connect_timeout_s=0.5, read_timeout_s=read_timeout_s)
    return ConversationService(store, settings, backends=lambda name: backend)


def test_a_turn_streams_and_is_stored_with_its_metrics(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    assert info.greeting.startswith("Good morning")
    turn = service.send(info.id, "What are your opening hours?", params=TINY, actor=LOCAL_OPERATOR)
    pieces = list(turn)
    assert len(pieces) >= 2, "the reply should arrive token by token"
    result = turn.result
    assert result is not None and result.error is None
    assert result.text == "".join(pieces).strip()
    assert result.ttft_ms is not None and 0 < result.ttft_ms <= result.total_ms
    assert result.completion_tokens == len(pieces)
    assert result.prompt_tokens and result.prompt_tokens > 20  # system prompt + greeting + question
    assert result.tokens_per_s and result.tokens_per_s > 0

    detail = get_conversation(store, info.id)
    assert [m.role for m in detail.messages] == ["assistant", "user", "assistant"]
    bot = detail.messages[-1]
    assert bot.text == result.text and bot.ttft_ms == pytest.approx(result.ttft_ms)
    assert bot.completion_tokens == result.completion_tokens
    assert detail.messages[1].token_count and detail.messages[1].token_count > 3
    row = list_conversations(store)[0]
    assert row.turns == 1 and row.failed_turns == 0 and row.mean_ttft_ms == pytest.approx(result.ttft_ms)


def test_history_is_sent_with_each_turn(service, store) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    service.send(info.id, "My name is Zebulon.", params=TINY, actor=LOCAL_OPERATOR).text()
    turn = service.send(info.id, "What is my name?", params=TINY, actor=LOCAL_OPERATOR)
    sent = [m.content for m in turn.turn.messages]
    assert sent[0].startswith("You are a helpful assistant")
    assert "My name is Zebulon." in sent and sent[-1] == "What is my name?"
    turn.text()
    assert get_conversation(store, info.id).row.turns == 2


def test_same_seed_gives_the_same_reply(service) -> None:
    a = service.start("assistant", actor=LOCAL_OPERATOR)
    b = service.start("assistant", actor=LOCAL_OPERATOR)
    assert (
        service.send(a.id, "Say hello.", params=TINY, actor=LOCAL_OPERATOR).text()
        == service.send(b.id, "Say hello.", params=TINY, actor=LOCAL_OPERATOR).text()
    )


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("   \n\t ", "empty"),
        ("x" * 8001, "too long: 8,001 characters, the limit is 8,000"),
        (None, "must be text, not NoneType"),
        (42, "must be text, not int"),
    ],
)
def test_bad_messages_are_refused_and_nothing_is_stored(service, store, text, message) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    before = _counts(store)
    with pytest.raises(InvalidInput, match=message):
        service.send(info.id, text, actor=LOCAL_OPERATOR)
    assert _counts(store) == before


def test_message_limit_is_configurable(store, settings, embedded) -> None:
    settings = settings.model_copy(update={"max_message_chars": 10})
    service = ConversationService(store, settings, backends=lambda name: embedded)
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match="limit is 10"):
        service.send(info.id, "eleven chars", actor=LOCAL_OPERATOR)


def test_unknown_ids_are_clear_errors(service, store) -> None:
    with pytest.raises(NotFound, match="Unknown persona 'ghost'"):
        service.start("ghost", actor=LOCAL_OPERATOR)
    with pytest.raises(NotFound, match="Unknown conversation id 999"):
        service.send(999, "hello", actor=LOCAL_OPERATOR)
    with pytest.raises(InvalidInput, match="whole number"):
        service.send("abc", "hello", actor=LOCAL_OPERATOR)  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="Channel 'fax'"):
        service.start("assistant", channel="fax", actor=LOCAL_OPERATOR)
    assert _counts(store) == (0, 0, 0)


def test_control_characters_are_removed(service, store) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    service.send(info.id, "Hi\x00 there\x1b", params=TINY, actor=LOCAL_OPERATOR).text()
    assert get_conversation(store, info.id).messages[1].text == "Hi there"


def test_an_ended_conversation_takes_no_more_turns(service, store) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    summaries = service.end(info.id, actor=LOCAL_OPERATOR)
    assert summaries.short == summaries.full  # no caller turns: nothing for the model to summarise
    with pytest.raises(Conflict, match="has ended"):
        service.send(info.id, "hello?", actor=LOCAL_OPERATOR)


def test_end_writes_and_stores_both_summaries(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    service.send(info.id, "Can I book an appointment for Tuesday?", params=TINY, actor=LOCAL_OPERATOR).text()
    summaries = service.end(info.id, actor=LOCAL_OPERATOR)
    assert summaries.short and summaries.full
    detail = get_conversation(store, info.id)
    assert detail.row.status == "ended" and detail.row.ended_at is not None
    assert detail.row.summary_short == summaries.short
    assert detail.summary_full == summaries.full


def test_backend_down_stores_a_failed_turn_and_no_reply(store, settings) -> None:
    url = down_url()
    service = _ollama_service(store, settings, url)
    info = service.start("assistant", model="smollm2:135m", actor=LOCAL_OPERATOR)
    turn = service.send(info.id, "Hello?", actor=LOCAL_OPERATOR)
    with pytest.raises(BackendUnavailable, match=f"Ollama at {url} is not reachable"):
        list(turn)
    _assert_failed_turn(store, info.id, "not reachable")


def test_backend_error_500_stores_a_failed_turn(store, settings) -> None:
    with FakeOllama(mode="error500") as fake:
        service = _ollama_service(store, settings, fake.url)
        info = service.start("assistant", actor=LOCAL_OPERATOR)
        with pytest.raises(BackendResponseError, match="500"):
            service.send(info.id, "Hello?", actor=LOCAL_OPERATOR).text()
    _assert_failed_turn(store, info.id, "500")


def test_backend_stalling_mid_stream_keeps_no_half_reply(store, settings) -> None:
    with FakeOllama(mode="stall", reply=("One", " two", " three"), chunks_before_trouble=2) as fake:
        service = _ollama_service(store, settings, fake.url, read_timeout_s=0.5)
        info = service.start("assistant", actor=LOCAL_OPERATOR)
        turn = service.send(info.id, "Count please", actor=LOCAL_OPERATOR)
        got: list[str] = []
        with pytest.raises(BackendTimeout, match=fake.url):
            for piece in turn:
                got.append(piece)
    assert got == ["One", " two"]
    result = _assert_failed_turn(store, info.id, "timeout")
    assert result.ttft_ms is not None  # the first token did arrive: its time is kept with the error


def test_a_failed_turn_is_left_out_of_later_history(store, settings) -> None:
    with FakeOllama(mode="error500") as fake:
        service = _ollama_service(store, settings, fake.url)
        info = service.start("assistant", actor=LOCAL_OPERATOR)
        with pytest.raises(BackendResponseError):
            service.send(info.id, "first try", actor=LOCAL_OPERATOR).text()
        fake.mode = "normal"
        turn = service.send(info.id, "second try", actor=LOCAL_OPERATOR)
        assert turn.text() == "Hello there!"
    sent = fake.chat_requests[-1].body["messages"]
    assert [m["content"] for m in sent if m["role"] == "user"] == ["second try"]
    row = list_conversations(store)[0]
    assert row.turns == 1 and row.failed_turns == 1


def test_ollama_timings_are_kept(store, settings) -> None:
    with FakeOllama() as fake:
        service = _ollama_service(store, settings, fake.url)
        info = service.start("assistant", actor=LOCAL_OPERATOR)
        service.send(info.id, "hi", actor=LOCAL_OPERATOR).text()
    with store.session() as session:
        tm = session.scalars(select(TurnMetrics)).one()
    assert tm.backend == "ollama" and tm.model == "smollm2:135m"
    assert tm.backend_eval_ms and tm.backend_prompt_eval_ms and tm.backend_total_ms
    assert tm.completion_tokens is not None and tm.error is None


def test_abandoning_a_stream_records_an_interrupted_turn(service, store) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    turn = service.send(
        info.id, "Tell me a long story.", params=GenerationParams(max_tokens=64, seed=1), actor=LOCAL_OPERATOR
    )
    stream = iter(turn)
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert turn.result is not None and "interrupted" in (turn.result.error or "")
    _assert_failed_turn(store, info.id, "interrupted")


def _assert_failed_turn(store, conversation_id: int, error_part: str):
    detail = get_conversation(store, conversation_id)
    roles = [m.role for m in detail.messages]
    assert roles.count("user") == 1
    assert roles.count("assistant") == 1  # only the greeting: the failure is not stored as a bot message
    user = next(m for m in detail.messages if m.role == "user")
    assert user.error and error_part.lower() in user.error.lower()
    with store.session() as session:
        tm = session.scalars(select(TurnMetrics).where(TurnMetrics.conversation_id == conversation_id)).one()
        assert tm.assistant_message_id is None and tm.error == user.error
    return tm


def test_search_finds_messages_and_summaries(service, store) -> None:
    info = service.start("receptionist", actor=LOCAL_OPERATOR)
    service.send(info.id, "I need to reschedule my dentist appointment", params=TINY, actor=LOCAL_OPERATOR).text()
    with store.session() as session:
        conv = session.get(Conversation, info.id)
        conv.summary_short = "The caller rescheduled a dentist visit."
    hits = search(store, "dentist")
    sources = {(h.conversation_id, h.source) for h in hits}
    assert (info.id, "message") in sources and (info.id, "summary") in sources
    assert any("dentist" in h.snippet.lower() for h in hits)
    assert search(store, "zyzzyva") == []
    with pytest.raises(InvalidInput, match="empty"):
        search(store, "  ")


def test_search_semantics_per_engine(service, store) -> None:
    info = service.start("assistant", actor=LOCAL_OPERATOR)
    service.send(info.id, "The appointments were 100% cancelled", params=TINY, actor=LOCAL_OPERATOR).text()
    if store.dialect == "sqlite":
        # Substring search: LIKE wildcards typed by a user are literal characters.
        assert [h.message_id for h in search(store, "100%")]
        assert search(store, "_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_%_") == []
    else:
        # Full-text search: stemming finds "appointments" and "cancelled" from other word forms.
        assert any(h.conversation_id == info.id for h in search(store, "appointment cancel"))
        assert search(store, "appointment -cancelled") == []
