"""The backend registry: built-ins come from entry points like any plugin's, factories load lazily, instances are
cached per settings object, and a test backend goes through the same registry as the real ones."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path

import pytest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.backends.embeddings import Embedder, embedders, get_embedder, similarity
from callbot_core.backends.llm import (
    ChatMessage,
    GenerationParams,
    Health,
    LLMBackend,
    Token,
    available_backends,
    get_backend,
    llm_backends,
)
from callbot_core.conversations.service import ConversationService
from callbot_core.errors import ConfigError
from callbot_core.registry import Registry
from callbot_core.settings import Settings


class EchoBackend:
    """A backend that repeats the caller: enough to drive a real turn through the service."""

    name = "echo"
    where = "this process"
    default_model = "echo-1"

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def stream(self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
               ) -> Iterator[Token]:  # fmt: skip
        for word in f"You said: {messages[-1].content}".split(" "):
            yield Token(word + " ")

    def list_models(self) -> list[str]:
        return ["echo-1"]

    def health(self) -> Health:
        return Health(True, self.name, self.where)

    def context_window(self, model: str | None = None) -> int:
        return 4096

    def count_tokens(self, text: str, model: str | None = None) -> int:
        return len(text.split())


class FixedEmbedder:
    name = "fixed"
    dimensions = 3

    def embed(self, texts: Sequence[str]) -> list[list[float]]:
        return [[1.0, float(len(t)), 0.0] for t in texts]


def plain_settings(**values: object) -> Settings:
    return Settings(_env_file=None, env="test", **values)  # type: ignore[call-arg]


@pytest.fixture
def echo() -> Iterator[None]:
    llm_backends.register("echo", EchoBackend)
    yield
    llm_backends.unregister("echo")


def test_the_built_ins_are_entry_points() -> None:
    from importlib.metadata import entry_points

    names = {ep.name for ep in entry_points(group="callbot.backends")}
    assert {"llm.embedded", "llm.ollama", "llm.openai", "embeddings.minilm"} <= names
    assert {"embedded", "ollama", "openai"} <= set(available_backends())
    assert "minilm" in embedders.names()


def test_a_fake_goes_through_the_real_registry_and_runs_a_turn(echo: None, store) -> None:
    settings = plain_settings(database_url=store.url)
    backend = get_backend("echo", settings)
    assert isinstance(backend, LLMBackend) and isinstance(backend, EchoBackend)
    service = ConversationService(store=store, settings=settings)
    info = service.start("receptionist", backend="echo", actor=LOCAL_OPERATOR)
    assert (info.backend, info.model) == ("echo", "echo-1")
    assert service.send(info.id, "hello there", actor=LOCAL_OPERATOR).text() == "You said: hello there"


def test_instances_are_cached_per_settings_object(echo: None) -> None:
    one, other = plain_settings(), plain_settings()
    assert get_backend("echo", one) is get_backend("echo", one)
    assert get_backend("echo", one) is not get_backend("echo", other)
    assert get_backend("echo", one).settings is one  # type: ignore[attr-defined]


def test_registering_a_name_again_replaces_its_instances(echo: None) -> None:
    settings = plain_settings()
    first = get_backend("echo", settings)

    class Louder(EchoBackend):
        pass

    llm_backends.register("echo", Louder)
    second = get_backend("echo", settings)
    assert isinstance(second, Louder) and second is not first


def test_an_unknown_name_lists_the_known_ones() -> None:
    with pytest.raises(ConfigError, match=r"Unknown LLM backend 'gpt9'; known: .*embedded.*ollama.*openai"):
        get_backend("gpt9", plain_settings())
    with pytest.raises(ConfigError, match="Unknown embedder 'nope'; known: .*minilm"):
        get_embedder("nope", plain_settings())


def test_concurrent_first_use_builds_one_instance() -> None:
    registry: Registry[object] = Registry("test", what="test backend")
    built: list[object] = []
    gate = threading.Barrier(8)

    def factory(settings: Settings) -> object:
        built.append(object())
        return built[-1]

    registry.register("slow", factory)
    settings = plain_settings()
    got: list[object] = []

    def worker() -> None:
        gate.wait()
        got.append(registry.get("slow", settings))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(built) == 1 and all(g is built[0] for g in got)


def test_embedders_have_a_name_and_dimensions() -> None:
    embedders.register("fixed", lambda settings: FixedEmbedder())
    try:
        embedder = get_embedder("fixed", plain_settings())
        assert isinstance(embedder, Embedder)
        assert (embedder.name, embedder.dimensions) == ("fixed", 3)
        assert similarity("ab", "ab", embedder) == pytest.approx(1.0)
        assert get_embedder(settings=plain_settings(embedder="fixed")).name == "fixed"
    finally:
        embedders.unregister("fixed")


@pytest.mark.model
def test_the_bundled_embedder_reports_what_it_is() -> None:
    embedder = get_embedder("minilm", plain_settings())
    assert (embedder.name, embedder.dimensions) == ("minilm", 384)
    assert len(embedder.embed(["hello"])[0]) == 384


def test_a_third_party_plugin_registers_through_the_entry_point_group(tmp_path: Path) -> None:
    """A package installed beside ours (a dist-info with an entry point) appears without any change to our code,
    and listing backends imports none of them (factories load lazily)."""
    (tmp_path / "callbot_echo_plugin.py").write_text(
        textwrap.dedent(
            """
            LOADED = []

            def make(settings):
                LOADED.append(settings)
                return "echo backend for " + settings.env
            """
        )
    )
    dist = tmp_path / "callbot_echo_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: callbot-echo-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[callbot.backends]\nllm.echo = callbot_echo_plugin:make\n")
    script = textwrap.dedent(
        """
        import sys
        from callbot_core.backends.llm import available_backends, llm_backends
        from callbot_core.settings import Settings
        names = available_backends()
        lazy = "callbot_echo_plugin" not in sys.modules and "llama_cpp" not in sys.modules
        got = llm_backends.get("echo", Settings(_env_file=None, env="test"))
        print(names, lazy, got)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        timeout=120,
        env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin"},
        check=True,
    ).stdout.strip()
    assert out == "['echo', 'embedded', 'ollama', 'openai'] True echo backend for test"
