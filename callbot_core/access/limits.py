"""Rate limits: how many requests one client address, and one API key or user, may make in a window, per group of
routes (sign-in, making API keys, chat). Any front end asks `RateLimits.check`; the API does so for every request
(`callbot_core/api/limits.py`).

Counting is a fixed window that starts at a bucket's first request: the 11th sign-in within a minute of the first
is refused, and the budget is whole again once that minute is over. Counters live in Redis when `redis_url` is set,
so replicas share them (one Lua script: increment and set the expiry atomically), and in the process otherwise.

Redis down means no limits, never no service: a limiter that cannot reach Redis lets requests through and logs a
warning, and tries Redis again after a few seconds (a refused connection costs nothing, a silent one costs the
connect timeout, so it is not paid on every request).
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from callbot_core.settings import Settings

log = logging.getLogger(__name__)

# Seconds: Redis answers on a LAN in well under a millisecond; waiting longer would only slow every limited request.
REDIS_TIMEOUT_S = 0.5
# After a failure, how long requests pass without asking Redis.
REDIS_RETRY_S = 5.0
REDIS_PREFIX = "callbot:rl"


@dataclass(frozen=True, slots=True)
class Rule:
    """At most `limit` requests per `window_s` seconds (0: no limit); `setting` is what changes it."""

    limit: int
    window_s: int
    setting: str


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    count: int  # requests in this window, this one included (0: not counted, Redis was down)
    retry_after_s: int  # seconds until the window ends


class RateLimiter(Protocol):
    """Counts requests per bucket. `blocking`: `hit` waits on the network (call it off an event loop)."""

    blocking: bool

    def hit(self, bucket: str, rule: Rule) -> Decision: ...


def _retry_after(seconds_left: float) -> int:
    return max(1, math.ceil(seconds_left))


class MemoryLimiter:
    """Counters in this process (one API process, or tests): thread-safe, forgotten on restart."""

    blocking = False
    # Expired windows are swept at most this often, and only once there are this many: bounded memory whatever
    # number of addresses come and go, without an O(n) pass on every request.
    SWEEP_EVERY_S = 1.0
    SWEEP_ABOVE = 10_000

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, tuple[int, float]] = {}  # bucket -> (count, window ends at)
        self._swept = 0.0

    def hit(self, bucket: str, rule: Rule) -> Decision:
        now = self._clock()
        with self._lock:
            count, ends = self._windows.get(bucket, (0, 0.0))
            if ends <= now:
                count, ends = 0, now + rule.window_s
            count += 1
            self._windows[bucket] = (count, ends)
            if len(self._windows) > self.SWEEP_ABOVE and now - self._swept > self.SWEEP_EVERY_S:
                self._swept = now
                self._windows = {b: w for b, w in self._windows.items() if w[1] > now}
        return Decision(count <= rule.limit, count, _retry_after(ends - now))


# Increment the bucket; a new bucket (no expiry yet) gets the window as its expiry. One script, so two replicas
# counting at once can never leave a counter without an expiry (which would refuse its client forever).
_HIT = """
local count = redis.call('INCR', KEYS[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 then
  redis.call('PEXPIRE', KEYS[1], ARGV[1])
  ttl = tonumber(ARGV[1])
end
return {count, ttl}
"""


def redis_where(url: str) -> str:
    """host:port/db of a Redis URL, for messages: never its password."""
    parts = urlsplit(url)
    return f"{parts.hostname or 'localhost'}:{parts.port or 6379}{parts.path or ''}"


class RedisLimiter:
    """Counters in Redis, shared by every process that uses the same Redis and prefix; fails open."""

    blocking = True

    def __init__(self, url: str, *, prefix: str = REDIS_PREFIX, retry_s: float = REDIS_RETRY_S) -> None:
        import redis  # here, so the in-process default never needs the client

        self._errors = (redis.RedisError, OSError)
        self._client = redis.Redis.from_url(url, socket_connect_timeout=REDIS_TIMEOUT_S, socket_timeout=REDIS_TIMEOUT_S)
        self._script = self._client.register_script(_HIT)
        self.prefix = prefix
        self.where = redis_where(url)
        self._retry_s = retry_s
        self._down_until = 0.0  # a plain float: racing threads at worst both ask Redis once more

    def hit(self, bucket: str, rule: Rule) -> Decision:
        now = time.monotonic()
        if now < self._down_until:
            return Decision(True, 0, 0)
        try:
            count, ttl_ms = self._script(keys=[f"{self.prefix}:{bucket}"], args=[rule.window_s * 1000])
        except self._errors as exc:
            self._down_until = now + self._retry_s
            log.warning(
                "Rate limits are OFF: Redis at %s failed (%s); requests pass unlimited, Redis is asked again in %.0f s",
                self.where,
                str(exc).splitlines()[0] if str(exc) else type(exc).__name__,
                self._retry_s,
            )
            return Decision(True, 0, 0)
        return Decision(int(count) <= rule.limit, int(count), _retry_after(int(ttl_ms) / 1000))

    def close(self) -> None:
        self._client.close()


@dataclass(frozen=True, slots=True)
class Group:
    """One group of routes: what it is called in a refusal, and its two limits (per caller: None when a group has
    no caller yet, as sign-in)."""

    what: str
    per_client: Rule
    per_key: Rule | None


def groups_from(settings: Settings) -> dict[str, Group]:
    """The groups and their limits as configured (`CALLBOT_RATE_LIMIT_*`)."""

    def rule(name: str, window: str) -> Rule:
        return Rule(getattr(settings, name), getattr(settings, window), f"CALLBOT_{name.upper()}")

    return {
        "signin": Group("sign-in", rule("rate_limit_signin_per_client", "rate_limit_signin_window_s"), None),
        "keys": Group(
            "API-key",
            rule("rate_limit_keys_per_client", "rate_limit_keys_window_s"),
            rule("rate_limit_keys_per_key", "rate_limit_keys_window_s"),
        ),
        "chat": Group(
            "chat",
            rule("rate_limit_chat_per_client", "rate_limit_chat_window_s"),
            rule("rate_limit_chat_per_key", "rate_limit_chat_window_s"),
        ),
    }


def limiter_for(settings: Settings) -> RateLimiter:
    """Redis when configured (limits shared by replicas), this process otherwise."""
    if not settings.redis_url:
        return MemoryLimiter()
    # Under the configured prefix, as events and the cache: workbenches sharing one Redis keep apart.
    return RedisLimiter(settings.redis_url, prefix=f"{settings.redis_key_prefix}:rl")


@dataclass(frozen=True, slots=True)
class Refusal:
    message: str
    retry_after_s: int


class RateLimits:
    """The configured groups over one limiter."""

    def __init__(self, limiter: RateLimiter, groups: dict[str, Group]) -> None:
        self.limiter = limiter
        self.groups = groups

    @classmethod
    def from_settings(cls, settings: Settings) -> RateLimits:
        return cls(limiter_for(settings), groups_from(settings))

    def check(self, group: str, *, client: str | None, key: str | None) -> Refusal | None:
        """Count one request of `group` from address `client` made with `key` (an API key's or a user's identity,
        None when anonymous); a `Refusal` when either is over its limit. The client is checked first, so a
        request refused for its address does not also spend its key's budget."""
        found = self.groups[group]
        for rule, who, kind, whose in (
            (found.per_client, client, "client", "from this address"),
            (found.per_key, key, "key", "with this API key or user"),
        ):
            if rule is None or rule.limit <= 0 or who is None:
                continue
            decision = self.limiter.hit(f"{group}:{kind}:{who}", rule)
            if not decision.allowed:
                return Refusal(
                    f"Too many {found.what} requests {whose}: at most {rule.limit} per {rule.window_s} s "
                    f"({rule.setting}); retry in {decision.retry_after_s} s",
                    decision.retry_after_s,
                )
        return None
