"""Live events over WebSocket (`WS /v1/conversations/{id}/events`): real `websockets` clients against the live
server, turns driven through the service the API uses, in-process and through the local Redis, also from a second
process. In CI (CI=true) a missing Redis is a failure, not a skip."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
import redis
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.api import create_app
from callbot_core.conversations.events import (
    ListenerOverrun,
    LiveObserver,
    LocalBus,
    make_event,
)
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import PROJECT_ROOT, Settings
from callbot_core.store import Store
from callbot_core.store.models import TurnMetrics
from tests.api.conftest import Api, LiveServer
from tests.engine.scripted import Scripted
from tests.fake_ollama import FakeOllama, down_url

IN_CI = os.environ.get("CI", "").lower() == "true"
LOCAL_REDIS = "redis://127.0.0.1:6379/0"
WAIT_S = 15  # generous: the machine is shared; a test waits this long only when something is wrong


# -- helpers ------------------------------------------------------------------------------------------------------


def ws_url(api: Api, conversation_id: object, **query: str) -> str:
    url = api.url.replace("http://", "ws://", 1) + f"/v1/conversations/{conversation_id}/events"
    return url + (f"?{urlencode(query)}" if query else "")


def listen(
    api: Api, conversation_id: object, credential: str | None = None, *, headers: dict[str, str] | None = None,
    **kwargs: Any,
) -> ClientConnection:  # fmt: skip
    sent = dict(headers or {})
    if credential:
        sent["Authorization"] = f"Bearer {credential}"
    return connect(ws_url(api, conversation_id, **kwargs.pop("query", {})), additional_headers=sent,
                   open_timeout=WAIT_S, **kwargs)  # fmt: skip


def next_event(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(ws.recv(timeout=WAIT_S))


def subscribed(ws: ClientConnection) -> dict[str, Any]:
    first = next_event(ws)
    assert first["type"] == "subscribed", first
    return first


def events_until(ws: ClientConnection, last: str) -> list[dict[str, Any]]:
    """Events up to and including the first of type `last`."""
    seen = []
    while True:
        event = next_event(ws)
        seen.append(event)
        if event["type"] == last:
            return seen


def close_of(ws: ClientConnection) -> tuple[int | None, str | None]:
    """Read to the end; the close code and reason the server sent."""
    try:
        while True:
            ws.recv(timeout=WAIT_S)
    except ConnectionClosed:
        pass
    return ws.close_code, ws.close_reason


def actor_of(api: Api, key: str) -> apikeys.KeyActor:
    actor = apikeys.actor_for_key(api.store, key)
    assert actor is not None
    return actor


def start(api: Api, actor: object, **kwargs: Any) -> int:
    return api.service.start("receptionist", actor=actor, backend=kwargs.pop("backend", "scripted"), **kwargs).id


def assert_a_turn(events: list[dict[str, Any]], conversation_id: int, pieces: tuple[str, ...]) -> None:
    """started, one token per piece in order, stored with metrics: all for one turn, times never going back."""
    kinds = [e["type"] for e in events]
    assert kinds == ["turn_started", *["token"] * len(pieces), "turn_stored"], kinds
    turn_id = events[0]["turn_id"]
    assert isinstance(turn_id, int)
    assert all(e["conversation_id"] == conversation_id and e["turn_id"] == turn_id for e in events)
    assert [e["text"] for e in events[1:-1]] == list(pieces)
    assert [e["index"] for e in events[1:-1]] == list(range(len(pieces)))
    times = [datetime.fromisoformat(e["timestamp"]) for e in events]
    assert times == sorted(times) and all(t.tzinfo is not None for t in times)
    stored = events[-1]
    assert stored["text"] == "".join(pieces).strip()
    assert stored["ttft_ms"] is not None and stored["total_ms"] >= stored["ttft_ms"] >= 0
    assert stored["completion_tokens"] == len(pieces)
    assert stored["prompt_tokens"] > 0 and stored["assistant_message_id"] > turn_id
    assert set(stored["stages"]) == {"validate", "prompt", "generate", "persist"}


def redis_or_fail() -> None:
    try:
        redis.Redis.from_url(LOCAL_REDIS, socket_connect_timeout=2).ping()
    except redis.RedisError as exc:
        if IN_CI:
            pytest.fail(f"CI=true but the local Redis at {LOCAL_REDIS} does not answer: {exc}")
        pytest.skip(f"these tests need the local Redis at {LOCAL_REDIS}: {exc}")


@contextmanager
def serve(store: Store, settings: Settings, backend: Scripted) -> Iterator[Api]:
    service = ConversationService(store, settings)
    server = LiveServer(create_app(settings, store=store, service=service)).start()
    try:
        yield Api(url=server.url, store=store, settings=settings, service=service, backend=backend)
    finally:
        server.stop()


# -- in-process ---------------------------------------------------------------------------------------------------


def test_two_listeners_get_a_turns_events_in_order_and_the_end(api: Api) -> None:
    key = api.key("researcher")
    actor = actor_of(api, key)
    cid = start(api, actor)
    with listen(api, cid, key) as first, listen(api, cid, query={"token": api.token("viewer")}) as second:
        hello = subscribed(first)
        assert hello["status"] == "active" and hello["conversation_id"] == cid
        subscribed(second)
        with api.service.send(cid, "When do you open?", actor=actor) as turn:
            assert turn.text() == "We open at 8."
            result = turn.result
        for ws in (first, second):
            events = events_until(ws, "turn_stored")
            assert_a_turn(events, cid, api.backend.pieces)
            assert events[0]["text"] == "When do you open?" and events[0]["backend"] == "scripted"
            assert events[0]["turn_id"] == result.user_message_id
            assert events[-1]["assistant_message_id"] == result.assistant_message_id
            assert events[-1]["ttft_ms"] == pytest.approx(result.ttft_ms)

        api.backend.pieces = ("Bye", " now.")
        assert api.service.send(cid, "Thanks", actor=actor).text() == "Bye now."
        api.service.end(cid, actor=actor)
        for ws in (first, second):
            events = events_until(ws, "ended")
            assert_a_turn(events[:-1], cid, ("Bye", " now."))
            assert events[-1]["conversation_id"] == cid and events[-1]["turn_id"] is None
            assert close_of(ws) == (1000, "conversation ended")


def test_turns_sent_over_rest_reach_a_listener(api: Api) -> None:
    key = api.key("researcher")
    with api.client(key) as c:
        made = c.post("/v1/conversations", json={"persona": "receptionist", "backend": "scripted"})
        assert made.status_code == 201, made.text
        cid = made.json()["id"]
        with listen(api, cid, key) as ws:
            subscribed(ws)
            sent = c.post(f"/v1/conversations/{cid}/turns", json={"text": "Open on Sunday?"})
            assert sent.status_code == 200, sent.text
            events = events_until(ws, "turn_stored")
            assert_a_turn(events, cid, api.backend.pieces)
            assert events[0]["text"] == "Open on Sunday?"
            with c.stream("POST", f"/v1/conversations/{cid}/turns?stream=true", json={"text": "And now?"}) as r:
                assert r.status_code == 200
                r.read()
            assert_a_turn(events_until(ws, "turn_stored"), cid, api.backend.pieces)
            assert c.post(f"/v1/conversations/{cid}/end").status_code == 200
            assert next_event(ws)["type"] == "ended"
            assert close_of(ws) == (1000, "conversation ended")


def test_a_failed_turn_is_told_and_a_refused_one_is_not(api: Api) -> None:
    key = api.key("researcher")
    actor = actor_of(api, key)
    cid = start(api, actor)
    with listen(api, cid, key) as ws:
        subscribed(ws)
        with pytest.raises(Exception, match="empty"):
            api.service.send(cid, "   ", actor=actor)  # refused before it started: nothing stored, nothing told
        api.backend.fail_after = 2
        with pytest.raises(Exception, match="went away"), api.service.send(cid, "Hello?", actor=actor) as turn:
            turn.text()
        events = events_until(ws, "turn_failed")
        assert [e["type"] for e in events] == ["turn_started", "token", "token", "turn_failed"]
        assert events[0]["text"] == "Hello?"
        failed = events[-1]
        assert failed["stored"] is True and "went away" in failed["error"]
        assert failed["turn_id"] == events[0]["turn_id"]
    # Another conversation's listener hears nothing of this one.
    other = start(api, actor)
    api.backend.fail_after = None
    with listen(api, other, key) as ws:
        subscribed(ws)
        api.service.send(cid, "Again", actor=actor).text()
        api.service.send(other, "Mine", actor=actor).text()
        events = events_until(ws, "turn_stored")
        assert {e["conversation_id"] for e in events} == {other} and events[0]["text"] == "Mine"


def test_who_may_listen_and_what_they_are_told_otherwise(api: Api) -> None:
    reader = api.key("viewer", scopes="read")
    chat_only = api.key("researcher", scopes="chat")
    cid = start(api, actor_of(api, api.key("researcher")))
    for credential, query, headers, code, says in (
        (None, {}, {}, 4401, "Sign in"),
        ("cbk_made-up", {}, {}, 4401, "API key"),
        ("not-a-token", {}, {}, 4401, "token"),
        (None, {"token": "nope"}, {}, 4401, "token"),
        (chat_only, {}, {}, 4403, "'read' scope"),
    ):
        with listen(api, cid, credential, query=query, headers=headers) as ws:
            got = close_of(ws)
        assert got[0] == code and says in (got[1] or ""), (credential, got)
    # A forbidden or anonymous caller learns nothing about which ids exist: its refusal comes first.
    with listen(api, 99999) as ws:
        assert close_of(ws)[0] == 4401
    for missing in (99999, "abc", "1e3", "-1"):
        with listen(api, missing, reader) as ws:
            code, reason = close_of(ws)
        assert code == 4404 and "Unknown conversation id" in reason, (missing, reason)
    # The key in X-API-Key, or in the query string (browsers), works as in the Authorization header.
    with listen(api, cid, headers={"X-API-Key": reader}) as ws:
        assert subscribed(ws)["status"] == "active"
    # uvicorn logs each WebSocket's path with its query: the credential in it is hidden there.
    logged = _Collect()
    uvicorn_log = logging.getLogger("uvicorn.error")
    level = uvicorn_log.level
    uvicorn_log.addHandler(logged)
    uvicorn_log.setLevel(logging.INFO)
    try:
        with listen(api, cid, query={"token": reader}) as ws:
            assert subscribed(ws)["status"] == "active"
    finally:
        uvicorn_log.removeHandler(logged)
        uvicorn_log.setLevel(level)
    lines = [r.getMessage() for r in logged.records if "WebSocket" in r.getMessage()]
    assert lines and all("token=[hidden]" in line and reader not in line for line in lines), lines


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_an_ended_conversation_says_so_at_once(api: Api) -> None:
    key = api.key("researcher")
    actor = actor_of(api, key)
    cid = start(api, actor)
    api.service.end(cid, actor=actor)
    with listen(api, cid, key) as ws:
        assert subscribed(ws)["status"] == "ended"
        assert next_event(ws)["type"] == "ended"
        assert close_of(ws) == (1000, "conversation ended")


def test_a_listener_that_leaves_is_forgotten(api: Api) -> None:
    key = api.key("researcher")
    actor = actor_of(api, key)
    cid = start(api, actor)
    bus = _live_bus(api)
    with listen(api, cid, key) as ws:
        subscribed(ws)
        assert bus.listeners(cid) == 1
    deadline = time.monotonic() + WAIT_S
    while bus.listeners(cid) and time.monotonic() < deadline:
        time.sleep(0.02)  # the server notices the close on its own loop
    assert bus.listeners(cid) == 0
    assert api.service.send(cid, "Anyone?", actor=actor).text() == "We open at 8."


def _live_bus(api: Api) -> LocalBus:
    bus = next(o.bus for o in api.service.observers if isinstance(o, LiveObserver))
    assert isinstance(bus, LocalBus)
    return bus


def test_a_listener_that_falls_behind_is_cut_off_and_the_turn_goes_on(api: Api) -> None:
    key = api.key("researcher")
    actor = actor_of(api, key)
    cid = start(api, actor)
    bus = _live_bus(api)
    # A listener keeping up gets a queue deep enough for the whole turn; the slow one only 8 events.
    bus.max_queued = 100_000
    with listen(api, cid, key, max_size=None) as keeping_up:  # turn_stored carries the whole 16 MB reply
        subscribed(keeping_up)
        bus.max_queued = 8
        # The slow listener reads nothing while the turn runs: a tiny receive buffer and a one-message queue, so
        # the server's send waits (after the kernel's send buffer, at most 4 MB here) and its queue fills. The turn
        # is four times that in events.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", int(api.url.rsplit(":", 1)[1])))
        with connect(ws_url(api, cid), sock=sock, additional_headers={"Authorization": f"Bearer {key}"},
                     max_queue=1, open_timeout=WAIT_S) as slow:  # fmt: skip
            subscribed(slow)
            _talk_past(api, actor, cid, keeping_up, slow)
    with api.store.session() as s:
        assert s.query(TurnMetrics).filter_by(conversation_id=cid, error=None).count() == 1


def _talk_past(api: Api, actor: object, cid: int, keeping_up: ClientConnection, slow: ClientConnection) -> None:
    """A 16 MB turn: the listener keeping up gets all of it; the slow one a clean prefix, then is cut off."""
    piece = "x" * 4000
    api.backend.pieces = (piece,) * 4000
    kept: list[dict[str, Any]] = []
    reader = threading.Thread(target=lambda: kept.extend(events_until(keeping_up, "turn_stored")))
    reader.start()
    result = api.service.send(cid, "Talk a lot", actor=actor)
    assert len(result.text()) == 4000 * 4000
    reader.join(timeout=60)
    assert [e["type"] for e in kept].count("token") == 4000  # a listener keeping up misses nothing

    seen = []
    try:
        while True:
            seen.append(json.loads(slow.recv(timeout=WAIT_S)))
    except ConnectionClosed:
        pass
    assert (slow.close_code, slow.close_reason) == (1013, "listener fell too far behind")
    assert seen[-1]["type"] == "overrun" and "fell 8 events behind" in seen[-1]["message"]
    tokens = [e for e in seen if e["type"] == "token"]
    assert 0 < len(tokens) < 4000
    assert [e["index"] for e in tokens] == list(range(len(tokens)))  # what it got is a clean prefix


def test_a_subscription_is_bounded_and_publishing_never_waits() -> None:
    async def scenario() -> None:
        bus = LocalBus(max_queued=5)
        sub = await bus.subscribe(7)
        publisher = threading.Thread(
            target=lambda: [bus.publish(7, make_event("token", 7, 1, text=str(i), index=i)) for i in range(20)]
        )
        publisher.start()
        publisher.join(timeout=5)
        assert not publisher.is_alive()  # nobody read, and publishing finished anyway
        assert sub.queued() == 5
        got = [(await sub.get())["index"] for _ in range(5)]
        assert got == [0, 1, 2, 3, 4]
        with pytest.raises(ListenerOverrun, match="15 event"):
            await sub.get()
        await sub.aclose()
        assert bus.listeners(7) == 0
        bus.publish(7, make_event("ended", 7))  # no listener: nothing to do, no error

    asyncio.run(scenario())


# -- through Redis ------------------------------------------------------------------------------------------------


@pytest.fixture
def redis_settings(api_settings: Settings) -> Settings:
    redis_or_fail()
    # Channels of this run only: other runs and other people's tests share the local Redis.
    return api_settings.model_copy(
        update={"redis_url": LOCAL_REDIS, "redis_key_prefix": f"callbot-test-{uuid.uuid4().hex[:12]}"}
    )


@pytest.fixture
def redis_api(store: Store, redis_settings: Settings, backend: Scripted) -> Iterator[Api]:
    with serve(store, redis_settings, backend) as api:
        yield api


SENDER = """
import json, sys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.conversations.events import live_observers
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings

