"""Structured logs: one JSON object a line; every request logs one access line with its request id; lines written
during a turn carry its turn and conversation ids; message text appears only with CALLBOT_LOG_CONTENT=true."""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import structlog
from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import StreamingResponse
from sqlalchemy import select

from callbot_core.access.signin import UserInfo, get_user_info
from callbot_core.api import create_app
from callbot_core.api.auth import CurrentActor
from callbot_core.api.context import ApiContext
from callbot_core.conversations.logs import configure_logging
from callbot_core.conversations.observers import TurnObserver
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store
from callbot_core.store.models import ApiKey
from tests.api.conftest import Api, LiveServer, free_port
from tests.engine.scripted import Scripted

SECRET = "my PIN is swordfish-4711"
Lines = Callable[[Callable[[dict[str, Any]], bool], int], list[dict[str, Any]]]


class PieceLogger(TurnObserver):
    """Logs a line for every piece of a reply, as engine code logging in the middle of a turn would."""

    def token(self, turn: object, stage: object, text: str) -> None:
        logging.getLogger("callbot.test").info("piece")


def turn_route(app: FastAPI, ctx: ApiContext) -> None:
    """A route that streams a turn from the thread pool, each piece in a worker thread of its own, as the REST and
    OpenAI routes do (the test must not wait for them)."""

    @app.post("/test/conversations/{conversation_id}/turn")
    async def stream_turn(conversation_id: int, request: Request, actor: CurrentActor) -> StreamingResponse:
        text = (await request.json())["text"]
        stream = await run_in_threadpool(lambda: ctx.service.send(conversation_id, text, actor=actor))

        def pieces() -> Iterator[str]:
            with stream:
                yield from stream

        return StreamingResponse(pieces(), media_type="text/plain")


@pytest.fixture
def logged(store: Store, api_settings: Settings, backend: Scripted) -> Iterator[Callable[[bool], tuple[Api, Lines]]]:
    """`logged(log_content)`: the live API with JSON logs captured, and a function that waits for matching lines."""
    servers: list[LiveServer] = []

    def start(log_content: bool) -> tuple[Api, Lines]:
        settings = api_settings.model_copy(update={"log_content": log_content})
        service = ConversationService(store, settings, observers=[PieceLogger()])
        server = LiveServer(create_app(settings, store=store, service=service, plugins=[turn_route]))
        # After uvicorn.Config, which installs uvicorn's own logging configuration when it is built.
        out = io.StringIO()
        configure_logging(settings, stream=out)
        servers.append(server.start())

        def lines(match: Callable[[dict[str, Any]], bool], count: int = 1) -> list[dict[str, Any]]:
            # The access line is written once the response is sent: the client may read it a moment before.
            deadline = time.monotonic() + 10
            while True:
                parsed = [json.loads(line) for line in out.getvalue().splitlines()]  # every line is JSON
                found = [p for p in parsed if match(p)]
                if len(found) >= count or time.monotonic() > deadline:
                    return found
                time.sleep(0.02)  # polling a buffer the server thread writes to

        api = Api(url=server.url, store=store, settings=settings, service=service, backend=backend)
        return api, lines

    yield start
    for server in servers:
        server.stop()
    root = logging.getLogger()
    for handler in [h for h in root.handlers if type(h).__name__ == "_JsonHandler"]:
        root.removeHandler(handler)
    structlog.reset_defaults()
    logging.getLogger("uvicorn.access").disabled = False


def test_each_request_logs_one_access_line_with_who_and_how_long(logged: Callable[[bool], tuple[Api, Lines]]) -> None:
    api, lines = logged(False)
    key = api.key("researcher", scopes="chat,read")
    with api.store.session() as s:
        key_id = s.scalar(select(ApiKey.id))
    with api.client(key) as c:
        assert c.get("/metrics", headers={"X-Request-ID": "logs-1"}).status_code == 200
    with api.client() as c:
        assert c.get("/metrics", headers={"X-Request-ID": "logs-2"}).status_code == 401
        assert c.get("/nope/123", headers={"X-Request-ID": "logs-3"}).status_code == 404

    def access(request_id: str) -> dict[str, Any]:
        found = lines(lambda p: p.get("logger") == "callbot.access" and p.get("request_id") == request_id, 1)
        assert len(found) == 1, found
        return found[0]

    signed = access("logs-1")
    assert {k: signed[k] for k in ("event", "level", "method", "route", "status", "api_key_id", "username")} == {
        "event": "request", "level": "info", "method": "GET", "route": "/metrics", "status": 200,
        "api_key_id": key_id, "username": "researcher-user",
    }  # fmt: skip
    assert isinstance(signed["duration_ms"], float) and signed["duration_ms"] >= 0 and signed["timestamp"]
    anonymous = access("logs-2")
    assert (anonymous["status"], anonymous["api_key_id"], anonymous["username"]) == (401, None, None)
    assert (access("logs-3")["route"], access("logs-3")["path"]) == ("unmatched", "/nope/123")


def _researcher(api: Api) -> UserInfo:
    """The user behind `api.key("researcher")`: a conversation takes turns from the user who started it."""
    return get_user_info(api.store, api.user("researcher"))


