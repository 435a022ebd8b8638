"""The client address behind a reverse proxy: X-Forwarded-For is believed only from a proxy the operator trusts."""

from __future__ import annotations

import pytest

from callbot_core.access.clients import client_address
from callbot_core.errors import ConfigError
from callbot_core.settings import Settings

PROXIES = ["10.0.0.0/8", "::1"]


@pytest.mark.parametrize(
    ("peer", "forwarded", "expected"),
    [
        ("10.1.1.1", "203.0.113.7", "203.0.113.7"),  # one trusted proxy in front
        ("10.1.1.1", "198.51.100.1, 203.0.113.7, 10.2.2.2", "203.0.113.7"),  # the left part is the client's to write
        ("::1", "2001:db8::5", "2001:db8::5"),
        ("203.0.113.9", "198.51.100.1", "203.0.113.9"),  # not a proxy we trust: its header is ignored
        ("10.1.1.1", None, "10.1.1.1"),
        ("10.1.1.1", "not-an-address", "10.1.1.1"),  # garbage counts against the proxy, never as someone else
        (None, "198.51.100.1", None),
    ],
)
def test_the_client_is_the_right_most_untrusted_hop(peer: str | None, forwarded: str | None, expected: str) -> None:
    assert client_address(peer, forwarded, PROXIES) == expected


def test_without_trusted_proxies_the_header_is_ignored() -> None:
    assert client_address("10.1.1.1", "198.51.100.1", []) == "10.1.1.1"


def test_the_setting_is_comma_separated_and_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALLBOT_TRUSTED_PROXIES", "10.0.0.0/8, 192.168.1.1")
    assert Settings(_env_file=None).trusted_proxies == ["10.0.0.0/8", "192.168.1.1"]  # type: ignore[call-arg]
    with pytest.raises(ConfigError, match="CALLBOT_TRUSTED_PROXIES: 'ten' is not an address or network"):
        client_address("10.1.1.1", "198.51.100.1", ["ten"])
