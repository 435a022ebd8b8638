"""Sign-in sessions in the app through AppTest: the cookie signs a browser in only while its store session lives.

AppTest has no browser, so two seams stand in for it, both at the library boundary: the cookie component's `set`
is recorded (what the browser would store), and `st.context.cookies` returns what a browser would send with a
fresh page load. Everything between them is the app's own code.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime, timedelta
from pathlib import Path

import extra_streamlit_components as stx
import jwt
import pytest
import streamlit as st
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


@pytest.fixture
def navigations(monkeypatch: pytest.MonkeyPatch) -> list[list[st.Page]]:
    """Every navigation the app sends, in order: a browser shows the last one it was sent until it gets another."""
    sent: list[list[st.Page]] = []
    original = st.navigation

    def recording(pages, *args, **kwargs):  # type: ignore[no-untyped-def]
        sent.append(list(pages))
        return original(pages, *args, **kwargs)

    monkeypatch.setattr(st, "navigation", recording)
    return sent


def _listed(pages: list[st.Page]) -> list[str]:
    return [p.title for p in pages if p.visibility == "visible"]


def _cookie_writes(at: AppTest) -> list[tuple[str, str]]:
    """The sign-in cookie writes on the page, as (the cookie component's key, the cookie). A browser stores the
    cookie only once that component has loaded, and drops it unwritten if a rerun takes it off the page before."""
    writes = []
    for element in at.get("component_instance"):
        args = json.loads(element.proto.json_args)
        if args.get("method") == "set" and args.get("cookie") == COOKIE:
            writes.append((element.proto.id.split("-", 2)[2], args["value"]))  # the id is "$$ID-<hash>-<key>"
    return writes


def _cookie_deletes(at: AppTest) -> list[str]:
    """The keys of the cookie components on the page that delete the sign-in cookie."""
    return [
        element.proto.id.split("-", 2)[2]
        for element in at.get("component_instance")
        if json.loads(element.proto.json_args).get("method") == "delete"
        and json.loads(element.proto.json_args).get("cookie") == COOKIE
    ]


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


def test_signing_in_again_in_the_same_tab_writes_the_cookie(browser: Browser) -> None:
    at = sign_in("rita", PW)
    first = browser.jar[COOKIE]
    button(at, "Sign out").click()
    at.run()
    at.run()  # the rerun the cookie component triggers once it has deleted the cookie
    assert _sign_in_form_shown(at) and COOKIE not in browser.jar
    at.text_input[0].input("rita")
    at.text_input[1].input(PW)
    at.button[0].click()
    at.run()
    assert titles(at) == ["Chat"]
    # In that tab the cookie reader answers (the cookie it read is gone) and reruns the script before the component
    # writing the new cookie has loaded: the rerun must keep the write on the page, or it is never made.
    at.run()
    writes = _cookie_writes(at)
    assert len(writes) == 1 and writes[0][1] not in (first, None)
    key, cookie = writes[0]
    reload = browser.load(cookie)
    assert _signed_in(reload) and titles(reload) == ["Chat"]  # the new cookie carries the new, live session
    at.session_state[key] = True  # the component's answer: the browser has stored the cookie
    at.run()
    assert _cookie_writes(at) == [] and titles(at) == ["Chat"]  # written once; a sign-out never races a stale write


def test_a_tab_that_signed_out_lists_none_of_the_previous_users_pages(
    browser: Browser, navigations: list[list[st.Page]]
) -> None:
    at = sign_in("admin", ADMIN_PW)
    assert "Admin" in _listed(navigations[-1])
    sent = len(navigations)
    button(at, "Sign out").click()
    at.run()
    # The sign-out run itself replaces the navigation: the browser keeps showing the last one it was sent.
    assert len(navigations) == sent + 1 and _listed(navigations[-1]) == []
    at.run()
    assert _sign_in_form_shown(at) and _listed(navigations[-1]) == []
    # Each page's address stays (hidden), so the tab keeps its place and opens it after the next sign-in.
    assert {p.url_path for p in navigations[-1]} >= {"chat", "conversations", "admin"}
    at.text_input[0].input("vera")
    at.text_input[1].input(PW)
    at.button[0].click()
    at.run()
    assert titles(at) == ["Conversations"] and "Admin" not in _listed(navigations[-1])


def test_a_tab_that_never_signed_in_is_sent_no_navigation(browser: Browser, navigations: list[list[st.Page]]) -> None:
    # Its first rerun can come before the browser has said which page it asked for: a navigation would move a deep
    # link's address to the first page. The sign-in form alone, and the address stays as it was.
    at = browser.load(None)
    at.run()
    assert _sign_in_form_shown(at) and navigations == []


def test_a_sign_out_keeps_deleting_the_cookie_until_the_browser_confirms(browser: Browser) -> None:
    # Seen in CI: a sign-out right after a sign-in, and the cookie write's late answer reran the script before the
    # deleting component had loaded, so the browser kept the (dead) cookie. The deletion stays on the page, run
    # after run, until its component answers; then it goes, and a new sign-in's write replaces a pending one.
    at = sign_in("rita", PW)
    button(at, "Sign out").click()
    at.run()
    deletes = _cookie_deletes(at)
    assert len(deletes) == 1
    for _ in range(2):  # reruns before the browser has run the component (a late answer, the cookie reader)
        at.run()
        assert _cookie_deletes(at) == deletes and _sign_in_form_shown(at)
    at.session_state[deletes[0]] = True  # the component's answer: the browser has deleted the cookie
    at.run()
    assert _cookie_deletes(at) == [] and _sign_in_form_shown(at)

    at.text_input[0].input("rita")
    at.text_input[1].input(PW)
    at.button[0].click()
    at.run()
    at.run()
    assert _cookie_deletes(at) == [] and len(_cookie_writes(at)) == 1


def test_a_new_sign_in_cancels_a_deletion_not_yet_confirmed(browser: Browser) -> None:
    at = sign_in("rita", PW)
    button(at, "Sign out").click()
    at.run()
    at.run()  # the form, the deletion still waiting for the browser
    assert len(_cookie_deletes(at)) == 1 and _sign_in_form_shown(at)
    at.text_input[0].input("rita")
    at.text_input[1].input(PW)
    at.button[0].click()
    at.run()
    at.run()
    # Drawn after the write, the deletion would remove the new cookie.
    assert _cookie_deletes(at) == [] and len(_cookie_writes(at)) == 1 and titles(at) == ["Chat"]
