"""API fixtures: the real application served by uvicorn on a loopback port, in a thread of the test process,
over the test store (SQLite and PostgreSQL) with the scripted backend registered through the real registry.

Tests talk to it with real clients: httpx, the `openai` SDK, a WebSocket client. `api.key(role, scopes)` makes
a user of that role and an API key for them; `api.token(...)` signs in with a password.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx
import pytest
import uvicorn

from callbot_core.access import apikeys
from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import create_user
from callbot_core.api import create_app
from callbot_core.conversations.service import ConversationService
from callbot_core.settings import Settings
from callbot_core.store import Store
from tests.engine.conftest import backend  # noqa: F401  (the scripted backend fixture)
from tests.engine.scripted import Scripted

PASSWORD = "correct horse battery"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """API tests run on SQLite; those marked `both_stores` run on PostgreSQL too. What the API adds is the same over
    either store, and the store itself is tested on both (tests/engine/); a PostgreSQL run of every API test doubled
    their time for nothing new."""
    dropped = [
        item
        for item in items
        if item.nodeid.startswith("tests/api/")
        and getattr(getattr(item, "callspec", None), "params", {}).get("store_url") == "postgresql"
        and item.get_closest_marker("both_stores") is None
    ]
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = [item for item in items if item not in set(dropped)]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """uvicorn serving `app` on 127.0.0.1 in a daemon thread until `stop()`."""

    def __init__(self, app: object) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="on")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self) -> LiveServer:
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("the API server did not start")
            time.sleep(0.02)  # polling the server's own started flag
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


@dataclass
class Api:
    url: str
    store: Store
    settings: Settings
    service: ConversationService
    backend: Scripted
    _users: set[str] = field(default_factory=set)

    def user(self, role: str = "researcher", name: str | None = None) -> str:
        username = name or f"{role}-user"
        if username not in self._users:
            create_user(self.store, username, PASSWORD, role=role, actor=LOCAL_OPERATOR)
            self._users.add(username)
        return username

    def key(self, role: str = "researcher", scopes: str = "chat,read", name: str | None = None) -> str:
        """A fresh API key for a user of `role` (made on first use)."""
        username = self.user(role, name)
        return apikeys.create_key(self.store, username, "test", actor=LOCAL_OPERATOR, scopes=scopes).key

    def client(self, credential: str | None = None, **kwargs: object) -> httpx.Client:
        headers = {"Authorization": f"Bearer {credential}"} if credential else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=30, **kwargs)  # type: ignore[arg-type]

    def token(self, role: str = "researcher") -> str:
        username = self.user(role)
        with self.client() as c:
            r = c.post("/v1/auth/token", json={"username": username, "password": PASSWORD})
            r.raise_for_status()
            return r.json()["access_token"]


@pytest.fixture
def api_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"llm_backend": "scripted"})


@pytest.fixture
def api(store: Store, api_settings: Settings, backend: Scripted) -> Iterator[Api]:  # noqa: F811
    service = ConversationService(store, api_settings)
    server = LiveServer(create_app(api_settings, store=store, service=service)).start()
    try:
        yield Api(url=server.url, store=store, settings=api_settings, service=service, backend=backend)
    finally:
        server.stop()
