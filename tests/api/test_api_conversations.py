"""Conversations and turns over HTTP: a whole conversation, bad input refused with nothing stored, who may chat, the
reply as server-sent events (tokens, then the stored turn's metrics), a backend failing mid-stream, a client that
hangs up mid-stream."""

from __future__ import annotations

import csv
import io
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select

from callbot_core.backends.llm import GenerationParams
from callbot_core.store.models import AuditLog, Conversation, Message, RunningTurn, TurnMetrics
from tests.api.conftest import Api

REPLY = "We open at 8."


def _error(r: httpx.Response) -> tuple[int, str]:
    return r.status_code, r.json()["error"]["code"]


def _start(c: httpx.Client, persona: str = "receptionist", **extra: Any) -> dict[str, Any]:
    r = c.post("/v1/conversations", json={"persona": persona, **extra})
    assert r.status_code == 201, r.text
    return r.json()


def _events(lines: Iterator[str]) -> list[tuple[str, dict[str, Any]]]:
    """Server-sent events as (event, data) pairs, read the way a browser's EventSource reads them."""
    out: list[tuple[str, dict[str, Any]]] = []
    event, data = "message", []
    for line in lines:
        if line == "":
            if data:
                out.append((event, json.loads("\n".join(data))))
            event, data = "message", []
        elif line.startswith("event:"):
            event = line[len("event:") :].strip()
        elif line.startswith("data:"):
            data.append(line[len("data:") :].strip())
    return out


def _stream_turn(c: httpx.Client, cid: int, text: str, **kwargs: Any) -> tuple[httpx.Response, list]:
    with c.stream("POST", f"/v1/conversations/{cid}/turns", json={"text": text}, **kwargs) as r:
        if r.headers["content-type"].startswith("application/json"):
            r.read()
            return r, []
        return r, _events(r.iter_lines())


def _stored(api: Api, model: type, **where: Any) -> list[Any]:
    with api.store.session() as s:
        query = select(model)
        for name, value in where.items():
            query = query.where(getattr(model, name) == value)
        rows = list(s.scalars(query))
        s.expunge_all()
        return rows


def _count(api: Api, model: type) -> int:
    with api.store.session() as s:
        return s.scalar(select(func.count()).select_from(model)) or 0


@pytest.mark.both_stores
def test_a_whole_conversation_start_chat_show_search_export_end_delete(api: Api) -> None:
    researcher = api.key("researcher")
    admin = api.key("admin", scopes="chat,read,admin", name="boss")
    with api.client(researcher) as c:
        conv = _start(c, "receptionist@1", variables={"caller_name": "Anna"})
        cid = conv["id"]
        assert conv["persona"] == "receptionist" and conv["version"] == 1
        assert conv["backend"] == "scripted" and conv["model"] == "script-1"
        assert conv["channel"] == "api" and conv["status"] == "active" and conv["greeting"]

        r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "When do you open?"})
        assert r.status_code == 200, r.text
        first = r.json()
        assert first["text"] == REPLY and first["error"] is None
        assert first["completion_tokens"] == 4 and first["prompt_tokens"] > 0
        assert first["ttft_ms"] is not None and first["total_ms"] >= first["ttft_ms"]
        assert first["assistant_message_id"] > first["user_message_id"]

        r, events = _stream_turn(c, cid, "And on Saturday?", params={"stream": "true"})
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert [e for e, _ in events] == ["token"] * 4 + ["turn"]
        assert "".join(d["text"] for e, d in events if e == "token") == REPLY

        shown = c.get(f"/v1/conversations/{cid}").json()
        assert [m["role"] for m in shown["messages"]] == ["assistant", "user", "assistant", "user", "assistant"]
        assert shown["messages"][1]["text"] == "When do you open?"
        assert shown["messages"][2]["ttft_ms"] == first["ttft_ms"]
        assert shown["turns"] == 2 and shown["failed_turns"] == 0 and shown["username"] == "researcher-user"
        assert shown["system_prompt"]

        hits = c.get("/v1/conversations/search", params={"q": "Saturday"}).json()
        assert any(h["conversation_id"] == cid and h["source"] == "message" for h in hits)

        listed = c.get("/v1/conversations", params={"channel": "api", "persona": "receptionist"}).json()
        assert [row["id"] for row in listed["items"]] == [cid] and listed["items"][0]["turns"] == 2

        export = c.get("/v1/conversations/export", params={"format": "csv", "ids": str(cid)})
        assert export.status_code == 200
        assert export.headers["content-type"].startswith("text/csv")
        assert export.headers["content-disposition"].startswith("attachment;")
        rows = list(csv.DictReader(io.StringIO(export.text)))
        assert [r["role"] for r in rows] == ["assistant", "user", "assistant", "user", "assistant"]
        assert {r["conversation_id"] for r in rows} == {str(cid)}
        jsonl = c.get("/v1/conversations/export", params={"format": "jsonl", "ids": str(cid)})
        assert jsonl.headers["content-type"].startswith("application/jsonl")
        assert ".jsonl" in jsonl.headers["content-disposition"]
        docs = [json.loads(line) for line in jsonl.text.splitlines()]
        assert len(docs) == 1 and docs[0]["conversation_id"] == cid and len(docs[0]["messages"]) == 5

        ended = c.post(f"/v1/conversations/{cid}/end")
        assert ended.status_code == 200, ended.text
        assert ended.json()["status"] == "ended" and ended.json()["summary_short"]
        assert ended.json()["summary_error"] is None
        assert _error(c.post(f"/v1/conversations/{cid}/turns", json={"text": "Hello?"})) == (409, "conflict")

        refused = c.delete(f"/v1/conversations/{cid}")
        assert _error(refused) == (403, "forbidden")
    with api.client(admin) as c:
        assert c.delete(f"/v1/conversations/{cid}").status_code == 204
        assert _error(c.get(f"/v1/conversations/{cid}")) == (404, "not_found")
        assert _error(c.delete(f"/v1/conversations/{cid}")) == (404, "not_found")
    deleted = _stored(api, AuditLog, action="conversation.delete")
    assert [(a.actor, a.target) for a in deleted] == [("boss", str(cid))]


