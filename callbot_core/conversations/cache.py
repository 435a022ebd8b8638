"""The response cache: a deterministic turn asked again gets its reply from Redis instead of the backend.

Opt-in (`CALLBOT_RESPONSE_CACHE=true`, with `CALLBOT_REDIS_URL`): a cached reply hides the backend's own variation
and its real cost, which is what a researcher sometimes wants to measure. Only a request that would get the same
reply again is cached: temperature 0 with a seed, or a turn sent inside `replaying()` (an evaluation suite
replayed to re-check its assertions against the replies it got before).

The key is the SHA-256 of a canonical JSON of everything that decides the reply: the backend (name and where it
runs), the model, every message of the prompt as built (persona prompt, context, history, the new message) and
every generation parameter. A changed word, persona version or parameter is a different key.

It is one stage, `CachedGenerate`, in place of `generate` (same name, so TTFT and the stage rows read as before):
- a hit streams the stored pieces; the backend is not called; the turn is stored as any other, with its metrics
  and `turn_metrics.cached = true`; its TTFT is real, the time to the first piece from Redis;
- a miss runs the wrapped stage, and `CacheWriter` (an observer) stores the reply once the whole turn is stored:
  a failed or interrupted turn is never cached.
Redis down is a miss with a warning, never a failed turn. Hits and misses of cacheable turns are counted on
Prometheus' default registry (`callbot_response_cache_hits_total`, `..._misses_total`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, ClassVar

from prometheus_client import Counter

from callbot_core.access.limits import REDIS_RETRY_S, REDIS_TIMEOUT_S, redis_where
from callbot_core.backends.llm import Usage
from callbot_core.conversations.observers import TurnObserver
from callbot_core.conversations.turn import EmptyReply, Stage, TurnContext
from callbot_core.errors import ConfigError

if TYPE_CHECKING:
    from callbot_core.conversations.service import ConversationService
    from callbot_core.settings import Settings

log = logging.getLogger(__name__)

HITS = Counter("callbot_response_cache_hits_total", "Turns whose reply came from the response cache")
MISSES = Counter("callbot_response_cache_misses_total", "Cacheable turns whose reply was not cached yet")

KEY_VERSION = 1  # part of every key: a change in what a key covers starts a fresh cache
PREFIX = "callbot:cache"
_KEY_NOTE = "response_cache_key"

_replaying: contextvars.ContextVar[bool] = contextvars.ContextVar("callbot_replaying", default=False)


@contextlib.contextmanager
def replaying() -> Iterator[None]:
    """Turns sent and run inside this block (in this thread) are cacheable whatever their sampling: a suite replayed
    to re-check its assertions wants the replies it got the first time."""
    token = _replaying.set(True)
    try:
        yield
    finally:
        _replaying.reset(token)


def cacheable(turn: TurnContext) -> bool:
    params = turn.params
    if params is None:
        return False
    return _replaying.get() or (params.temperature == 0 and params.seed is not None)


def cache_key(turn: TurnContext) -> str:
    """The SHA-256 of everything that decides the reply, as canonical JSON."""
    llm, params = turn.backend, turn.params
    assert llm is not None and params is not None
    what = {
        "v": KEY_VERSION,
        "backend": llm.name,
        "where": llm.where,
        "model": turn.model,
        "messages": [[m.role, m.content] for m in turn.messages],
        "params": dataclasses.asdict(params),
    }
    canonical = json.dumps(what, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class ResponseCache:
    """Replies in Redis under `prefix:<key>`, each kept `ttl_s` seconds. Every failure is logged and passed over."""

    def __init__(self, url: str, *, ttl_s: int, prefix: str = PREFIX, retry_s: float = REDIS_RETRY_S) -> None:
        import redis  # here: the cache is opt-in, and nothing else in a turn needs the client

        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
        self.ttl_s = ttl_s
        self.prefix = prefix
        self.where = redis_where(url)
        self._retry_s = retry_s
        self._down_until = 0.0

    def _failed(self, doing: str, exc: BaseException) -> None:
        self._down_until = time.monotonic() + self._retry_s
        log.warning(
            "Response cache: %s failed at Redis %s (%s); turns go to the backend, Redis is asked again in %.0f s",
            doing,
            self.where,
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
            self._retry_s,
        )

    def get(self, key: str) -> dict[str, Any] | None:
        if time.monotonic() < self._down_until:
            return None
        try:
            raw = self._client.get(f"{self.prefix}:{key}")
        except self._errors as exc:
            self._failed("reading a reply", exc)
            return None
        try:
            entry = json.loads(raw) if raw is not None else None
        except ValueError:
            entry = None  # not ours (or cut short): a miss, and the reply stored after it replaces it
        if not isinstance(entry, dict) or not isinstance(entry.get("pieces"), list) or not entry["pieces"]:
            return None
        return entry

    def put(self, key: str, entry: dict[str, Any]) -> None:
        if time.monotonic() < self._down_until:
            return
        try:
            self._client.set(f"{self.prefix}:{key}", json.dumps(entry, ensure_ascii=False), ex=self.ttl_s)
        except self._errors as exc:
            self._failed("storing a reply", exc)

    def close(self) -> None:
        self._client.close()


class CachedGenerate:
    """`generate` with the cache in front: a hit streams the stored reply, a miss runs the wrapped stage."""

    name: ClassVar[str] = "generate"
    streams: ClassVar[bool] = True
    after_failure: ClassVar[bool] = False

    def __init__(self, inner: Stage, cache: ResponseCache) -> None:
        self.inner = inner
        self.cache = cache

    def run(self, turn: TurnContext) -> Iterator[str] | None:
        if not cacheable(turn):
            return self.inner.run(turn)
        key = cache_key(turn)
        entry = self.cache.get(key)
        if entry is None:
            MISSES.inc()
            turn.notes[_KEY_NOTE] = key
            return self.inner.run(turn)
        HITS.inc()
        return self._replay(turn, entry)

    def _replay(self, turn: TurnContext, entry: dict[str, Any]) -> Iterator[str]:
        turn.cached = True
        # Only the token counts: the backend's own timings would describe a generation that did not happen now.
        turn.usage = Usage(
            prompt_tokens=entry.get("prompt_tokens"),
            completion_tokens=entry.get("completion_tokens"),
            finish_reason=entry.get("finish_reason"),
        )
        for piece in entry["pieces"]:
            piece = str(piece)
            if piece:
                turn.pieces.append(piece)
                yield piece
        text = "".join(turn.pieces).strip()
        if not text:
            assert turn.backend is not None
            raise EmptyReply(turn.backend, turn.model)
        turn.reply_text = text


class CacheWriter(TurnObserver):
    """Stores a missed reply once its turn is stored whole (`turn_finished` comes only for a turn that succeeded)."""

    def __init__(self, cache: ResponseCache) -> None:
        self.cache = cache

    def turn_finished(self, turn: TurnContext) -> None:
        key = turn.notes.get(_KEY_NOTE)
        if key is None or turn.cached or not turn.pieces:
            return
        usage = turn.usage
        self.cache.put(
            key,
            {
                "pieces": turn.pieces,
                "prompt_tokens": usage.prompt_tokens if usage else None,
                "completion_tokens": turn.completion_tokens,
                "finish_reason": usage.finish_reason if usage else None,
            },
        )


def use_response_cache(service: ConversationService, cache: ResponseCache) -> None:
    """Put `cache` in front of `service`'s generate stage, and store the replies it misses."""
    names = [stage.name for stage in service.stages]
    if "generate" not in names:
        raise ConfigError(f"The response cache needs a 'generate' stage; this service's stages: {', '.join(names)}")
    at = names.index("generate")
    current = service.stages[at]
    inner = current.inner if isinstance(current, CachedGenerate) else current
    service.stages[at] = CachedGenerate(inner, cache)
    service.observers[:] = [o for o in service.observers if not isinstance(o, CacheWriter)]
    service.observers.append(CacheWriter(cache))


def cache_from(settings: Settings) -> ResponseCache | None:
    """The configured cache: None when off; a ConfigError when on without Redis to keep it in."""
    if not settings.response_cache:
        return None
    if not settings.redis_url:
        raise ConfigError("CALLBOT_RESPONSE_CACHE=true needs CALLBOT_REDIS_URL: the cache is kept in Redis")
    return ResponseCache(
        settings.redis_url, ttl_s=settings.response_cache_ttl_s, prefix=f"{settings.redis_key_prefix}:cache"
    )
