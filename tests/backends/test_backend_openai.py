"""The OpenAI-compatible backend against a real server: llama-cpp-python's own, over SmolLM2."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, LLMBackend
from callbot_core.backends.llm.models import default_gguf_path
from callbot_core.backends.llm.openai_compat import OpenAICompatBackend
from callbot_core.errors import BackendResponseError, BackendUnavailable
from tests.fake_ollama import down_url

ALIAS = "smollm2"
API_KEY = "test-key-123"
STARTUP_TIMEOUT_S = 60.0
HI = [ChatMessage("user", "Say hi.")]
SHORT = GenerationParams(temperature=0.0, max_tokens=8, seed=7)

# llama-cpp-python's own server runs the real GGUF: every test here needs the model.
pytestmark = pytest.mark.model


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start_server(log_path: Path, *extra: str) -> Iterator[str]:
    """Run llama_cpp.server until the generator is closed; yields its /v1 base URL once it answers."""
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}/v1"
    cmd = [
        sys.executable, "-m", "llama_cpp.server",
        "--model", str(default_gguf_path()),
        "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", "1024", "--model_alias", ALIAS,
        *extra,
    ]  # fmt: skip
    with log_path.open("wb") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"llama_cpp.server exited with {proc.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                # Any HTTP answer (401 included) means the model is loaded: uvicorn listens only after.
                httpx.get(f"{base_url}/models", timeout=1.0, trust_env=False)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    pytest.fail(f"llama_cpp.server did not answer within {STARTUP_TIMEOUT_S} s")
                time.sleep(0.2)
        yield base_url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_server(tmp_path_factory.mktemp("llama-server") / "server.log")


@pytest.fixture(scope="module")
def keyed_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    yield from _start_server(tmp_path_factory.mktemp("llama-server-key") / "server.log", "--api_key", API_KEY)


def backend_for(url: str, *, api_key: str | None = None, model: str | None = ALIAS) -> OpenAICompatBackend:
    return OpenAICompatBackend(url, api_key=api_key, default_model=model, connect_timeout_s=2.0, read_timeout_s=30.0)


def test_is_an_llm_backend(server_url: str) -> None:
    backend = backend_for(server_url)
    assert isinstance(backend, LLMBackend)
    assert backend.name == "openai"
    assert backend.where == server_url


def test_stream_a_short_reply_with_usage(server_url: str) -> None:
    tokens = list(backend_for(server_url).stream(HI, SHORT))

    text = "".join(t.text for t in tokens)
    assert text.strip()
    assert all(t.usage is None for t in tokens[:-1])
    usage = tokens[-1].usage
    assert tokens[-1].text == "" and usage is not None
    assert usage.completion_tokens is not None and 0 < usage.completion_tokens <= SHORT.max_tokens
    assert usage.finish_reason in ("stop", "length")


def test_same_seed_and_zero_temperature_give_the_same_reply(server_url: str) -> None:
    backend = backend_for(server_url)
    first = "".join(t.text for t in backend.stream(HI, SHORT))
    second = "".join(t.text for t in backend.stream(HI, SHORT))
    assert first == second


def test_list_models_and_default_model(server_url: str) -> None:
    assert ALIAS in backend_for(server_url).list_models()
    assert backend_for(server_url, model=None).default_model == ALIAS


def test_health_ok(server_url: str) -> None:
    health = backend_for(server_url).health()
    assert health.ok, health.detail
    assert health.backend == "openai"
    assert health.where == server_url
    assert ALIAS in health.detail


def test_right_api_key_is_accepted(keyed_server_url: str) -> None:
    backend = backend_for(keyed_server_url, api_key=API_KEY)
    assert ALIAS in backend.list_models()
    assert "".join(t.text for t in backend.stream(HI, SHORT)).strip()


def test_wrong_api_key_is_refused_by_name(keyed_server_url: str) -> None:
    backend = backend_for(keyed_server_url, api_key="wrong-key")
    with pytest.raises(BackendResponseError) as info:
        list(backend.stream(HI, SHORT))
    message = str(info.value)
    assert "HTTP 401" in message
    assert "API key" in message
    assert keyed_server_url in message

    health = backend.health()
    assert not health.ok and "API key" in health.detail


def test_down_server_is_unavailable_naming_the_url() -> None:
    url = down_url() + "/v1"
    backend = backend_for(url)
    with pytest.raises(BackendUnavailable, match="not reachable") as info:
        list(backend.stream(HI, SHORT))
    assert url in str(info.value)
    assert not backend.health().ok


def test_usage_reported_in_the_stream_is_kept() -> None:
    # llama-cpp-python ignores stream_options, so the real server above never sends a usage chunk;
    # OpenAI and vLLM send it last, with empty choices. Replay that exact shape.
    events = [
        {"choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "Hi"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {"content": "!"}, "finish_reason": None}]},
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
        {"choices": [], "usage": {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    seen: list[dict[str, Any]] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(json.loads(request.content))
        return httpx.Response(200, text=body, headers={"Content-Type": "text/event-stream"})

    backend = backend_for("http://openai.invalid/v1")
    backend._client = httpx.Client(base_url="http://openai.invalid/v1", transport=httpx.MockTransport(answer))
    tokens = list(backend.stream(HI, GenerationParams(stop=("\n",), seed=3)))

    assert [t.text for t in tokens[:-1]] == ["Hi", "!"]
    usage = tokens[-1].usage
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.finish_reason) == (9, 2, "stop")
    (sent,) = seen
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True}
    assert sent["stop"] == ["\n"] and sent["seed"] == 3 and sent["model"] == ALIAS
