"""LLM backends: the `LLMBackend` protocol and its registry.

A backend is chosen by configuration (`CALLBOT_LLM_BACKEND`, or a persona version's own backend); nothing else in
the engine knows which one runs. Built-ins (embedded, ollama, openai) are entry points `llm.NAME` in the
`callbot.backends` group, like any plugin's.
"""

from __future__ import annotations

from callbot_core.backends.llm.base import ChatMessage, GenerationParams, Health, LLMBackend, Token, Usage
from callbot_core.registry import Factory, Registry
from callbot_core.settings import Settings, get_settings

__all__ = [
    "ChatMessage",
    "GenerationParams",
    "Health",
    "LLMBackend",
    "Token",
    "Usage",
    "available_backends",
    "get_backend",
    "llm_backends",
    "register_backend",
    "runs_serially",
]

llm_backends: Registry[LLMBackend] = Registry("llm", what="LLM backend")


def register_backend(name: str, factory: Factory[LLMBackend]) -> None:
    """Make a backend available under `name`. Re-registering replaces it (tests use this)."""
    llm_backends.register(name, factory)


def available_backends() -> list[str]:
    return llm_backends.names()


def get_backend(name: str | None = None, settings: Settings | None = None) -> LLMBackend:
    """The backend called `name` (default: the configured one), built once per settings object."""
    settings = settings or get_settings()
    return llm_backends.get(name or settings.llm_backend, settings)


def runs_serially(backend: LLMBackend) -> bool:
    """Whether `backend` generates one reply at a time in this process (it says so with `serial = True`; the
    embedded model does: one llama.cpp context behind one lock).

    Work for such a backend is queued on one thread (comparison variants, suite cells) rather than run side by
    side: a second thread could only wait for the lock, and its TTFT would count that wait.
    """
    return bool(getattr(backend, "serial", False))
