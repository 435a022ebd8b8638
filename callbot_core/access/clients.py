"""Who is on the other end of a request: the client address that sign-in throttling and the audit log record.

Behind a reverse proxy every request comes from the proxy's address, so counting failures per address would let one
guesser refuse sign-ins to everyone behind it. When the peer is a proxy the operator trusts
(`CALLBOT_TRUSTED_PROXIES`), the address is read from `X-Forwarded-For` instead: the right-most entry that is not
itself a trusted proxy (entries further left were written by the client and can say anything).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Sequence
from functools import lru_cache

from callbot_core.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@lru_cache(maxsize=8)
def trusted_networks(entries: tuple[str, ...]) -> tuple[Network, ...]:
    """The configured proxies as networks (`10.0.0.0/8`, or a single address); a bad entry is a ConfigError."""
    networks = []
    for entry in entries:
        try:
            networks.append(ipaddress.ip_network(entry.strip(), strict=False))
        except ValueError:
            raise ConfigError(
                f"CALLBOT_TRUSTED_PROXIES: {entry!r} is not an address or network (e.g. 10.0.0.0/8)"
            ) from None
    return tuple(networks)


def _trusted(address: str, networks: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def client_address(peer: str | None, forwarded_for: str | None, trusted_proxies: Sequence[str]) -> str | None:
    """The client's address: `peer`, unless `peer` is a trusted proxy and `X-Forwarded-For` names who it forwarded."""
    networks = trusted_networks(tuple(trusted_proxies))
    if not peer or not networks or not _trusted(peer, networks) or not forwarded_for:
        return peer
    hops = [hop.strip() for hop in forwarded_for.split(",") if hop.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, networks):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # garbage where an address should be: count it against the proxy, never trust it
    return hops[0] if hops else peer
