"""Rate limits, against the live API with httpx: sign-in, chat and key-making counted per client address and per
API key or user, the same with counters in the process and in the local Redis, answered with 429 `rate_limited`
and `Retry-After`; a limit of 0 is none, and a limiter whose Redis is down lets everything through. And the
response cache as the API serves it: turned on by configuration, counted in /metrics."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterator

import httpx
import pytest
import redis
from sqlalchemy import select

from callbot_core.access.limits import MemoryLimiter, RateLimiter, RateLimits, RedisLimiter, Rule, groups_from
from callbot_core.api import create_app
from callbot_core.api.limits import group_of, key_identity
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import TurnMetrics
from tests.api.conftest import PASSWORD, Api, LiveServer, free_port
from tests.conftest import IN_CI
from tests.engine.scripted import Scripted

REDIS_URL = "redis://127.0.0.1:6379/0"
CHAT_BODY = {"model": "receptionist", "messages": [{"role": "user", "content": "When do you open?"}]}
# Both chat routes share one budget: whether they exist yet or not, a POST to them is counted before routing.
CHAT_ROUTES = (("/v1/chat/completions", CHAT_BODY), ("/v1/conversations/1/turns", {"text": "When do you open?"}))


def _redis_url() -> str:
    try:
        redis.Redis.from_url(REDIS_URL, socket_connect_timeout=1).ping()
    except redis.RedisError:
        if IN_CI:
            pytest.fail(f"CI=true but Redis at {REDIS_URL} does not answer")
        pytest.skip(f"the Redis limiter tests need Redis at {REDIS_URL}")
    return REDIS_URL


@pytest.fixture(params=["memory", "redis"])
def limiter(request: pytest.FixtureRequest) -> Iterator[RateLimiter]:
    """Each kind of limiter, fresh: the Redis one under a prefix of this test's own (other runs share the Redis)."""
    if request.param == "memory":
        yield MemoryLimiter()
        return
    url = _redis_url()
    made = RedisLimiter(url, prefix=f"test:rl:{uuid.uuid4().hex}")
    yield made
    client = redis.Redis.from_url(url)
    for key in client.scan_iter(f"{made.prefix}:*"):
        client.delete(key)
    client.close()
    made.close()


@pytest.fixture
def serve(store: Store, api_settings: Settings, backend: Scripted) -> Iterator[Callable[..., Api]]:
    """Starts the API with these settings changed and, when given, this limiter behind the configured limits."""
    servers: list[LiveServer] = []

    def start(limiter: RateLimiter | None = None, **changes: object) -> Api:
        # A Redis prefix of this test's own: other tests (another xdist worker, another run) share the server.
        changes.setdefault("redis_key_prefix", f"test-{uuid.uuid4().hex[:12]}")
        settings = api_settings.model_copy(update=changes)

        def use_limiter(app: object, ctx: object) -> None:
            if limiter is not None:
                ctx.parts["rate_limits"] = RateLimits(limiter, groups_from(settings))  # type: ignore[attr-defined]

        service = ConversationService(store, settings)
        server = LiveServer(create_app(settings, store=store, service=service, plugins=[use_limiter])).start()
        servers.append(server)
        return Api(url=server.url, store=store, settings=settings, service=service, backend=backend)

    yield start
    for server in servers:
        server.stop()


def _refused(r: httpx.Response, setting: str) -> int:
    """Asserts a rate-limit answer naming `setting`; returns its Retry-After."""
    assert r.status_code == 429, r.text
    error = r.json()["error"]
    assert error["code"] == "rate_limited" and setting in error["message"] and "\n" not in error["message"]
    assert r.headers["x-request-id"]
    return int(r.headers["retry-after"])


def _chat(c: httpx.Client, n: int, *, address: str | None = None) -> list[int]:
    headers = {"X-Forwarded-For": address} if address else {}
    statuses = []
    for i in range(n):
        path, body = CHAT_ROUTES[i % 2]
        statuses.append(c.post(path, json=body, headers=headers).status_code)
    return statuses


def test_the_eleventh_sign_in_in_a_minute_is_refused(serve, limiter: RateLimiter) -> None:
    api = serve(limiter, trusted_proxies=["127.0.0.1"])
    body = {"username": api.user("researcher"), "password": PASSWORD}
    with api.client() as c:
        for n in range(10):
            r = c.post("/v1/auth/token", json=body)
            assert r.status_code == 200, (n, r.text)
        r = c.post("/v1/auth/token", json=body)
        retry = _refused(r, "CALLBOT_RATE_LIMIT_SIGNIN_PER_CLIENT")
        assert 1 <= retry <= 60 and "at most 10 per 60 s" in r.json()["error"]["message"]
        # Counted before the password is read: a wrong one is refused the same way, and the account is not locked.
        _refused(c.post("/v1/auth/token", json={**body, "password": "wrong"}), "SIGNIN_PER_CLIENT")
        # Another client (behind the trusted proxy) has a budget of its own.
        other = c.post("/v1/auth/token", json=body, headers={"X-Forwarded-For": "203.0.113.7"})
        assert other.status_code == 200, other.text