def test_a_summariser_that_fails_still_ends_the_conversation_and_says_so(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        assert c.post(f"/v1/conversations/{cid}/turns", json={"text": "Hi"}).status_code == 200
        api.backend.fail_after = 0  # the summariser uses the conversation's backend
        r = c.post(f"/v1/conversations/{cid}/end")
        assert r.status_code == 200, r.text
        assert r.json()["status"] == "ended" and r.json()["summary_short"] is None
        assert "went away" in r.json()["summary_error"]
        assert c.get(f"/v1/conversations/{cid}").json()["status"] == "ended"


@pytest.mark.both_stores
def test_listing_filters_and_pages(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        ids = [_start(c, p)["id"] for p in ("receptionist", "receptionist", "support")]
        c.post(f"/v1/conversations/{ids[0]}/end")
        page = c.get("/v1/conversations", params={"limit": 2}).json()
        assert [r["id"] for r in page["items"]] == [ids[2], ids[1]] and page["next_offset"] == 2
        rest = c.get("/v1/conversations", params={"limit": 2, "offset": 2}).json()
        assert [r["id"] for r in rest["items"]] == [ids[0]] and rest["next_offset"] is None
        assert [r["id"] for r in c.get("/v1/conversations", params={"status": "ended"}).json()["items"]] == [ids[0]]
        assert [r["id"] for r in c.get("/v1/conversations", params={"persona": "support"}).json()["items"]] == [ids[2]]
        assert c.get("/v1/conversations", params={"channel": "text"}).json()["items"] == []
        assert c.get("/v1/conversations", params={"since": "2999-01-01"}).json()["items"] == []
        assert len(c.get("/v1/conversations", params={"until": "2999-01-01T00:00:00Z"}).json()["items"]) == 3
        assert len(c.get("/v1/conversations", params={"username": "researcher-user"}).json()["items"]) == 3
        assert c.get("/v1/conversations", params={"username": "nobody"}).json()["items"] == []
        for bad in (
            {"limit": 501}, {"limit": 0}, {"offset": -1}, {"status": "paused"}, {"since": "yesterday"},
            {"since": "0001-01-01T00:00:00+01:00"}, {"username": "a\u0000"},
        ):  # fmt: skip
            assert _error(c.get("/v1/conversations", params=bad)) == (422, "invalid_request"), bad
        everything = c.get("/v1/conversations/export", params={"format": "jsonl"})
        assert sorted(json.loads(line)["conversation_id"] for line in everything.text.splitlines()) == sorted(ids)
        assert _error(c.get("/v1/conversations/export", params={"ids": f"{ids[0]},999999"})) == (404, "not_found")
        assert _error(c.get("/v1/conversations/export", params={"ids": "1;2"})) == (422, "invalid_request")
        assert _error(c.get("/v1/conversations/export", params={"format": "xml"})) == (422, "invalid_request")
        assert _error(c.get("/v1/conversations/search", params={"q": ""})) == (422, "invalid_request")


START_REFUSALS = [
    pytest.param({}, 422, "invalid_request", id="no-persona"),
    pytest.param({"persona": 5}, 422, "invalid_request", id="persona-not-text"),
    pytest.param({"persona": "nobody"}, 404, "not_found", id="unknown-persona"),
    pytest.param({"persona": "receptionist@99"}, 404, "not_found", id="unknown-version"),
    pytest.param({"persona": "receptionist@two"}, 422, "invalid_request", id="version-not-a-number"),
    pytest.param({"persona": "receptionist@99999999999"}, 422, "invalid_request", id="version-too-large"),
    pytest.param({"persona": "receptionist", "backend": "nope"}, 422, "invalid_input", id="unknown-backend"),
    pytest.param({"persona": "receptionist", "variables": {"bad name": "x"}}, 422, "invalid_input", id="bad-variable"),
    pytest.param({"persona": "receptionist", "variables": {"a": 1}}, 422, "invalid_request", id="variable-not-text"),
    pytest.param({"persona": "receptionist", "channel": "voice"}, 422, "invalid_request", id="unknown-field"),
    pytest.param({"persona": "recep\u0000tionist"}, 422, "invalid_request", id="nul"),
]


@pytest.mark.parametrize(("body", "status", "code"), START_REFUSALS)
def test_a_bad_start_is_refused_naming_what_and_stores_nothing(
    api: Api, body: dict[str, Any], status: int, code: str
) -> None:
    with api.client(api.key("researcher")) as c:
        r = c.post("/v1/conversations", json=body)
    assert _error(r) == (status, code), r.text
    assert r.json()["error"]["message"] and "\n" not in r.json()["error"]["message"]
    assert _count(api, Conversation) == 0


TURN_REFUSALS = [
    pytest.param({"text": ""}, 422, "invalid_input", "empty", id="empty"),
    pytest.param({"text": " \n\t "}, 422, "invalid_input", "empty", id="blank"),
    pytest.param({"text": 5}, 422, "invalid_request", "text", id="not-text"),
    pytest.param({}, 422, "invalid_request", "text", id="no-text"),
    pytest.param({"text": "x" * 8001}, 422, "invalid_input", "too long", id="too-long"),
    pytest.param({"text": "hi", "params": {"temperature": 5}}, 422, "invalid_request", "temperature", id="temp"),
    pytest.param({"text": "hi", "params": {"max_tokens": 0}}, 422, "invalid_request", "max_tokens", id="max-tokens"),
    pytest.param({"text": "hi", "params": {"top_p": 0}}, 422, "invalid_request", "top_p", id="top-p"),
    pytest.param({"text": "hi", "params": {"temprature": 1}}, 422, "invalid_request", "temprature", id="typo"),
    pytest.param({"text": "hi", "params": {"stop": "x"}}, 422, "invalid_request", "stop", id="stop-not-list"),
]


@pytest.mark.parametrize(("body", "status", "code", "named"), TURN_REFUSALS)
def test_a_bad_turn_is_refused_naming_what_and_stores_nothing(
    api: Api, body: dict[str, Any], status: int, code: str, named: str
) -> None:
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        before = _count(api, Message)
        for stream in ("false", "true"):  # refused before a stream starts: JSON either way
            r = c.post(f"/v1/conversations/{cid}/turns", json=body, params={"stream": stream})
            assert _error(r) == (status, code), r.text
            assert named in r.json()["error"]["message"]
    assert _count(api, Message) == before and _count(api, TurnMetrics) == 0


def test_unknown_and_ended_conversations_and_bad_ids(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        assert _error(c.post("/v1/conversations/999999/turns", json={"text": "hi"})) == (404, "not_found")
        assert _error(c.get("/v1/conversations/999999")) == (404, "not_found")
        assert _error(c.post("/v1/conversations/999999/end")) == (404, "not_found")
        for bad in ("abc", "0", "-3", "99999999999"):
            assert _error(c.get(f"/v1/conversations/{bad}")) == (422, "invalid_request"), bad
        cid = _start(c)["id"]
        assert c.post(f"/v1/conversations/{cid}/end").status_code == 200
        before = _count(api, Message)
        r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "hi"}, headers={"Accept": "text/event-stream"})
        assert _error(r) == (409, "conflict") and "has ended" in r.json()["error"]["message"]
        assert _count(api, Message) == before


def test_a_viewer_reads_but_may_not_chat(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
    with api.client(api.key("viewer")) as c:
        r = c.post("/v1/conversations", json={"persona": "receptionist"})
        assert _error(r) == (403, "forbidden") and "viewer" in r.json()["error"]["message"]
        for stream in ("false", "true"):
            r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "hi"}, params={"stream": stream})
            assert _error(r) == (403, "forbidden")
        assert _error(c.post(f"/v1/conversations/{cid}/end")) == (403, "forbidden")
        assert c.get(f"/v1/conversations/{cid}").status_code == 200
        assert [r["id"] for r in c.get("/v1/conversations").json()["items"]] == [cid]
    assert _count(api, Conversation) == 1 and _count(api, Message) == 1  # the greeting only


