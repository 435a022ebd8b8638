"""The response cache, on SQLite and PostgreSQL against the local Redis: a seeded temperature-0 turn asked again is
answered from Redis (the backend not called, the turn stored as any other with `cached = true`), anything that
could change the reply is a different key, and failed, interrupted, sampled or uncached turns never come from it."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Iterator

import pytest
import redis
from prometheus_client import REGISTRY
from sqlalchemy import select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm import GenerationParams
from callbot_core.conversations.cache import (
    CachedGenerate,
    ResponseCache,
    cache_from,
    replaying,
    use_response_cache,
)
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import BackendUnavailable, ConfigError
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import TurnMetrics, TurnStage
from tests.api.conftest import free_port
from tests.conftest import IN_CI
from tests.engine.scripted import Scripted

REDIS_URL = "redis://127.0.0.1:6379/0"
GREEDY = GenerationParams(temperature=0.0, top_p=1.0, max_tokens=32, seed=7)
REPLY = ["We", " open", " at", " 8."]


@pytest.fixture
def redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if IN_CI:
            pytest.fail(f"CI=true but Redis at {REDIS_URL} does not answer")
        pytest.skip(f"the response cache tests need Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture
def cache(redis_url: str) -> Iterator[ResponseCache]:
    """A cache of this test's own (a fresh prefix: other runs share the Redis), emptied afterwards."""
    made = ResponseCache(redis_url, ttl_s=120, prefix=f"test:cache:{uuid.uuid4().hex}")
    yield made
    client = redis.Redis.from_url(redis_url)
    for key in client.scan_iter(f"{made.prefix}:*"):
        client.delete(key)
    client.close()
    made.close()


@pytest.fixture
def cached(service: ConversationService, cache: ResponseCache) -> ConversationService:
    use_response_cache(service, cache)
    return service


def _counts() -> tuple[float, float]:
    def value(name: str) -> float:
        return REGISTRY.get_sample_value(name) or 0.0

    return value("callbot_response_cache_hits_total"), value("callbot_response_cache_misses_total")


def _turn(service: ConversationService, text: str = "When do you open?", params: GenerationParams = GREEDY,
          persona: str = "receptionist") -> tuple[int, list[str], object]:  # fmt: skip
    """A new conversation and one turn in it (history is part of the key: each turn starts fresh)."""
    info = service.start(persona, actor=LOCAL_OPERATOR)
    stream = service.send(info.id, text, params=params, actor=LOCAL_OPERATOR)
    pieces = list(stream)
    return info.id, pieces, stream.result


def _metrics(store: Store, conversation_id: int) -> TurnMetrics:
    with store.session() as session:
        return session.scalars(select(TurnMetrics).where(TurnMetrics.conversation_id == conversation_id)).one()


def test_a_seeded_greedy_turn_comes_from_the_cache_the_second_time(cached, store, backend: Scripted) -> None:
    hits, misses = _counts()
    first_id, first_pieces, first = _turn(cached)
    assert len(backend.requests) == 1 and first_pieces == REPLY
    assert _counts() == (hits, misses + 1)
    assert not first.cached and not _metrics(store, first_id).cached

    second_id, second_pieces, second = _turn(cached)
    assert len(backend.requests) == 1, "a hit must not call the backend"
    assert second_pieces == REPLY and second.text == first.text == "We open at 8."
    assert second.cached and _counts() == (hits + 1, misses + 1)
    # Stored as a normal turn, with its metrics: TTFT measured (from the cache), tokens as the backend counted them.
    tm = _metrics(store, second_id)
    assert tm.cached and tm.error is None and tm.assistant_message_id is not None
    assert tm.ttft_ms is not None and tm.ttft_ms > 0 and tm.total_ms >= tm.ttft_ms
    assert tm.completion_tokens == 4 and tm.prompt_tokens == _metrics(store, first_id).prompt_tokens
    with store.session() as session:
        stages = list(session.scalars(select(TurnStage.stage).where(TurnStage.turn_metrics_id == tm.id)
                                      .order_by(TurnStage.position)))  # fmt: skip
    assert stages == ["validate", "prompt", "generate", "persist"]


def test_every_part_of_the_request_is_in_the_key(cached, backend: Scripted) -> None:
    _turn(cached)
    variants = [
        {"params": GenerationParams(temperature=0.0, top_p=1.0, max_tokens=33, seed=7)},
        {"params": GenerationParams(temperature=0.0, top_p=1.0, max_tokens=32, seed=8)},
        {"params": GenerationParams(temperature=0.0, top_p=0.9, max_tokens=32, seed=7)},
        {"params": GenerationParams(temperature=0.0, top_p=1.0, max_tokens=32, seed=7, stop=("\n",))},
        {"text": "When do you close?"},
        {"persona": "support"},
    ]
    for number, variant in enumerate(variants, start=2):
        _, pieces, result = _turn(cached, **variant)  # type: ignore[arg-type]
        assert len(backend.requests) == number and not result.cached, variant
    # Each variant was stored in turn: asked again, each is a hit.
    for variant in variants:
        _, _, result = _turn(cached, **variant)  # type: ignore[arg-type]
        assert result.cached, variant
    assert len(backend.requests) == 1 + len(variants)


