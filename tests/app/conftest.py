"""Fixtures for the AppTest suites: a store with an admin, a researcher and a viewer; an Ollama-protocol server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import streamlit as st

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import create_user, ensure_admin
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.app.helpers import ADMIN_PW, PW
from tests.fake_ollama import FakeOllama


@pytest.fixture(scope="module")
def fake_ollama() -> Iterator[FakeOllama]:
    with FakeOllama(reply=("Our", " hours", " are", " 8", " to", " 6", ".")) as fake:
        yield fake


@pytest.fixture(scope="module")
def app_store(tmp_path_factory: pytest.TempPathFactory, fake_ollama: FakeOllama) -> Iterator[Store]:
    tmp = tmp_path_factory.mktemp("app")
    mp = pytest.MonkeyPatch()
    for key, value in {
        "CALLBOT_DATABASE_URL": f"sqlite:///{tmp / 'app.db'}",
        "CALLBOT_RUNTIME_DIR": str(tmp / "runtime"),
        "CALLBOT_OLLAMA_URL": fake_ollama.url,
        "CALLBOT_LLM_READ_TIMEOUT_S": "2",
        "CALLBOT_LLM_BACKEND": "embedded",
    }.items():
        mp.setenv(key, value)
    get_settings.cache_clear()
    st.cache_resource.clear()
    st.cache_data.clear()
    store = Store(f"sqlite:///{tmp / 'app.db'}")
    store.upgrade()
    ensure_admin(store, ADMIN_PW)
    create_user(store, "rita", PW, role="researcher", actor=LOCAL_OPERATOR)
    create_user(store, "vera", PW, role="viewer", actor=LOCAL_OPERATOR)
    yield store
    mp.undo()
    get_settings.cache_clear()
    st.cache_resource.clear()
    st.cache_data.clear()
    store.dispose()
