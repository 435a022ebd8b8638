"""Engine fixtures: a fast scripted backend registered through the real registry, and a service that uses it."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from callbot_core.backends.llm import llm_backends
from callbot_core.conversations.service import ConversationService
from tests.engine.scripted import Scripted


@pytest.fixture
def backend() -> Iterator[Scripted]:
    fake = Scripted()
    llm_backends.register("scripted", lambda settings: fake)
    yield fake
    llm_backends.unregister("scripted")


@pytest.fixture
def service(store, settings, backend: Scripted) -> ConversationService:  # type: ignore[no-untyped-def]
    # The configured backend is the scripted one, resolved through the real registry.
    return ConversationService(store, settings.model_copy(update={"llm_backend": "scripted"}))