def test_history_is_part_of_the_prompt_and_of_the_key(cached, backend: Scripted) -> None:
    conversation_id, _, _ = _turn(cached)
    again = cached.send(conversation_id, "When do you open?", params=GREEDY, actor=LOCAL_OPERATOR)
    again.text()
    assert len(backend.requests) == 2 and not again.result.cached


def test_a_failed_or_interrupted_turn_is_never_cached(cached, store, backend: Scripted) -> None:
    backend.fail_after = 2
    info = cached.start("receptionist", actor=LOCAL_OPERATOR)
    with pytest.raises(BackendUnavailable):
        cached.send(info.id, "When do you open?", params=GREEDY, actor=LOCAL_OPERATOR).text()
    backend.fail_after = None
    # Interrupted: one piece read, then closed.
    info = cached.start("receptionist", actor=LOCAL_OPERATOR)
    with cached.send(info.id, "When do you open?", params=GREEDY, actor=LOCAL_OPERATOR) as stream:
        assert next(iter(stream)) == "We"
    assert _metrics(store, info.id).error is not None and not _metrics(store, info.id).cached
    assert len(backend.requests) == 2
    # Neither was stored: the next one goes to the backend, and the one after that is a hit.
    _, _, third = _turn(cached)
    _, _, fourth = _turn(cached)
    assert len(backend.requests) == 3 and not third.cached and fourth.cached


def test_a_sampled_or_unseeded_turn_is_never_cached(cached, backend: Scripted) -> None:
    hits, misses = _counts()
    sampled = GenerationParams(temperature=0.7, max_tokens=32, seed=7)
    unseeded = GenerationParams(temperature=0.0, max_tokens=32, seed=None)
    for params in (sampled, sampled, unseeded, unseeded):
        _, _, result = _turn(cached, params=params)
        assert not result.cached
    assert len(backend.requests) == 4 and _counts() == (hits, misses)
    # A suite replay asks for the replies it got before, whatever their sampling.
    with replaying():
        _, _, first = _turn(cached, params=sampled)
        _, _, second = _turn(cached, params=sampled)
    assert len(backend.requests) == 5 and not first.cached and second.cached


def test_with_the_cache_off_nothing_is_cached(service, settings: Settings, store, backend: Scripted) -> None:
    assert not settings.response_cache and not any(isinstance(s, CachedGenerate) for s in service.stages)
    for _ in range(2):
        conversation_id, _, result = _turn(service)
        assert not result.cached and not _metrics(store, conversation_id).cached
    assert len(backend.requests) == 2
    with pytest.raises(ConfigError, match="CALLBOT_REDIS_URL"):
        cache_from(settings.model_copy(update={"response_cache": True, "redis_url": None}))


def test_the_setting_turns_it_on_for_every_service(settings: Settings, store, backend: Scripted, redis_url) -> None:
    configured = settings.model_copy(update={
        "llm_backend": "scripted", "response_cache": True, "redis_url": redis_url, "response_cache_ttl_s": 60,
    })  # fmt: skip
    service = ConversationService(store, configured)
    assert [s.name for s in service.stages] == ["validate", "retrieve", "prompt", "generate", "persist"]
    assert isinstance(service.stages[3], CachedGenerate)
    text = f"Are you open on {uuid.uuid4().hex}?"  # the default prefix is shared with other runs: a prompt of our own
    _, _, first = _turn(service, text=text)
    _, _, second = _turn(service, text=text)
    assert len(backend.requests) == 1 and not first.cached and second.cached


def test_redis_down_is_a_miss_not_a_failure(service, store, backend: Scripted, caplog) -> None:
    down = ResponseCache(f"redis://127.0.0.1:{free_port()}/0", ttl_s=60)
    use_response_cache(service, down)
    with caplog.at_level(logging.WARNING, logger="callbot_core.conversations.cache"):
        for _ in range(2):
            conversation_id, pieces, result = _turn(service)
            assert pieces == REPLY and not result.cached and _metrics(store, conversation_id).error is None
    assert len(backend.requests) == 2
    assert any("Response cache" in r.getMessage() and "127.0.0.1" in r.getMessage() for r in caplog.records)


def test_an_entry_that_is_not_ours_is_a_miss_and_is_replaced(cached, cache: ResponseCache, backend: Scripted) -> None:
    _turn(cached)
    client = redis.Redis.from_url(REDIS_URL)
    (stored,) = list(client.scan_iter(f"{cache.prefix}:*"))
    client.set(stored, b"{not json")
    _, _, missed = _turn(cached)
    _, _, hit = _turn(cached)
    client.close()
    assert len(backend.requests) == 2 and not missed.cached and hit.cached and hit.text == "We open at 8."