settings = Settings()
observers = live_observers(settings)
service = ConversationService(settings=settings, observers=observers)
cid = int(sys.argv[1])
with service.send(cid, "Is anyone there?", actor=LOCAL_OPERATOR) as turn:
    text = turn.text()
service.end(cid, actor=LOCAL_OPERATOR)
for observer in observers:
    observer.bus.close()  # sends what is still queued before the process goes
print(json.dumps({"text": text, "turn_id": turn.result.user_message_id}))
"""


@pytest.mark.both_stores
def test_a_turn_sent_by_another_process_reaches_listeners_here(redis_api: Api, tmp_path: Path) -> None:
    key = redis_api.key("researcher")
    actor = actor_of(redis_api, key)
    settings = redis_api.settings
    with FakeOllama(reply=("Hello", " from", " there.")) as ollama:
        cid = start(redis_api, actor, backend="ollama", model="smollm2:135m")
        with listen(redis_api, cid, key) as first, listen(redis_api, cid, key) as second:
            subscribed(first)
            subscribed(second)
            script = tmp_path / "send_turn.py"
            script.write_text(SENDER)
            env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
            env.update(
                CALLBOT_DATABASE_URL=settings.resolved_database_url(),
                CALLBOT_RUNTIME_DIR=str(tmp_path / "runtime"),
                CALLBOT_REDIS_URL=LOCAL_REDIS,
                CALLBOT_REDIS_KEY_PREFIX=settings.redis_key_prefix,
                CALLBOT_OLLAMA_URL=ollama.url,
                CALLBOT_ENV="test",
                PYTHONPATH=str(PROJECT_ROOT),
            )
            proc = subprocess.run([sys.executable, str(script), str(cid)], capture_output=True, text=True,
                                  env=env, cwd=tmp_path, timeout=120)  # fmt: skip
            assert proc.returncode == 0, proc.stderr
            sent = json.loads(proc.stdout.strip().splitlines()[-1])
            assert sent["text"] == "Hello from there."
            for ws in (first, second):
                events = events_until(ws, "ended")
                assert_a_turn(events[:-1], cid, ("Hello", " from", " there."))
                assert events[0]["turn_id"] == sent["turn_id"] and events[0]["backend"] == "ollama"
                assert events[0]["text"] == "Is anyone there?"
                assert close_of(ws) == (1000, "conversation ended")


def test_this_processs_turns_go_through_redis_too(redis_api: Api) -> None:
    key = redis_api.key("researcher")
    actor = actor_of(redis_api, key)
    cid = start(redis_api, actor)
    prefix = redis_api.settings.redis_key_prefix
    spy = redis.Redis.from_url(LOCAL_REDIS).pubsub()
    spy.subscribe(f"{prefix}:conversation:{cid}")
    try:
        assert spy.get_message(timeout=5)["type"] == "subscribe"
        with listen(redis_api, cid, key) as ws:
            subscribed(ws)
            redis_api.service.send(cid, "Hi", actor=actor).text()
            assert_a_turn(events_until(ws, "turn_stored"), cid, redis_api.backend.pieces)
        heard = []
        while (message := spy.get_message(timeout=5)) is not None:
            heard.append(json.loads(message["data"])["type"])
            if heard[-1] == "turn_stored":
                break
        assert heard[0] == "turn_started" and heard[-1] == "turn_stored"
    finally:
        spy.close()


def test_redis_down_fails_no_turn_and_listeners_are_told(
    store: Store, api_settings: Settings, backend: Scripted, caplog: pytest.LogCaptureFixture
) -> None:
    settings = api_settings.model_copy(update={"redis_url": down_url().replace("http", "redis") + "/0"})
    with serve(store, settings, backend) as api:
        key = api.key("researcher")
        actor = actor_of(api, key)
        cid = start(api, actor)
        with listen(api, cid, key) as ws:
            error = next_event(ws)
            assert error["type"] == "error" and error["code"] == "events_unavailable"
            code, reason = close_of(ws)
        assert code == 1011 and "Redis" in reason and "unreachable" in reason
        with caplog.at_level(logging.WARNING, logger="callbot_core.conversations.events"):
            assert api.service.send(cid, "Still there?", actor=actor).text() == "We open at 8."
            api.service.end(cid, actor=actor)
            deadline = time.monotonic() + WAIT_S
            while "Live events are not published" not in caplog.text and time.monotonic() < deadline:
                time.sleep(0.05)  # the publishing thread logs it
        assert "Live events are not published: Redis at 127.0.0.1:" in caplog.text


def test_losing_redis_while_listening_closes_the_listener_clearly(
    store: Store, api_settings: Settings, backend: Scripted, tmp_path: Path
) -> None:
    server_bin = shutil.which("redis-server")
    if server_bin is None:
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed")
        pytest.skip("needs redis-server to start a Redis of its own and stop it")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    own = subprocess.Popen([server_bin, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                            "no", "--dir", str(tmp_path)], stdout=subprocess.DEVNULL)  # fmt: skip
    try:
        url = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + WAIT_S
        while True:
            try:
                redis.Redis.from_url(url).ping()
                break
            except redis.ConnectionError:
                assert time.monotonic() < deadline, "the private redis-server did not start"
                time.sleep(0.05)
        with serve(store, api_settings.model_copy(update={"redis_url": url}), backend) as api:
            key = api.key("researcher")
            actor = actor_of(api, key)
            cid = start(api, actor)
            with listen(api, cid, key) as ws:
                subscribed(ws)
                api.service.send(cid, "Hi", actor=actor).text()
                assert events_until(ws, "turn_stored")[-1]["type"] == "turn_stored"
                own.terminate()
                own.wait(timeout=WAIT_S)
                error = next_event(ws)
                assert error["type"] == "error" and "connection to Redis" in error["message"]
                code, reason = close_of(ws)
            assert code == 1011 and "Redis" in reason
            # Turns go on without it.
            assert api.service.send(cid, "Hello?", actor=actor).text() == "We open at 8."
    finally:
        if own.poll() is None:
            own.kill()
            own.wait()


# -- the app's Conversations page ---------------------------------------------------------------------------------


@pytest.fixture
def app_env(store: Store, settings: Settings, backend: Scripted, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    import streamlit as st

    from callbot_core.settings import get_settings

    for name, value in {
        "CALLBOT_DATABASE_URL": settings.resolved_database_url(),
        "CALLBOT_RUNTIME_DIR": str(settings.resolved_runtime_dir()),
        "CALLBOT_LLM_BACKEND": "scripted",
    }.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("CALLBOT_REDIS_URL", raising=False)
    get_settings.cache_clear()
    st.cache_resource.clear()
    yield
    get_settings.cache_clear()
    st.cache_resource.clear()


def test_the_conversations_page_follows_an_active_conversation(
    store: Store, settings: Settings, app_env: None, backend: Scripted
) -> None:
    from callbot_core.access.signin import create_user
    from tests.app.helpers import PW, sign_in, view

    create_user(store, "ada", PW, role="admin", actor=LOCAL_OPERATOR)
    service = ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}))
    cid = service.start("receptionist", actor=LOCAL_OPERATOR, backend="scripted").id
    service.send(cid, "First question", actor=LOCAL_OPERATOR).text()

    at = sign_in("ada", PW)
    at.switch_page(view("conversations")).run()
    at.selectbox(key="conv_open_select").select(cid).run()
    follow = at.toggle(key=f"conv_follow_{cid}")
    assert follow.label == "Follow live" and not follow.value
    follow.set_value(True).run()
    assert not at.exception, at.exception
    live = [c.value for c in at.caption if ":green-badge[live]" in c.value]
    assert live and live[0].startswith(":green-badge[live] 1 turn(s)")
    chat = [m.value for m in at.markdown]
    assert "First question" in chat and "We open at 8." in chat

    # A turn from elsewhere shows on the next pass of the fragment (AppTest runs it with the page).
    backend.pieces = ("Second", " answer.")
    service.send(cid, "Second question", actor=LOCAL_OPERATOR).text()
    at.run()
    assert "Second answer." in [m.value for m in at.markdown]
    assert any(c.value.startswith(":green-badge[live] 2 turn(s)") for c in at.caption)

    # Once it ends there is nothing to follow: no toggle, no live caption.
    service.end(cid, actor=LOCAL_OPERATOR)
    at.run()
    assert not at.exception, at.exception
    assert not [t for t in at.toggle if t.key == f"conv_follow_{cid}"]
    assert not [c for c in at.caption if ":green-badge[live]" in c.value]
