"""Fixtures for the real-browser tests: the app on a free port, Debian's chromium, a fresh context per test."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.browser.helpers import MISSING, UI_TIMEOUT_MS, RunningApp, launch_chromium, running_app

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "/browser/" in str(item.fspath):
            item.add_marker(pytest.mark.browser)


@pytest.fixture(scope="module")
def app() -> Iterator[RunningApp]:
    with running_app() as running:
        yield running


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if MISSING is not None:
        pytest.fail(f"CI=true but {MISSING}: browser tests must run in CI")
    from playwright.sync_api import expect, sync_playwright

    # Streamlit redraws over a websocket; its 5 s default is tight on a loaded 2-core machine.
    expect.set_options(timeout=UI_TIMEOUT_MS)
    with sync_playwright() as p:
        chromium = launch_chromium(p)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser: Browser, app: RunningApp) -> Iterator[Page]:
    # A fresh context per test: its own cookies, so one test's sign-in never carries into the next.
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    context.set_default_timeout(UI_TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()