def test_a_read_only_key_may_read_but_not_chat(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
    with api.client(api.key("researcher", scopes="read")) as c:
        r = c.post("/v1/conversations", json={"persona": "receptionist"})
        assert _error(r) == (403, "forbidden") and "'chat' scope" in r.json()["error"]["message"]
        r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "hi"}, params={"stream": "true"})
        assert _error(r) == (403, "forbidden") and "'chat' scope" in r.json()["error"]["message"]
        assert c.get(f"/v1/conversations/{cid}").status_code == 200
    with api.client(api.key("researcher", scopes="chat")) as c:  # and a chat-only key may not read transcripts
        assert _error(c.get(f"/v1/conversations/{cid}")) == (403, "forbidden")
    assert _count(api, Message) == 1


def test_another_researchers_key_may_read_a_conversation_but_not_change_it(api: Api) -> None:
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
    with api.client(api.key("researcher", name="rob")) as c:
        for stream in ("false", "true"):
            r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "hi"}, params={"stream": stream})
            assert _error(r) == (403, "forbidden") and "only the user who started it" in r.json()["error"]["message"]
        assert _error(c.post(f"/v1/conversations/{cid}/end")) == (403, "forbidden")
        assert c.get(f"/v1/conversations/{cid}").status_code == 200
    assert _count(api, Message) == 1  # the greeting only
    with api.client(api.key("admin")) as c:  # an admin may step in
        r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "hi"})
        assert r.status_code == 200, r.text