def test_lines_during_a_turn_carry_request_and_turn_ids_and_no_text(
    logged: Callable[[bool], tuple[Api, Lines]],
) -> None:
    api, lines = logged(False)
    key = api.key("researcher", scopes="chat")
    conv = api.service.start("receptionist", actor=_researcher(api), backend="scripted")
    with api.client(key) as c:
        for request_id in ("turn-1", "turn-2"):
            path = f"/test/conversations/{conv.id}/turn"
            r = c.post(path, json={"text": SECRET}, headers={"X-Request-ID": request_id})
            assert r.status_code == 200 and r.text == "We open at 8."

    turn_ids = []
    for request_id in ("turn-1", "turn-2"):
        mine = lines(lambda p, rid=request_id: p.get("request_id") == rid and p.get("logger") == "callbot.access", 1)
        assert mine, request_id
        during = [p for p in lines(lambda p: True, 0) if p.get("request_id") == request_id]
        pieces = [p for p in during if p["event"] == "piece"]
        finished = [p for p in during if p["event"] == "turn.finished"]
        assert len(pieces) == len(api.backend.pieces) and len(finished) == 1
        ids = {(p["turn_id"], p["conversation_id"], p["user_message_id"]) for p in [*pieces, *finished]}
        assert len(ids) == 1 and next(iter(ids))[1] == conv.id
        turn_ids.append(next(iter(ids))[0])
        line = finished[0]
        assert (line["backend"], line["persona"], line["completion_tokens"]) == ("scripted", "receptionist", 4)
        assert line["ttft_ms"] <= line["total_ms"]
        assert "text" not in line and "reply" not in line
        # The request's own line is written outside the turn: the turn's ids do not leak into it.
        assert "turn_id" not in mine[0]
    assert turn_ids[0] != turn_ids[1]
    everything = "".join(json.dumps(p) for p in lines(lambda p: True, 0))
    assert "swordfish" not in everything and "We open at 8" not in everything


def test_message_text_is_logged_only_when_enabled(logged: Callable[[bool], tuple[Api, Lines]]) -> None:
    api, lines = logged(True)
    key = api.key("researcher", scopes="chat")
    conv = api.service.start("receptionist", actor=_researcher(api), backend="scripted")
    with api.client(key) as c:
        c.post(f"/test/conversations/{conv.id}/turn", json={"text": SECRET}).raise_for_status()
    (finished,) = lines(lambda p: p["event"] == "turn.finished", 1)
    assert (finished["text"], finished["reply"]) == (SECRET, "We open at 8.")


def test_content_logged_by_other_code_is_hidden_unless_enabled(logged: Callable[[bool], tuple[Api, Lines]]) -> None:
    _, lines = logged(False)
    logging.getLogger("callbot.test").info("something said", extra={"text": SECRET, "conversation_id": 7})
    structlog.get_logger("callbot.test").info("said again", text=SECRET)
    found = lines(lambda p: p["event"] in ("something said", "said again"), 2)
    assert [(p["text"], p["logger"]) for p in found] == [(f"<{len(SECRET)} chars hidden>", "callbot.test")] * 2
    assert found[0]["conversation_id"] == 7


def test_a_failed_turn_logs_its_kind(logged: Callable[[bool], tuple[Api, Lines]]) -> None:
    api, lines = logged(False)
    key = api.key("researcher", scopes="chat")
    conv = api.service.start("receptionist", actor=_researcher(api), backend="scripted")
    api.backend.fail_after = 2
    with api.client(key) as c, pytest.raises(httpx.HTTPError):
        c.post(f"/test/conversations/{conv.id}/turn", json={"text": SECRET}).read()
    (failed,) = lines(lambda p: p["event"] == "turn.failed", 1)
    assert (failed["level"], failed["kind"], failed["conversation_id"]) == ("warning", "backend_unavailable", conv.id)
    assert "scripted server went away" in failed["error"] and "text" not in failed


@pytest.mark.slow
def test_callbot_api_writes_json_lines_and_no_uvicorn_access_log(tmp_path: Path) -> None:
    callbot = str(Path(sys.executable).with_name("callbot"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("CALLBOT_")}
    env.update(CALLBOT_DATABASE_URL=f"sqlite:///{tmp_path / 'api.db'}", CALLBOT_RUNTIME_DIR=str(tmp_path / "rt"))
    subprocess.run([callbot, "db", "upgrade"], env=env, cwd=tmp_path, check=True, capture_output=True, timeout=120)
    port = free_port()
    stderr = (tmp_path / "stderr.log").open("w+")
    proc = subprocess.Popen([callbot, "api", "--port", str(port)], env=env, cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=stderr)  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "stderr.log").read_text()
            time.sleep(0.2)  # polling the starting server's port
        assert httpx.get(f"http://127.0.0.1:{port}/metrics", headers={"X-Request-ID": "cli-1"}).status_code == 401
    finally:
        proc.terminate()
        proc.wait(timeout=20)
    parsed = [json.loads(line) for line in (tmp_path / "stderr.log").read_text().splitlines()]  # every line JSON
    assert any(p.get("logger") == "uvicorn.error" for p in parsed)  # uvicorn's own lines, in the same shape
    access = [p for p in parsed if p.get("logger") == "callbot.access" and p.get("request_id") == "cli-1"]
    assert len(access) == 1 and access[0]["route"] == "/metrics" and access[0]["status"] == 401
    assert not [p for p in parsed if p.get("logger") == "uvicorn.access"]
    assert not [p for p in parsed if "GET /metrics HTTP" in str(p.get("event"))]
