"""Which page a rerun lands on: one that names a page goes there, one that names none stays where the session is."""

from __future__ import annotations

from streamlit.testing.v1 import AppTest

from callbot_core.store import Store
from tests.app.helpers import ADMIN_PW, PW, sign_in, titles, view


def _rerun_naming_no_page(at: AppTest) -> AppTest:
    # What a component's answer can send (seen with chromium 156: the sign-in cookie's reader, under load): a rerun
    # request with neither a page hash nor a page name. AppTest otherwise always names the page it is on.
    at._page_hash = ""
    at._finished_page_script_hash = ""
    return at.run()


def test_a_rerun_naming_no_page_stays_on_the_sessions_page(app_store: Store) -> None:
    at = sign_in("admin", ADMIN_PW)
    assert titles(at) == ["Chat"]  # a session that asked for no page opens on the first one
    at.switch_page(view("conversations")).run()
    assert titles(at) == ["Conversations"]
    assert titles(_rerun_naming_no_page(at)) == ["Conversations"]
    assert not at.exception
    # A rerun that names a page (a click on Chat in the sidebar) is obeyed, and then Chat is where the session is.
    at.switch_page(view("chat")).run()
    assert titles(at) == ["Chat"]
    assert titles(_rerun_naming_no_page(at)) == ["Chat"]


def test_a_page_the_role_lost_is_not_returned_to(app_store: Store) -> None:
    at = sign_in("rita", PW)
    at.session_state["cb_page"] = "admin"  # e.g. remembered from an address before a researcher signed in
    assert titles(_rerun_naming_no_page(at)) == ["Chat"]
    assert not at.exception
