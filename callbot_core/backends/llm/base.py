"""The one protocol every LLM backend speaks, and the values that cross it."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class ChatMessage:
    role: Role
    content: str


@dataclass(frozen=True, slots=True)
class GenerationParams:
    """Sampling options, typed (as in simonw/llm's Options) so every backend reads the same names."""

    temperature: float = 0.7
    top_p: float = 0.95
    max_tokens: int = 256
    stop: tuple[str, ...] = ()
    seed: int | None = None


@dataclass(slots=True)
class Usage:
    """What a backend reports once a stream ends. Backend timings are kept as the backend gave them."""

    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # Server-side timings where the backend reports them (Ollama does), in milliseconds.
    backend_prompt_eval_ms: float | None = None
    backend_eval_ms: float | None = None
    backend_load_ms: float | None = None
    backend_total_ms: float | None = None
    finish_reason: str | None = None
    extra: dict[str, object] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Token:
    """One piece of streamed text. The last token of a stream may carry `usage` and empty text."""

    text: str
    usage: Usage | None = None


@dataclass(frozen=True, slots=True)
class Health:
    ok: bool
    backend: str
    where: str
    detail: str = ""


@runtime_checkable
class LLMBackend(Protocol):
    """A chat model. `stream` yields tokens as they arrive; errors are `BackendError`s naming where."""

    name: str

    @property
    def where(self) -> str:
        """A human-readable address: a URL, or the model file for the embedded backend."""
        ...

    @property
    def default_model(self) -> str: ...

    def stream(
        self, messages: list[ChatMessage], params: GenerationParams, *, model: str | None = None
    ) -> Iterator[Token]: ...

    def list_models(self) -> list[str]: ...

    def health(self) -> Health: ...

    def context_window(self, model: str | None = None) -> int:
        """How many tokens the model can attend to (prompt plus reply)."""
        ...

    def count_tokens(self, text: str, model: str | None = None) -> int:
        """Tokens in `text`: exact where the backend has a tokenizer here, estimated otherwise."""
        ...


def estimate_tokens(text: str) -> int:
    """A conservative token estimate for backends whose tokenizer we do not have (~3.5 chars a token)."""
    return max(1, int(len(text) / 3.5) + 1) if text else 0
