"""A copied sign-in cookie in a real browser: it works while its session lives and dies when the owner signs out."""

from __future__ import annotations

from typing import TYPE_CHECKING

from tests.browser.helpers import AUTH_COOKIE, RunningApp, sign_in, wait_signed_in

if TYPE_CHECKING:
    from playwright.sync_api import Browser


def test_a_copied_cookie_dies_when_its_owner_signs_out(browser: Browser, app: RunningApp) -> None:
    from playwright.sync_api import expect

    owner = browser.new_context()
    thief = browser.new_context()
    late_thief = browser.new_context()
    try:
        page = owner.new_page()
        sign_in(page, app.base_url)
        wait_signed_in(page)
        cookie = next(c for c in owner.cookies() if c["name"] == AUTH_COOKIE)

        thief.add_cookies([cookie])
        stolen = thief.new_page()
        stolen.goto(app.base_url)
        expect(stolen.get_by_role("button", name="Sign out")).to_be_visible()  # the copy works while the session lives

        page.get_by_role("button", name="Sign out").click()
        expect(page.get_by_role("button", name="Sign out")).to_have_count(0)

        late_thief.add_cookies([cookie])
        late = late_thief.new_page()
        late.goto(app.base_url)
        expect(late.locator("[data-testid=stForm]").filter(has_text="Sign in to Callbot Workbench")).to_be_visible()
        expect(late.get_by_role("button", name="Sign out")).to_have_count(0)
        # The tab already open with the copy is signed out on its next rerun.
        stolen.reload()
        expect(stolen.locator("[data-testid=stForm]").filter(has_text="Sign in to Callbot Workbench")).to_be_visible()
    finally:
        for context in (owner, thief, late_thief):
            context.close()