def test_chat_is_counted_per_key_and_per_client(serve, limiter: RateLimiter) -> None:
    api = serve(limiter, trusted_proxies=["127.0.0.1"], rate_limit_chat_per_key=3, rate_limit_chat_per_client=6)
    ann, bob, cid = (api.key(name=name) for name in ("ann", "bob", "cid"))
    with api.client(ann) as c:
        assert 429 not in _chat(c, 3)
        _refused(c.post("/v1/chat/completions", json=CHAT_BODY), "CALLBOT_RATE_LIMIT_CHAT_PER_KEY")
        # Other routes, and reading the turns, are not counted.
        assert c.get("/v1/conversations").status_code != 429
        assert 429 not in [c.get("/v1/conversations/1/turns").status_code for _ in range(8)]
    with api.client(bob) as c:  # a budget of its own, but the address has used 4 of its 6
        assert 429 not in _chat(c, 2)
        _refused(c.post("/v1/chat/completions", json=CHAT_BODY), "CALLBOT_RATE_LIMIT_CHAT_PER_CLIENT")
    with api.client(cid) as c:  # another address, another key: untouched
        assert 429 not in _chat(c, 3, address="198.51.100.4")
    with api.client(ann) as c:  # a key's budget follows it to any address
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"X-Forwarded-For": "198.51.100.5"})
        _refused(r, "CALLBOT_RATE_LIMIT_CHAT_PER_KEY")


def test_a_users_tokens_share_one_budget(serve, limiter: RateLimiter) -> None:
    api = serve(limiter, trusted_proxies=["127.0.0.1"], rate_limit_chat_per_key=2, rate_limit_chat_per_client=100)
    first, second = api.token("researcher"), api.token("researcher")
    assert first != second
    with api.client(first) as c:
        assert 429 not in _chat(c, 2, address="192.0.2.1")
    with api.client(second) as c:
        _refused(c.post("/v1/chat/completions", json=CHAT_BODY, headers={"X-Forwarded-For": "192.0.2.2"}),
                 "CHAT_PER_KEY")  # fmt: skip
    # A forged token is not its user: it spends a budget of its own (and auth refuses it).
    forged = first[:-6] + ("AAAAAA" if not first.endswith("AAAAAA") else "BBBBBB")
    with api.client(forged) as c:
        r = c.post("/v1/chat/completions", json=CHAT_BODY, headers={"X-Forwarded-For": "192.0.2.3"})
        assert r.status_code != 429, r.text


def test_making_keys_is_limited_too(serve, limiter: RateLimiter) -> None:
    api = serve(limiter, rate_limit_keys_per_key=2)
    admin = api.key("admin", scopes="admin", name="boss")
    api.user("researcher")
    with api.client(admin) as c:
        for _ in range(2):
            assert c.post("/v1/apikeys", json={"username": "researcher-user", "name": "lab"}).status_code == 201
        _refused(c.post("/v1/apikeys", json={"username": "researcher-user", "name": "lab"}), "KEYS_PER_KEY")
        assert c.get("/v1/apikeys").status_code == 200  # listing is not making


def test_a_limit_of_zero_is_no_limit(serve) -> None:
    api = serve(rate_limit_signin_per_client=0, rate_limit_chat_per_key=0, rate_limit_chat_per_client=2)
    body = {"username": api.user("researcher"), "password": PASSWORD}
    key = api.key()
    with api.client(key) as c:
        assert all(c.post("/v1/auth/token", json=body).status_code == 200 for _ in range(12))
        assert 429 not in _chat(c, 2)
        _refused(c.post("/v1/chat/completions", json=CHAT_BODY), "CHAT_PER_CLIENT")


def test_a_limiter_whose_redis_is_down_lets_requests_through(serve, caplog) -> None:
    down = RedisLimiter(f"redis://127.0.0.1:{free_port()}/0", retry_s=0.0)
    api = serve(down)
    body = {"username": api.user("researcher"), "password": PASSWORD}
    with caplog.at_level(logging.WARNING, logger="callbot_core.access.limits"), api.client() as c:
        assert [c.post("/v1/auth/token", json=body).status_code for _ in range(12)] == [200] * 12
    assert any("Rate limits are OFF" in r.getMessage() for r in caplog.records)


def test_the_api_counts_in_redis_when_configured(store: Store, api_settings: Settings, backend: Scripted) -> None:
    def limiter_of(settings: Settings) -> RateLimiter:
        app = create_app(settings, store=store, service=ConversationService(store, settings))
        return app.state.ctx.parts["rate_limits"].limiter

    assert isinstance(limiter_of(api_settings), MemoryLimiter)
    assert isinstance(limiter_of(api_settings.model_copy(update={"redis_url": _redis_url()})), RedisLimiter)


