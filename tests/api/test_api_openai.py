"""Personas as OpenAI-compatible models, driven by the real `openai` SDK (and raw httpx where the wire matters)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import openai
import pytest
from sqlalchemy import func, select

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.llm.embedded import EmbeddedBackend
from callbot_core.personas.versions import archive_persona, save_version, set_production
from callbot_core.store.models import ApiKey, Conversation, Message, TurnMetrics, TurnStage
from tests.api.conftest import Api

RECEPTIONIST_PROMPT = "You are the receptionist"
REPLY = "We open at 8."


def sdk(api: Api, key: str) -> openai.OpenAI:
    # No retries: a 503 must reach the test once, not three times.
    return openai.OpenAI(base_url=api.url + "/v1", api_key=key, max_retries=0, timeout=30)


def _conversations(api: Api) -> list[Conversation]:
    with api.store.session() as s:
        return list(s.scalars(select(Conversation).order_by(Conversation.id)))


def _messages(api: Api, conversation_id: int) -> list[tuple[str, str]]:
    with api.store.session() as s:
        rows = s.execute(
            select(Message.role, Message.text).where(Message.conversation_id == conversation_id).order_by(Message.id)
        )
        return [(r, t) for r, t in rows]


def _turns(api: Api, conversation_id: int) -> list[TurnMetrics]:
    with api.store.session() as s:
        return list(
            s.scalars(
                select(TurnMetrics).where(TurnMetrics.conversation_id == conversation_id).order_by(TurnMetrics.id)
            )
        )


def _error(r: httpx.Response) -> tuple[int, str, str]:
    body = r.json()["error"]
    return r.status_code, body["code"], body["message"]


# -- models -----------------------------------------------------------------------------------------------------


def test_models_are_personas_and_their_versions(api: Api) -> None:
    key = api.key()
    save_version(api.store, "receptionist", {"temperature": 0.1}, actor=LOCAL_OPERATOR)
    archive_persona(api.store, "sales", actor=LOCAL_OPERATOR)
    client = sdk(api, key)
    ids = [m.id for m in client.models.list()]
    assert {"receptionist", "receptionist@1", "receptionist@2", "support", "support@1"} <= set(ids)
    assert not any(i.startswith("sales") for i in ids)  # archived
    with api.client(key) as c:
        raw = c.get("/v1/models").json()
    assert raw["object"] == "list"
    assert all(set(m) == {"id", "object", "created", "owned_by"} and m["object"] == "model" for m in raw["data"])
    assert client.models.retrieve("receptionist@2").id == "receptionist@2"
    assert [m.id for m in sdk(api, api.token()).models.list()] == ids  # a signed-in token works as the key
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("sales")

    # The bare key runs the latest version until a version is labelled production, then that one.
    def model_run(model: str) -> str:
        return client.chat.completions.create(model=model, messages=[{"role": "user", "content": "hi"}]).model

    assert model_run("receptionist") == "receptionist@2"
    set_production(api.store, "receptionist@1", actor=LOCAL_OPERATOR)
    assert model_run("receptionist") == "receptionist@1"
    assert model_run("receptionist@2") == "receptionist@2"
    with pytest.raises(openai.NotFoundError) as refused:
        model_run("sales")
    assert refused.value.code == "model_not_found"


# -- completions ------------------------------------------------------------------------------------------------


@pytest.mark.both_stores
def test_a_completion_is_a_stored_api_turn_with_metrics(api: Api) -> None:
    key = api.key()
    raw = sdk(api, key).chat.completions.with_raw_response.create(
        model="receptionist",
        messages=[{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": "When do you open?"}],
    )
    completion = raw.parse()
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == "receptionist@1"
    choice = completion.choices[0]
    assert (choice.index, choice.message.role, choice.message.content, choice.finish_reason) == (
        0, "assistant", REPLY, "stop",
    )  # fmt: skip
    usage = completion.usage
    assert usage.completion_tokens == 4 and usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens

    conversation_id = int(raw.headers["x-conversation-id"])
    (conversation,) = _conversations(api)
    assert conversation.id == conversation_id and conversation.channel == "api" and conversation.status == "active"
    with api.store.session() as s:
        key_id = s.scalar(select(ApiKey.id))
        stages = s.scalar(select(func.count()).select_from(TurnStage))
    assert conversation.api_key_id == key_id
    (turn,) = _turns(api, conversation_id)
    assert turn.error is None and turn.ttft_ms is not None and turn.total_ms is not None
    assert turn.completion_tokens == 4 and turn.prompt_tokens == usage.prompt_tokens and stages >= 4
    assert _messages(api, conversation_id)[-2:] == [("user", "When do you open?"), ("assistant", REPLY)]
    # The persona's prompt rules: the client's system message reaches neither the backend nor the store.
    sent = api.backend.requests[-1]
    assert sent[0].role == "system" and sent[0].content.startswith(RECEPTIONIST_PROMPT)
    assert not any("pirate" in m.content for m in sent)


def test_a_streamed_completion_in_openai_chunks_with_usage(api: Api) -> None:
    client = sdk(api, api.key())
    stream = client.chat.completions.create(
        model="receptionist", messages=[{"role": "user", "content": "hours?"}], stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert stream.response.headers["x-conversation-id"]
    assert all(c.object == "chat.completion.chunk" and c.model == "receptionist@1" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == REPLY
    *body, last_choice, usage_chunk = chunks
    assert last_choice.choices[0].finish_reason == "stop" and all(c.usage is None for c in body + [last_choice])
    assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 4
    assert usage_chunk.usage.total_tokens == usage_chunk.usage.prompt_tokens + 4

    (conversation,) = _conversations(api)
    assert int(stream.response.headers["x-conversation-id"]) == conversation.id
    (turn,) = _turns(api, conversation.id)
    assert turn.error is None and turn.ttft_ms is not None and turn.completion_tokens == 4

    # On the wire: no usage without include_usage, and [DONE] last.
    with api.client(api.key()) as c:
        r = c.post("/v1/chat/completions", json={"model": "support", "stream": True,
                                                 "messages": [{"role": "user", "content": "hi"}]})  # fmt: skip
    assert r.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in r.text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    assert all("usage" not in json.loads(e) for e in events[:-1])


def test_sampling_fields_reach_the_backend(api: Api) -> None:
    client = sdk(api, api.key())
    save_version(api.store, "support", {"stop_words": ["Caller:"]}, actor=LOCAL_OPERATOR)
    message = [{"role": "user", "content": "hi"}]
    client.chat.completions.create(model="support", messages=message, temperature=0.2, top_p=0.5, max_tokens=7,
                                   seed=42, stop=["END", "###"])  # fmt: skip
    params = api.backend.params[-1]
    assert (params.temperature, params.top_p, params.max_tokens, params.seed) == (0.2, 0.5, 7, 42)
    assert params.stop == ("Caller:", "END", "###")  # the persona's stop words stay
    client.chat.completions.create(model="support", messages=message, max_completion_tokens=9, stop="STOP")
    params = api.backend.params[-1]
    assert (params.max_tokens, params.stop, params.seed) == (9, ("Caller:", "STOP"), None)
    client.chat.completions.create(model="support@1", messages=message)
    params = api.backend.params[-1]  # nothing given: the version's own sampling
    assert (params.temperature, params.max_tokens, params.stop) == (0.5, 256, ())

    # A reply that used every token it was allowed (the scripted reply is 4 pieces) says so.
    def finish(max_tokens: int) -> str:
        reply = client.chat.completions.create(model="support", messages=message, max_tokens=max_tokens)
        return reply.choices[0].finish_reason

    assert (finish(4), finish(5)) == ("length", "stop")


def test_content_given_as_text_parts_is_joined(api: Api) -> None:
    client = sdk(api, api.key())
    client.chat.completions.create(
        model="receptionist",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Are you open"},
                                               {"type": "text", "text": "on Sunday?"}]}],
    )  # fmt: skip
    assert api.backend.requests[-1][-1].content == "Are you open\non Sunday?"


# -- which conversation a call continues ------------------------------------------------------------------------


def test_the_header_continues_a_conversation(api: Api) -> None:
    client = sdk(api, api.key())
    first = client.chat.completions.with_raw_response.create(
        model="receptionist", messages=[{"role": "user", "content": "Hi, I need an appointment"}]
    )
    conversation_id = first.headers["x-conversation-id"]
    second = client.chat.completions.with_raw_response.create(
        model="receptionist", messages=[{"role": "user", "content": "Tomorrow at 9?"}],
        extra_headers={"X-Conversation-Id": conversation_id},
    )  # fmt: skip
    assert second.headers["x-conversation-id"] == conversation_id
    assert len(_conversations(api)) == 1 and len(_turns(api, int(conversation_id))) == 2
    history = [(m.role, m.content) for m in api.backend.requests[-1][1:]]
    assert history[-3:] == [("user", "Hi, I need an appointment"), ("assistant", REPLY), ("user", "Tomorrow at 9?")]


@pytest.mark.both_stores
def test_the_user_field_and_resent_history_continue_a_conversation(api: Api) -> None:
    client = sdk(api, api.key())
    system = {"role": "system", "content": "ignored"}
    history = [system, {"role": "user", "content": "Hi"}]
    first = client.chat.completions.with_raw_response.create(model="receptionist", messages=history, user="caller-7")
    reply = first.parse().choices[0].message.content
    # A streamed reply reassembled by the client, with its stray spaces, is the same transcript.
    history += [{"role": "assistant", "content": f" {reply} "}, {"role": "user", "content": "Can I come today?"}]
    second = client.chat.completions.with_raw_response.create(model="receptionist", messages=history, user="caller-7")
    assert second.headers["x-conversation-id"] == first.headers["x-conversation-id"]
    (conversation,) = _conversations(api)
    assert conversation.variables["api_user"] == "caller-7"
    assert len(_turns(api, conversation.id)) == 2

    # Another tag, an edited history or another persona version start a conversation of their own.
    other_tag = client.chat.completions.with_raw_response.create(model="receptionist", messages=history, user="x")
    edited = [*history[:2], {"role": "assistant", "content": "Something else"}, history[-1]]
    forked = client.chat.completions.with_raw_response.create(model="receptionist", messages=edited, user="caller-7")
    ids = {r.headers["x-conversation-id"] for r in (first, other_tag, forked)}
    assert len(ids) == 3 and len(_conversations(api)) == 3
    # The fork holds the history as the client sent it, then its turn; the original is untouched.
    assert _messages(api, int(forked.headers["x-conversation-id"]))[1:] == [
        ("user", "Hi"), ("assistant", "Something else"), ("user", "Can I come today?"), ("assistant", REPLY),
    ]  # fmt: skip
    assert len(_turns(api, conversation.id)) == 2
    # The forked conversation is now the latest with that tag, and continues in turn.
    again = [*edited, {"role": "assistant", "content": REPLY}, {"role": "user", "content": "Thanks"}]
    third = client.chat.completions.with_raw_response.create(model="receptionist", messages=again, user="caller-7")
    assert third.headers["x-conversation-id"] == forked.headers["x-conversation-id"]


def test_history_sent_to_a_fresh_server_is_stored_before_the_turn(api: Api) -> None:
    client = sdk(api, api.key())
    raw = client.chat.completions.with_raw_response.create(
        model="receptionist",
        messages=[
            {"role": "assistant", "content": "Good morning, you've reached the clinic. How can I help you today?"},
            {"role": "user", "content": "My name is Ada"},
            {"role": "assistant", "content": "Hello Ada"},
            {"role": "user", "content": "What is my name?"},
        ],
    )
    conversation_id = int(raw.headers["x-conversation-id"])
    stored = _messages(api, conversation_id)
    # The greeting the client repeated is the conversation's own, stored once.
    assert stored == [
        ("assistant", "Good morning, you've reached the clinic. How can I help you today?"),
        ("user", "My name is Ada"), ("assistant", "Hello Ada"), ("user", "What is my name?"), ("assistant", REPLY),
    ]  # fmt: skip
    (turn,) = _turns(api, conversation_id)  # imported messages have no turn metrics
    with api.store.session() as s:
        asked = s.get(Message, turn.user_message_id)
    assert asked.text == "What is my name?"
    prompt = [(m.role, m.content) for m in api.backend.requests[-1]]
    assert ("user", "My name is Ada") in prompt and ("assistant", "Hello Ada") in prompt


def test_a_header_naming_a_conversation_the_caller_may_not_continue(api: Api) -> None:
    mine, theirs = api.key(), api.key("researcher", name="bob")
    with api.client(mine) as c:
        body = {"model": "receptionist", "messages": [{"role": "user", "content": "hi"}]}
        own = int(c.post("/v1/chat/completions", json=body).headers["x-conversation-id"])
        ended = int(c.post("/v1/chat/completions", json=body).headers["x-conversation-id"])
        api.service.end(ended, actor=LOCAL_OPERATOR)
        before = len(_conversations(api))

        def with_header(value: str | bytes, model: str = "receptionist") -> httpx.Response:
            return c.post("/v1/chat/completions", json={**body, "model": model}, headers={"X-Conversation-Id": value})

        status, code, message = _error(with_header("999999"))
        assert (status, code) == (404, "not_found") and "999999" in message
        assert _error(with_header(str(ended)))[:2] == (409, "conflict")
        status, code, message = _error(with_header(str(own), model="support"))
        assert (status, code) == (409, "conflict") and "receptionist@1" in message
        for bad in ("abc", "0", "-3", "²".encode("latin-1")):  # str.isdigit takes "²"; int() does not
            status, code, message = _error(with_header(bad))
            assert (status, code) == (422, "invalid_input") and "X-Conversation-Id" in message, bad
    with api.client(theirs) as c:
        r = c.post("/v1/chat/completions", json=body, headers={"X-Conversation-Id": str(own)})
        assert _error(r)[:2] == (404, "not_found")  # another user's conversation is not revealed
    assert len(_conversations(api)) == before and len(_turns(api, own)) == 1


# -- refusals ---------------------------------------------------------------------------------------------------

USER = {"role": "user", "content": "hi"}


@pytest.mark.parametrize(
    ("change", "status", "code", "named"),
    [
        ({"messages": [USER, {"role": "assistant", "content": "hello"}]}, 422, "invalid_input", "messages[1]"),
        ({"messages": [{"role": "system", "content": "be brief"}]}, 422, "invalid_input", "messages[0]"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/a.png"}}]}]},
         422, "invalid_input", "messages[0].content[0]"),
        ({"messages": [USER, {"role": "tool", "content": "42", "tool_call_id": "a"}, USER]}, 422, "invalid_input",
         "messages[1]"),
        ({"messages": [{"role": "user", "content": "   "}]}, 422, "invalid_input", "messages[0]"),
        ({"messages": [{"role": "user", "content": "x" * 9000}]}, 422, "invalid_input", "too long"),
        ({"messages": []}, 422, "invalid_request", "messages"),
        ({"messages": [{"role": "robot", "content": "hi"}]}, 422, "invalid_request", "role"),
        ({"temperature": 3}, 422, "invalid_input", "temperature"),
        ({"top_p": 0}, 422, "invalid_input", "top_p"),
        ({"max_tokens": 0}, 422, "invalid_input", "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, 422, "invalid_input", "max_completion_tokens"),
        ({"seed": -1}, 422, "invalid_input", "seed"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "invalid_input", "stop"),
        ({"stop": [""]}, 422, "invalid_input", "stop"),
        ({"n": 2}, 422, "invalid_input", "n must be 1"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 422, "invalid_input", "tools"),
        ({"temperature": "hot"}, 422, "invalid_request", "temperature"),
        ({"model": "nobody"}, 404, "model_not_found", "receptionist"),
        ({"model": "receptionist@9"}, 404, "model_not_found", "available"),
    ],
)  # fmt: skip
def test_bad_input_is_refused_naming_it_and_nothing_is_stored(
    api: Api, change: dict, status: int, code: str, named: str
) -> None:
    with api.client(api.key()) as c:
        r = c.post("/v1/chat/completions", json={"model": "receptionist", "messages": [USER], **change})
    got_status, got_code, message = _error(r)
    assert (got_status, got_code) == (status, code), message
    assert named in message and "\n" not in message
    assert _conversations(api) == [] and api.backend.requests == []


def test_the_sdk_raises_our_errors_with_our_message(api: Api) -> None:
    client = sdk(api, api.key())
    with pytest.raises(openai.UnprocessableEntityError) as bad:
        client.chat.completions.create(model="receptionist", messages=[USER], temperature=5)
    assert bad.value.code == "invalid_input" and "temperature must be between 0 and 2" in bad.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="nobody", messages=[USER])
    assert unknown.value.code == "model_not_found" and "receptionist" in unknown.value.message
    with pytest.raises(openai.AuthenticationError) as anonymous:
        sdk(api, "cbk_not-a-key").chat.completions.create(model="receptionist", messages=[USER])
    assert "API key" in anonymous.value.message
    with pytest.raises(openai.AuthenticationError):
        sdk(api, "cbk_not-a-key").models.list()
    for key in (api.key("viewer"), api.key(scopes="read", name="reader")):
        with pytest.raises(openai.PermissionDeniedError) as refused:
            sdk(api, key).chat.completions.create(model="receptionist", messages=[USER], stream=True)
        assert refused.value.code == "forbidden" and "chat" in refused.value.message
    assert _conversations(api) == []


# -- a backend that fails, a client that leaves -----------------------------------------------------------------


def test_a_backend_down_is_a_503_and_a_failed_turn(api: Api) -> None:
    client = sdk(api, api.key())
    api.backend.fail_after = 0
    with pytest.raises(openai.InternalServerError) as down:
        client.chat.completions.create(model="receptionist", messages=[USER])
    assert down.value.status_code == 503 and down.value.code == "backend_unavailable"
    # Streaming, down before the first token: the same plain 503, before any event.
    with pytest.raises(openai.InternalServerError) as down_streaming:
        client.chat.completions.create(model="receptionist", messages=[USER], stream=True)
    assert down_streaming.value.status_code == 503
    # Down mid-stream: the events so far, then an error event the SDK raises.
    api.backend.fail_after = 2
    received = []
    with pytest.raises(openai.APIError) as cut:
        for chunk in client.chat.completions.create(model="receptionist", messages=[USER], stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "We open" and "went away" in cut.value.message
    conversations = _conversations(api)
    assert len(conversations) == 3
    for conversation in conversations:
        (turn,) = _turns(api, conversation.id)
        assert turn.error is not None and "went away" in turn.error and turn.assistant_message_id is None


def test_a_client_leaving_mid_stream_stores_the_turn_as_interrupted(api: Api) -> None:
    api.backend.gate = threading.Event()
    with api.client(api.key()) as c:
        body = {"model": "receptionist", "stream": True, "messages": [USER]}
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            conversation_id = int(r.headers["x-conversation-id"])
            lines = r.iter_lines()
            while "We" not in next(lines):  # the first piece arrived; the next waits on the gate
                pass
    # The client has gone; give the server a moment to see it, then let the backend go on.
    time.sleep(0.3)
    api.backend.gate.set()
    deadline = time.monotonic() + 10
    while not (turns := _turns(api, conversation_id)) and time.monotonic() < deadline:
        time.sleep(0.05)  # polling the store for the turn's end
    (turn,) = turns
    assert turn.error is not None and turn.error.startswith("interrupted") and turn.assistant_message_id is None


# -- the real model ---------------------------------------------------------------------------------------------


def test_the_embedded_model_streams_through_the_sdk(api: Api, embedded: EmbeddedBackend) -> None:
    version = save_version(api.store, "assistant", {"backend": "embedded", "max_tokens": 8}, actor=LOCAL_OPERATOR)
    client = sdk(api, api.key())
    stream = client.chat.completions.create(
        model=version.ref, messages=[{"role": "user", "content": "Say hello."}], stream=True, max_tokens=6,
        temperature=0, seed=1, stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    usage = chunks[-1].usage
    assert text.strip() and 0 < usage.completion_tokens <= 6 and usage.prompt_tokens > 0
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")
    (conversation,) = _conversations(api)
    assert conversation.backend == "embedded" and conversation.channel == "api"
    (turn,) = _turns(api, conversation.id)
    assert turn.error is None and turn.ttft_ms is not None and turn.completion_tokens == usage.completion_tokens
