"""One generic registry for every kind of backend (LLMs, embedders, vector stores, speech-to-text, text-to-speech).

Built-in backends and third-party ones register the same way: an entry point in the `callbot.backends` group named
`KIND.NAME` whose object is a factory taking the settings (as simonw/llm registers its default plugins through the
same hook as any plugin). Factories load lazily: listing backends imports nothing heavy, and the embedded model is
only loaded when a turn needs it. Tests and plugins may also call `register()` directly.

Instances are cached on the settings object they were built from (a private attribute, so the cache dies with the
settings and an id() can never be reused for another object's backend).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from importlib.metadata import EntryPoint, entry_points
from typing import Generic, TypeVar

from callbot_core.errors import ConfigError
from callbot_core.settings import Settings, get_settings

ENTRY_POINT_GROUP = "callbot.backends"

T = TypeVar("T")
Factory = Callable[[Settings], T]


class Registry(Generic[T]):
    """Named factories for one kind of backend, and the instances built from them per settings object."""

    def __init__(self, kind: str, *, what: str) -> None:
        self.kind = kind
        self.what = what  # how errors name the kind: "LLM backend", "embedder"…
        self._factories: dict[str, Factory[T]] = {}
        self._lock = threading.RLock()
        self._entry_points_loaded = False

    def register(self, name: str, factory: Factory[T]) -> None:
        """Make `factory` available as `name`; registering a name again replaces it (and its cached instances)."""
        with self._lock:
            self._load_entry_points()
            self._factories[name] = factory

    def unregister(self, name: str) -> None:
        with self._lock:
            self._load_entry_points()
            self._factories.pop(name, None)

    def names(self) -> list[str]:
        with self._lock:
            self._load_entry_points()
            return sorted(self._factories)

    def get(self, name: str, settings: Settings | None = None) -> T:
        """The instance called `name` for `settings` (default: the process settings), built once per settings."""
        settings = settings or get_settings()
        with self._lock:
            self._load_entry_points()
            factory = self._factories.get(name)
            if factory is None:
                known = ", ".join(sorted(self._factories)) or "none"
                raise ConfigError(f"Unknown {self.what} {name!r}; known: {known}")
            cache = settings.backend_cache()
            cached = cache.get((self.kind, name))
            # The factory is part of the entry: re-registering a name must not hand back the old one's instance.
            if cached is not None and cached[0] is factory:
                return cached[1]  # type: ignore[return-value]
            instance = factory(settings)
            cache[(self.kind, name)] = (factory, instance)
            return instance

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            kind, _, name = ep.name.partition(".")
            if kind == self.kind and name:
                # setdefault: a name registered in code before first use wins over an entry point of the same name.
                self._factories.setdefault(name, _lazy(ep))


def _lazy(ep: EntryPoint) -> Factory[T]:
    def factory(settings: Settings) -> T:
        return ep.load()(settings)

    factory.__qualname__ = f"entry point {ep.name} = {ep.value}"
    return factory