def test_the_event_stream_ends_with_the_stored_turns_metrics(api: Api) -> None:
    api.backend.pieces = ("Open", " from", " 8", " to", " 6", ".")
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        # Asked for by the Accept header this time.
        r, events = _stream_turn(c, cid, "Hours?", headers={"Accept": "text/event-stream"})
    assert r.status_code == 200 and r.headers["cache-control"] == "no-cache"
    kinds = [e for e, _ in events]
    assert kinds == ["token"] * 6 + ["turn"]
    assert [d["text"] for _, d in events[:-1]] == list(api.backend.pieces)
    turn = events[-1][1]
    assert turn["text"] == "Open from 8 to 6." and turn["conversation_id"] == cid and turn["error"] is None
    (stored,) = _stored(api, TurnMetrics, conversation_id=cid)
    for name in ("user_message_id", "assistant_message_id", "ttft_ms", "total_ms", "prompt_tokens",
                 "completion_tokens", "tokens_per_s", "trimmed_messages", "error"):  # fmt: skip
        assert turn[name] == getattr(stored, name), name
    assert stored.completion_tokens == 6
    assert _stored(api, RunningTurn) == []


def test_turn_params_override_the_versions_sampling_for_that_turn(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[GenerationParams] = []
    original = api.backend.stream

    def recording(messages: list, params: GenerationParams, *, model: str | None = None) -> Iterator:
        seen.append(params)
        return original(messages, params, model=model)

    monkeypatch.setattr(api.backend, "stream", recording)
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        body = {"text": "hi", "params": {"temperature": 0.1, "max_tokens": 7, "seed": 42, "stop": ["Bye"]}}
        assert c.post(f"/v1/conversations/{cid}/turns", json=body).status_code == 200
        assert c.post(f"/v1/conversations/{cid}/turns", json={"text": "again"}).status_code == 200
    assert seen[0] == GenerationParams(temperature=0.1, top_p=0.95, max_tokens=7, stop=("Bye",), seed=42)
    assert seen[1].temperature != 0.1 and seen[1].max_tokens == 256 and seen[1].seed is None


def test_a_backend_failing_mid_stream_sends_an_error_event_and_stores_a_failed_turn(api: Api) -> None:
    api.backend.fail_after = 2
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        r, events = _stream_turn(c, cid, "Hours?", params={"stream": "true"})
    assert r.status_code == 200
    assert [e for e, _ in events] == ["token", "token", "error"]
    error = events[-1][1]
    assert error["code"] == "backend_unavailable" and "went away" in error["message"]
    (stored,) = _stored(api, TurnMetrics, conversation_id=cid)
    assert stored.error and stored.assistant_message_id is None
    assert error["turn"]["user_message_id"] == stored.user_message_id and error["turn"]["error"] == stored.error
    roles = [m.role for m in _stored(api, Message, conversation_id=cid)]
    assert roles == ["assistant", "user"]  # the greeting and the caller's message; no half reply
    assert _stored(api, RunningTurn) == []


@pytest.mark.parametrize("stream", ["false", "true"])
def test_a_backend_that_is_down_is_a_503_and_a_failed_turn(api: Api, stream: str) -> None:
    api.backend.fail_after = 0
    with api.client(api.key("researcher")) as c:
        cid = _start(c)["id"]
        r = c.post(f"/v1/conversations/{cid}/turns", json={"text": "Hours?"}, params={"stream": stream})
    assert r.headers["content-type"].startswith("application/json")
    assert _error(r) == (503, "backend_unavailable")
    (stored,) = _stored(api, TurnMetrics, conversation_id=cid)
    assert stored.error and stored.assistant_message_id is None
    assert _stored(api, RunningTurn) == []


class SlowPieces:
    """A reply that takes seconds to stream: one word at once, then one every `gap_s`."""

    def __init__(self, words: int = 200, gap_s: float = 0.05) -> None:
        self.words = words
        self.gap_s = gap_s
        self.stop = threading.Event()

    def __iter__(self) -> Iterator[str]:
        yield "Hello"
        for i in range(self.words):
            if self.stop.wait(self.gap_s):  # the test is over: end at once
                return
            yield f" word{i}"


@pytest.mark.both_stores
def test_a_client_that_hangs_up_mid_stream_leaves_the_turn_interrupted(api: Api) -> None:
    slow = SlowPieces()
    api.backend.pieces = slow  # type: ignore[assignment]
    try:
        with api.client(api.key("researcher")) as c:
            cid = _start(c)["id"]
            with c.stream("POST", f"/v1/conversations/{cid}/turns", json={"text": "Talk"},
                          params={"stream": "true"}) as r:  # fmt: skip
                assert r.status_code == 200
                first = next(line for line in r.iter_lines() if line.startswith("data:"))
                assert json.loads(first[5:]) == {"text": "Hello"}
            # Leaving the block closed the connection with the reply still streaming.
        deadline = time.monotonic() + 15
        stored: list[TurnMetrics] = []
        while not stored and time.monotonic() < deadline:
            stored = _stored(api, TurnMetrics, conversation_id=cid)
            time.sleep(0.05)  # polling the store for the turn's end
        assert stored, "the turn was never stored"
        assert stored[0].error is not None and stored[0].error.startswith("interrupted")
        assert stored[0].assistant_message_id is None
        assert _stored(api, RunningTurn) == []
    finally:
        slow.stop.set()
