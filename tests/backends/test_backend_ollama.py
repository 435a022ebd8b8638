"""The Ollama backend against a server that speaks Ollama's wire format on a real socket."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, LLMBackend, Token
from callbot_core.backends.llm.ollama import OllamaBackend
from callbot_core.errors import BackendError, BackendResponseError, BackendTimeout, BackendUnavailable
from tests.fake_ollama import FakeOllama, down_url

HELLO = [ChatMessage("system", "You are brief."), ChatMessage("user", "Hi")]


def backend_for(url: str, *, model: str | None = "smollm2:135m", read_timeout_s: float = 0.5) -> OllamaBackend:
    return OllamaBackend(
        url, default_model=model, connect_timeout_s=1.0, read_timeout_s=read_timeout_s, context_window=2048
    )


@pytest.fixture
def fake() -> Iterator[FakeOllama]:
    with FakeOllama() as server:
        yield server


def test_is_an_llm_backend(fake: FakeOllama) -> None:
    backend = backend_for(fake.url)
    assert isinstance(backend, LLMBackend)
    assert backend.name == "ollama"
    assert backend.where == fake.url
    assert backend.context_window() == 2048
    assert backend.count_tokens("hello there") > 0


def test_stream_yields_tokens_then_usage(fake: FakeOllama) -> None:
    tokens = list(backend_for(fake.url).stream(HELLO, GenerationParams()))

    assert [t.text for t in tokens[:-1]] == ["Hello", " there", "!"]
    assert all(t.usage is None for t in tokens[:-1])
    last = tokens[-1]
    assert last.text == "" and last.usage is not None
    usage = last.usage
    assert usage.prompt_tokens == 26
    assert usage.completion_tokens == 3
    assert usage.finish_reason == "stop"
    # Ollama reports nanoseconds; we keep milliseconds.
    assert usage.backend_prompt_eval_ms == pytest.approx(130.0)
    assert usage.backend_eval_ms == pytest.approx(650.0)
    assert usage.backend_load_ms == pytest.approx(12.345678)
    assert usage.backend_total_ms == pytest.approx(912.345678)


def test_request_carries_model_messages_and_options(fake: FakeOllama) -> None:
    params = GenerationParams(temperature=0.2, top_p=0.9, max_tokens=17, stop=("\n\n", "User:"), seed=42)
    list(backend_for(fake.url).stream(HELLO, params, model="qwen2.5:0.5b"))

    (request,) = fake.chat_requests
    body = request.body
    assert request.method == "POST"
    assert body["model"] == "qwen2.5:0.5b"
    assert body["stream"] is True
    assert body["messages"] == [
        {"role": "system", "content": "You are brief."},
        {"role": "user", "content": "Hi"},
    ]
    options = body["options"]
    assert options["temperature"] == 0.2
    assert options["top_p"] == 0.9
    assert options["num_predict"] == 17
    assert options["stop"] == ["\n\n", "User:"]
    assert options["seed"] == 42
    assert options["num_ctx"] == 2048


def test_no_seed_and_no_stop_are_left_out(fake: FakeOllama) -> None:
    list(backend_for(fake.url).stream(HELLO, GenerationParams()))
    options = fake.chat_requests[0].body["options"]
    assert "seed" not in options and "stop" not in options


def test_list_models_and_default_model(fake: FakeOllama) -> None:
    assert backend_for(fake.url).list_models() == ["smollm2:135m", "qwen2.5:0.5b"]
    # No configured model: the first one the server has.
    assert backend_for(fake.url, model=None).default_model == "smollm2:135m"
    assert backend_for(fake.url, model="qwen2.5:0.5b").default_model == "qwen2.5:0.5b"


def test_default_model_without_any_model_is_a_clear_error() -> None:
    with FakeOllama(models=()) as server, pytest.raises(BackendError, match="no models"):
        _ = backend_for(server.url, model=None).default_model


def test_health_ok(fake: FakeOllama) -> None:
    health = backend_for(fake.url).health()
    assert health.ok
    assert health.backend == "ollama"
    assert health.where == fake.url
    assert "smollm2:135m" in health.detail


def test_health_reports_a_model_that_is_not_pulled(fake: FakeOllama) -> None:
    health = backend_for(fake.url, model="llama3.2").health()
    assert not health.ok
    assert "llama3.2" in health.detail


def test_health_down_does_not_raise() -> None:
    url = down_url()
    health = backend_for(url).health()
    assert not health.ok
    assert health.where == url
    assert "not reachable" in health.detail and url in health.detail


def test_down_server_is_unavailable_naming_the_url() -> None:
    url = down_url()
    with pytest.raises(BackendUnavailable, match="not reachable") as info:
        list(backend_for(url).stream(HELLO, GenerationParams()))
    assert url in str(info.value)
    assert info.value.backend == "ollama"
    assert info.value.where == url


def test_stall_mid_stream_times_out_after_the_tokens_already_yielded() -> None:
    received: list[Token] = []
    server = FakeOllama(mode="stall", chunks_before_trouble=2, stall_s=10.0)
    with server, pytest.raises(BackendTimeout) as info:
        for token in backend_for(server.url, read_timeout_s=0.5).stream(HELLO, GenerationParams()):
            received.append(token)
    assert [t.text for t in received] == ["Hello", " there"]
    message = str(info.value)
    assert server.url in message
    assert "mid-stream after 2 tokens" in message
    assert "0.5 s" in message
    # Once tokens have gone out, a failure is never retried.
    assert len(server.chat_requests) == 1


def test_http_500_is_a_response_error_with_status_and_message() -> None:
    server = FakeOllama(mode="error500", error_message="out of memory")
    with server, pytest.raises(BackendResponseError) as info:
        list(backend_for(server.url).stream(HELLO, GenerationParams()))
    message = str(info.value)
    assert "HTTP 500" in message
    assert "out of memory" in message
    assert server.url in message


def test_error_line_mid_stream_is_a_response_error() -> None:
    received: list[str] = []
    server = FakeOllama(mode="error_midstream", chunks_before_trouble=1, error_message="runner crashed")
    with server, pytest.raises(BackendResponseError, match="runner crashed"):
        for token in backend_for(server.url).stream(HELLO, GenerationParams()):
            received.append(token.text)
    assert received == ["Hello"]


def test_one_dropped_connection_is_retried_once() -> None:
    with FakeOllama(drop_first=1) as server:
        tokens = list(backend_for(server.url).stream(HELLO, GenerationParams()))
    assert "".join(t.text for t in tokens) == "Hello there!"
    assert len(server.chat_requests) == 2


def test_a_second_dropped_connection_surfaces_as_an_error() -> None:
    with FakeOllama(drop_first=2) as server, pytest.raises(BackendUnavailable) as info:
        list(backend_for(server.url).stream(HELLO, GenerationParams()))
    assert server.url in str(info.value)
    assert len(server.chat_requests) == 2


def test_abandoning_a_stream_midway_is_clean(fake: FakeOllama) -> None:
    backend = backend_for(fake.url)
    stream = backend.stream(HELLO, GenerationParams())
    assert next(stream).text == "Hello"
    stream.close()
    # Closing the generator released the connection: the same client serves the next call.
    assert [t.text for t in backend.stream(HELLO, GenerationParams())][:1] == ["Hello"]
