"""AppTest helpers shared by the app test modules: sign-in, element look-ups (fixtures are in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

APP = str(Path(__file__).resolve().parents[2] / "app" / "streamlit_app.py")
ADMIN_PW = "admin-pass-1"
PW = "long-enough-1"


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
