"""Sign-in sessions in the app through AppTest: the cookie signs a browser in only while its store session lives.

AppTest has no browser, so two seams stand in for it, both at the library boundary: the cookie component's `set`
is recorded (what the browser would store), and `st.context.cookies` returns what a browser would send with a
fresh page load. Everything between them is the app's own code.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import extra_streamlit_components as stx
import jwt
import pytest
from streamlit.runtime.context import ContextProxy, StreamlitCookies
from streamlit.testing.v1 import AppTest

from callbot_core.access.permissions import LOCAL_OPERATOR
from callbot_core.access.signin import (
    MAX_FAILED_LOGINS,
    create_user,
    delete_user,
    lock,
    reset_password,
    set_role,
)
from callbot_core.settings import get_settings
from callbot_core.store import Store
from tests.app.helpers import ADMIN_PW, APP, PW, button, new_app, sign_in, titles

COOKIE = "callbot_auth"
WRONG = "Username or password is incorrect."


class Browser:
    """The cookie jar a browser would keep: filled by the app's cookie component, sent with every new page load."""

    def __init__(self) -> None:
        self.jar: dict[str, str] = {}
        self.sent: dict[str, str] = {}
        self.deletes = 0

    def load(self, cookie: str | None) -> AppTest:
        """A fresh page load (a new tab, a reload) sending this sign-in cookie."""
        self.sent = {COOKIE: cookie} if cookie is not None else {}
        at = new_app()
        at.run()
        assert not at.exception, at.exception
        return at


@pytest.fixture
def browser(monkeypatch: pytest.MonkeyPatch, app_store: Store) -> Iterator[Browser]:
    browser = Browser()
    original_set = stx.CookieManager.set

    def recording_set(self, cookie, val, *args, **kwargs):  # type: ignore[no-untyped-def]
        browser.jar[cookie] = val
        return original_set(self, cookie, val, *args, **kwargs)

    def recording_delete(self, cookie, *args, **kwargs):  # type: ignore[no-untyped-def]
        browser.deletes += 1
        browser.jar.pop(cookie, None)
        return original_delete(self, cookie, *args, **kwargs)

    original_delete = stx.CookieManager.delete
    monkeypatch.setattr(stx.CookieManager, "set", recording_set)
    monkeypatch.setattr(stx.CookieManager, "delete", recording_delete)
    monkeypatch.setattr(ContextProxy, "cookies", property(lambda self: StreamlitCookies(dict(browser.sent))))
    yield browser


def _signed_in(at: AppTest) -> bool:
    return bool(titles(at)) and "Login" not in [b.label for b in at.button]


def _sign_in_form_shown(at: AppTest) -> bool:
    return [t.label for t in at.text_input] == ["Username", "Password"] and titles(at) == []


def _infos(at: AppTest) -> list[str]:
    return [i.value for i in at.info]


def test_a_copied_cookie_stops_working_at_sign_out(browser: Browser) -> None:
    at = sign_in("rita", PW)
    copied = browser.jar[COOKIE]
    other_tab = browser.load(copied)
    assert _signed_in(other_tab)  # the cookie does sign a fresh page in while the session lives
    button(at, "Sign out").click()
    at.run()
    stolen = browser.load(copied)
    assert _sign_in_form_shown(stolen) and "Your session has ended; please sign in again." in _infos(stolen)
    other_tab.run()  # the tab that signed in with the cookie is signed out at its next rerun
    assert _sign_in_form_shown(other_tab)


@pytest.mark.parametrize(
    ("name", "change"),
    [
        pytest.param("remy", lambda s, n: reset_password(s, n, "brand-new-pass", actor=LOCAL_OPERATOR), id="password"),
        pytest.param("rosa", lambda s, n: set_role(s, n, "viewer", actor=LOCAL_OPERATOR), id="role"),
        pytest.param("ruth", lambda s, n: lock(s, n, actor=LOCAL_OPERATOR), id="admin lock"),
        pytest.param("rudi", lambda s, n: delete_user(s, n, actor=LOCAL_OPERATOR), id="delete"),
    ],
)
def test_an_open_session_ends_when_the_account_changes(app_store: Store, browser: Browser, name: str, change) -> None:  # type: ignore[no-untyped-def]
    create_user(app_store, name, PW, role="researcher", actor=LOCAL_OPERATOR)
    at = sign_in(name, PW)
    copied = browser.jar[COOKIE]
    assert titles(at) == ["Chat"]
    change(app_store, name)
    at.run()
    assert _sign_in_form_shown(at) and "Your session has ended; please sign in again." in _infos(at)
    assert _sign_in_form_shown(browser.load(copied))


