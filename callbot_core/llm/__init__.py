"""LLM backends, registered by name the same way whether built in or added later.

A backend is chosen by configuration (`CALLBOT_LLM_BACKEND`, or a persona version's own backend);
nothing else in the engine knows which one runs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from ..errors import ConfigError
from ..settings import Settings, get_settings
from .base import ChatMessage, GenerationParams, Health, LLMBackend, Token, Usage

__all__ = [
    "ChatMessage",
    "GenerationParams",
    "Health",
    "LLMBackend",
    "Token",
    "Usage",
    "available_backends",
    "get_backend",
    "register_backend",
]

BackendFactory = Callable[[Settings], LLMBackend]

_factories: dict[str, BackendFactory] = {}
_instances: dict[tuple[str, int], LLMBackend] = {}
_lock = threading.Lock()


def register_backend(name: str, factory: BackendFactory) -> None:
    """Make a backend available under `name`. Re-registering replaces it (tests use this)."""
    with _lock:
        _factories[name] = factory
        for key in [k for k in _instances if k[0] == name]:
            del _instances[key]


def available_backends() -> list[str]:
    _register_builtins()
    return sorted(_factories)


def get_backend(name: str | None = None, settings: Settings | None = None) -> LLMBackend:
    """The backend called `name` (default: the configured one), built once per settings object."""
    _register_builtins()
    settings = settings or get_settings()
    name = name or settings.llm_backend
    with _lock:
        factory = _factories.get(name)
        if factory is None:
            known = ", ".join(sorted(_factories))
            raise ConfigError(f"Unknown LLM backend {name!r}; known backends: {known}")
        key = (name, id(settings))
        backend = _instances.get(key)
        if backend is None:
            backend = factory(settings)
            _instances[key] = backend
        return backend


def _embedded(settings: Settings) -> LLMBackend:
    from .embedded import EmbeddedBackend

    return EmbeddedBackend.from_settings(settings)


def _ollama(settings: Settings) -> LLMBackend:
    from .ollama import OllamaBackend

    return OllamaBackend.from_settings(settings)


def _openai(settings: Settings) -> LLMBackend:
    from .openai_compat import OpenAICompatBackend

    return OpenAICompatBackend.from_settings(settings)


_builtins_done = False


def _register_builtins() -> None:
    global _builtins_done
    if _builtins_done:
        return
    with _lock:
        for name, factory in (("embedded", _embedded), ("ollama", _ollama), ("openai", _openai)):
            _factories.setdefault(name, factory)
        _builtins_done = True