@pytest.mark.both_stores
def test_turns_stop_at_the_limit_and_a_refused_one_stores_nothing(serve, limiter: RateLimiter) -> None:
    api = serve(limiter, rate_limit_chat_per_key=3)
    with api.client(api.key()) as c:
        started = c.post("/v1/conversations", json={"persona": "receptionist"})
        assert started.status_code == 201, started.text
        turns = f"/v1/conversations/{started.json()['id']}/turns"
        for _ in range(3):
            r = c.post(turns, json={"text": "When do you open?"})
            assert r.status_code == 200 and r.json()["text"] == "We open at 8.", r.text
        _refused(c.post(turns, json={"text": "And on Sunday?"}), "CHAT_PER_KEY")
        messages = c.get(f"/v1/conversations/{started.json()['id']}").json()["messages"]
    assert [m["text"] for m in messages if m["role"] == "user"] == ["When do you open?"] * 3
    assert len(api.backend.requests) == 3


# -- the response cache, as the API serves it ----------------------------------------------------------------


def test_the_api_answers_seeded_greedy_turns_from_the_cache(serve) -> None:
    api = serve(response_cache=True, redis_url=_redis_url(), response_cache_ttl_s=60)
    # The configured cache's keys are shared with other runs on this Redis: a message of this test's own.
    turn = {"text": f"Is {uuid.uuid4().hex} open?", "params": {"temperature": 0, "seed": 5}}
    with api.client(api.key()) as c:
        replies = []
        for _ in range(2):
            conversation = c.post("/v1/conversations", json={"persona": "receptionist"}).json()["id"]
            r = c.post(f"/v1/conversations/{conversation}/turns", json=turn)
            assert r.status_code == 200, r.text
            replies.append(r.json())
        assert len(api.backend.requests) == 1 and replies[0]["text"] == replies[1]["text"]
        assert [r["cached"] for r in replies] == [False, True]  # the answer says so, as the store does
        assert replies[1]["ttft_ms"] is not None
        with api.store.session() as s:
            cached = dict(s.execute(select(TurnMetrics.conversation_id, TurnMetrics.cached)).all())
        assert sorted(cached.values()) == [False, True]
        scraped = c.get("/metrics").text
    assert "callbot_response_cache_hits_total" in scraped and "callbot_response_cache_misses_total" in scraped


# -- the limiters themselves, and what is limited ---------------------------------------------------------------


def test_both_limiters_count_alike(limiter: RateLimiter) -> None:
    rule = Rule(3, 60, "X")
    decisions = [limiter.hit("a", rule) for _ in range(5)]
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert [d.count for d in decisions] == [1, 2, 3, 4, 5]
    assert all(1 <= d.retry_after_s <= 60 for d in decisions)
    assert limiter.hit("b", rule).allowed


def test_a_window_ends_and_the_budget_is_whole_again(limiter: RateLimiter) -> None:
    rule = Rule(1, 1, "X")
    first, second = limiter.hit("a", rule), limiter.hit("a", rule)
    assert first.allowed and not second.allowed and second.retry_after_s == 1
    deadline = time.monotonic() + 5
    while not limiter.hit("a", rule).allowed:
        assert time.monotonic() < deadline, "the window never ended"
        time.sleep(0.1)


def test_counting_is_exact_across_threads(limiter: RateLimiter) -> None:
    rule = Rule(100, 60, "X")
    allowed: list[bool] = []
    lock = threading.Lock()

    def worker() -> None:
        mine = [limiter.hit("shared", rule).allowed for _ in range(30)]
        with lock:
            allowed.extend(mine)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(allowed) == 180 and sum(allowed) == 100


@pytest.mark.parametrize(
    ("method", "path", "group"),
    [
        ("POST", "/v1/auth/token", "signin"),
        ("DELETE", "/v1/auth/token", None),
        ("POST", "/v1/apikeys", "keys"),
        ("GET", "/v1/apikeys", None),
        ("POST", "/v1/conversations/12/turns", "chat"),
        ("POST", "/v1/conversations/12/turns/stream", "chat"),
        ("GET", "/v1/conversations/12/turns", None),
        ("POST", "/v1/conversations", None),
        ("POST", "/v1/chat/completions", "chat"),
        ("POST", "/v1/chat/completions/extra", None),
    ],
)
def test_which_routes_are_limited(method: str, path: str, group: str | None) -> None:
    assert group_of(method, path) == group


def test_whose_budget_a_request_spends() -> None:
    secret = "s" * 40
    assert key_identity({}, secret) is None
    key_a = key_identity({b"authorization": "Bearer cbk_aaaa"}, secret)
    assert key_a is not None and key_a.startswith("key:") and "cbk_aaaa" not in key_a
    assert key_identity({b"x-api-key": "cbk_aaaa"}, secret) == key_a
    assert key_identity({b"x-api-key": "cbk_bbbb"}, secret) != key_a
    assert key_identity({b"authorization": "Bearer not-a-jwt"}, secret).startswith("credential:")  # type: ignore[union-attr]
