"""AppTest helpers shared by the app test modules: a store with users, sign-in, element look-ups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

from callbot_core.auth import create_user, ensure_admin
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.fake_ollama import FakeOllama

APP = str(Path(__file__).resolve().parents[1] / "app" / "streamlit_app.py")
ADMIN_PW = "admin-pass-1"
PW = "long-enough-1"


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
    create_user(store, "rita", PW, role="researcher")
    create_user(store, "vera", PW, role="viewer")
    yield store
    mp.undo()
    get_settings.cache_clear()
    st.cache_resource.clear()
    st.cache_data.clear()
    store.dispose()


def new_app() -> AppTest:
    return AppTest.from_file(APP, default_timeout=120)


def sign_in(username: str, password: str) -> AppTest:
    at = new_app()
    at.run()
    assert [t.label for t in at.text_input] == ["Username", "Password"]
    at.text_input[0].input(username)
    at.text_input[1].input(password)
    at.button[0].click()
    at.run()
    if not at.error:
        # In a browser the cookie component reruns the script once it has stored the sign-in cookie.
        at.run()
    assert not at.exception, at.exception
    return at


def button(at: AppTest, label: str):  # type: ignore[no-untyped-def]
    return next(b for b in at.button if b.label == label)


def titles(at: AppTest) -> list[str]:
    return [t.value for t in at.title]


def known_pages_error(at: AppTest, page: str) -> str:
    with pytest.raises(ValueError, match="Known pages") as info:
        at.switch_page(page)
    return str(info.value)


def view(name: str) -> str:
    return str(Path(APP).parent / "views" / f"{name}.py")
