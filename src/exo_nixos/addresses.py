"""Addresses and URLs of EXO nodes, built and read in one place."""

from __future__ import annotations

import re

LOOPBACK = "127.0.0.1"

# libp2p multiaddrs as EXO writes a peer's address: /ip4/10.0.0.2/tcp/52414
_MULTIADDR = re.compile(r"^/(ip4|ip6|dns4?|dns6)/([^/]+)(?:/tcp/(\d{1,5}))?")


def url_for(host: str, port: int, scheme: str = "http") -> str:
    """``scheme://host:port``, an IPv6 address in brackets (``http://[::1]:52417``): every
    URL built from an address and a port goes through here."""
    bracketed = f"[{host}]" if ":" in host and not host.startswith("[") else host
    return f"{scheme}://{bracketed}:{port}"


def local_api_url(api_port: int) -> str:
    """This host's EXO API, as the supervisor, gateway, registrar and doctor reach it."""
    return url_for(LOOPBACK, api_port)


def multiaddr(text: str) -> tuple[str, str, int | None] | None:
    """``(protocol, host, TCP port or None)`` of a multiaddr such as
    ``/ip4/10.0.0.2/tcp/52414``; None when ``text`` is not one."""
    match = _MULTIADDR.match(text)
    if match is None:
        return None
    return match.group(1), match.group(2), int(match.group(3)) if match.group(3) else None