def test_a_lockout_keeps_the_open_session(app_store: Store) -> None:
    create_user(app_store, "lena", PW, role="researcher", actor=LOCAL_OPERATOR)
    at = sign_in("lena", PW)
    for _ in range(MAX_FAILED_LOGINS):  # someone else, at another browser
        assert titles(sign_in("lena", "wrong-wrong")) == []
    at.run()
    assert titles(at) == ["Chat"]  # the owner is not thrown out by someone guessing
    assert titles(sign_in("lena", PW)) == []  # but new sign-ins are refused while locked


def test_locked_and_wrong_look_the_same_at_the_form(app_store: Store) -> None:
    create_user(app_store, "lou", PW, role="researcher", actor=LOCAL_OPERATOR)
    for _ in range(MAX_FAILED_LOGINS):
        assert [e.value for e in sign_in("lou", "wrong-wrong").error] == [WRONG]
    locked = sign_in("lou", PW)
    assert [e.value for e in locked.error] == [WRONG] and titles(locked) == []


def test_a_password_with_spaces_signs_in_as_it_was_set(app_store: Store) -> None:
    create_user(app_store, "sam", "  pass word  ", role="researcher", actor=LOCAL_OPERATOR)
    assert titles(sign_in("sam", "  pass word  ")) == ["Chat"]
    assert [e.value for e in sign_in("sam", "pass word").error] == [WRONG]


def test_an_over_long_name_is_a_plain_refusal(app_store: Store) -> None:
    at = sign_in("x" * 80, PW)
    assert [e.value for e in at.error] == [WRONG]


def _forged(**header: object) -> str:
    claims = {"username": "admin", "exp_date": (datetime.now() + timedelta(days=1)).timestamp()}
    return jwt.encode(claims, "not-our-secret-but-long-enough-for-hs512-" * 2, algorithm="HS512", headers=header)


@pytest.mark.parametrize(
    "cookie",
    [
        pytest.param(
            jwt.encode({"username": "admin", "exp_date": 4102444800.0}, key=None, algorithm="none"), id="alg none"
        ),
        pytest.param(_forged(), id="HS512 another key"),
        pytest.param("not-a-jwt-at-all", id="garbage"),
    ],
)
def test_a_forged_cookie_is_a_visitor_not_a_traceback(browser: Browser, cookie: str) -> None:
    at = browser.load(cookie)
    assert _sign_in_form_shown(at)
    assert "Your session has ended; please sign in again." in _infos(at)
    assert browser.deletes == 1
    # The visitor signs in on the same page; the dead cookie is not deleted again (that would race the new one).
    at.text_input[0].input("vera")
    at.text_input[1].input(PW)
    at.button[0].click()
    at.run()
    assert titles(at) == ["Conversations"] and browser.deletes == 1 and COOKIE in browser.jar


def test_an_unsigned_old_style_cookie_with_our_key_is_refused(browser: Browser) -> None:
    # A cookie as the app signed them before sessions were stored (username and expiry only, no session token):
    # valid signature, but it names no session, so it signs nobody in.
    claims = {"username": "admin", "exp_date": (datetime.now() + timedelta(days=1)).timestamp()}
    at = browser.load(jwt.encode(claims, get_settings().secret(), algorithm="HS256"))
    assert _sign_in_form_shown(at)


def test_admin_actions_end_the_users_sessions(app_store: Store, browser: Browser) -> None:
    create_user(app_store, "nico", PW, role="researcher", actor=LOCAL_OPERATOR)
    nico = sign_in("nico", PW)
    admin = sign_in("admin", ADMIN_PW)
    admin.switch_page(str(Path(APP).parent / "views" / "admin.py")).run()
    admin.selectbox(key="admin_pw_user").select("nico")
    admin.text_input(key="admin_pw_password").input("another-pass-9")
    button(admin, "Reset password").click()
    admin.run()
    assert any("nico" in s.value and "reset" in s.value for s in admin.success)
    nico.run()
    assert _sign_in_form_shown(nico) and "Your session has ended; please sign in again." in _infos(nico)

    nico = sign_in("nico", "another-pass-9")
    assert titles(nico) == ["Chat"]
    admin.selectbox(key="admin_lock_user").select("nico")
    button(admin, "Lock").click()
    admin.run()
    assert "nico locked until unlocked; their open sessions have ended." in [s.value for s in admin.success]
    nico.run()
    assert _sign_in_form_shown(nico)
    assert titles(sign_in("nico", "another-pass-9")) == []
    admin.selectbox(key="admin_unlock_user").select("nico")
    button(admin, "Unlock").click()
    admin.run()
    assert titles(sign_in("nico", "another-pass-9")) == ["Chat"]
    assert not admin.exception and titles(admin) == ["Admin"]  # the admin's own session went on throughout
