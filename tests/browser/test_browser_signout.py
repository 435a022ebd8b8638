"""Sign out, then sign in again in the same tab (issue 11): the second sign-in writes its cookie like the first, and
a signed-out tab lists none of the previous user's pages."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import (
    ADMIN_PASSWORD,
    ADMIN_USERNAME,
    AUTH_COOKIE,
    IN_CI,
    MISSING,
    RunningApp,
    screenshot,
    sign_in,
    wait_for_auth_cookie,
    wait_signed_in,
)

if TYPE_CHECKING:
    from playwright.sync_api import Locator, Page

pytestmark = pytest.mark.skipif(MISSING is not None and not IN_CI, reason=MISSING or "")


def _form(page: Page) -> Locator:
    return page.locator("[data-testid=stForm]").filter(has_text="Sign in to Callbot Workbench")


def _nav_links(page: Page) -> Locator:
    return page.locator("[data-testid=stSidebarNav] a, [data-testid=stTopNavLink], [data-testid=stSidebarNavLink]")


def _auth_cookie(page: Page) -> str | None:
    return next((c["value"] for c in page.context.cookies() if c["name"] == AUTH_COOKIE), None)


def _wait_cookie_gone(page: Page, timeout_s: float = 15.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if _auth_cookie(page) is None:
            return
        time.sleep(0.1)  # polling the browser's cookie jar, not waiting for time to pass
    raise AssertionError(f"the sign-in cookie {AUTH_COOKIE!r} was still there {timeout_s:.0f} s after sign-out")


def _sign_out(page: Page) -> None:
    from playwright.sync_api import expect

    page.get_by_role("button", name="Sign out").click()
    expect(_form(page)).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_have_count(0)
    _wait_cookie_gone(page)


def _sign_in_here(page: Page) -> None:
    """Fill the form already on the page: no navigation, so this is the same tab and the same Streamlit session."""
    form = _form(page)
    form.get_by_role("textbox", name="Username", exact=True).fill(ADMIN_USERNAME)
    form.get_by_role("textbox", name="Password", exact=True).fill(ADMIN_PASSWORD)
    form.get_by_role("button", name="Login").click()
    wait_signed_in(page)


def _heading(page: Page) -> str:
    from playwright.sync_api import expect

    expect(page.get_by_role("heading", level=1)).to_have_count(1)
    return page.get_by_role("heading", level=1).inner_text()


def test_signing_in_again_in_the_same_tab_writes_the_cookie(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    first = _auth_cookie(page)
    _sign_out(page)

    _sign_in_here(page)
    wait_for_auth_cookie(page)
    second = _auth_cookie(page)
    assert second is not None and second != first  # a new session, so a new cookie
    screenshot(page, "signout_01_signed_in_again")

    page.reload()
    expect(page.get_by_role("button", name="Sign out").or_(_form(page))).to_be_visible()
    screenshot(page, "signout_02_reload_after_second_sign_in")
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(_form(page)).to_have_count(0)

    page.goto(app.base_url + "/conversations")
    expect(page.get_by_role("button", name="Sign out").or_(_form(page))).to_be_visible()
    expect(page.get_by_role("button", name="Sign out")).to_be_visible()
    expect(page.get_by_role("heading", name="Conversations", level=1)).to_be_visible()
    screenshot(page, "signout_03_deep_link_after_second_sign_in")
    assert _heading(page) == "Conversations", page.url


def test_signing_in_again_twice_in_the_same_tab_writes_the_cookie(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    for _ in range(2):
        before = _auth_cookie(page)
        _sign_out(page)
        _sign_in_here(page)
        wait_for_auth_cookie(page)
        assert _auth_cookie(page) not in (None, before)
    page.reload()
    wait_signed_in(page)
    expect(_form(page)).to_have_count(0)


def test_a_signed_out_tab_lists_no_pages(page: Page, app: RunningApp) -> None:
    from playwright.sync_api import expect

    sign_in(page, app.base_url)
    expect(_nav_links(page).filter(has_text="Admin")).to_have_count(1)  # the admin's pages are listed while signed in
    page.goto(app.base_url + "/admin")
    wait_signed_in(page)
    assert _heading(page) == "Admin"

    _sign_out(page)
    expect(_nav_links(page)).to_have_count(0)
    expect(page.get_by_text("Admin", exact=True)).to_have_count(0)
    expect(page.get_by_test_id("stSidebar")).to_have_count(0)  # nothing left in it, so no sidebar at all
    screenshot(page, "signout_04_signed_out_sidebar")
    # Nothing of the previous user's comes back on the next rerun of this tab either.
    _form(page).get_by_role("textbox", name="Username", exact=True).fill("nobody")
    _form(page).get_by_role("textbox", name="Password", exact=True).fill("wrong-password")
    _form(page).get_by_role("button", name="Login").click()
    expect(page.get_by_text("Username or password is incorrect.")).to_be_visible()
    expect(_nav_links(page)).to_have_count(0)

    # Signing in again lists the pages again, on the page the tab was left at.
    _sign_in_here(page)
    expect(_nav_links(page).filter(has_text="Admin")).to_have_count(1)
    expect(page.get_by_role("heading", name="Admin", level=1)).to_be_visible()
