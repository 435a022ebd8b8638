"""The app's HTTP security headers, read off the real server that `callbot app` starts (app/server.py)."""

from __future__ import annotations

import httpx
import pytest

from tests.browser.helpers import RunningApp


@pytest.mark.parametrize("path", ["/", "/_stcore/health", "/chat"])
def test_every_response_carries_the_security_headers(app: RunningApp, path: str) -> None:
    response = httpx.get(app.base_url + path, timeout=30)
    assert response.status_code == 200
    headers = response.headers
    assert headers["x-frame-options"] == "SAMEORIGIN"
    assert "frame-ancestors 'self'" in headers["content-security-policy"]
    assert "object-src 'none'" in headers["content-security-policy"]
    assert headers["x-content-type-options"] == "nosniff"
    assert headers["referrer-policy"] == "same-origin"
    assert "camera=()" in headers["permissions-policy"]
