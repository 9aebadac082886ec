"""The small shared primitives: URLs and multiaddrs, OS error reasons, byte sizes."""

from __future__ import annotations

import errno

import pytest

from exo_nixos.addresses import local_api_url, multiaddr, url_for
from exo_nixos.fsutil import os_reason
from exo_nixos.units import gib


def test_urls_bracket_ipv6_once():
    assert url_for("10.0.0.2", 52415) == "http://10.0.0.2:52415"
    assert url_for("::1", 52417, "https") == "https://[::1]:52417"
    assert url_for("[fe80::1]", 1) == "http://[fe80::1]:1"
    assert local_api_url(52415) == "http://127.0.0.1:52415"


@pytest.mark.parametrize(
    ("text", "parsed"),
    [
        ("/ip4/10.0.0.2/tcp/52414", ("ip4", "10.0.0.2", 52414)),
        ("/ip6/fe80::1/tcp/1", ("ip6", "fe80::1", 1)),
        ("/dns4/node-a/tcp/52414", ("dns4", "node-a", 52414)),
        ("/ip4/10.0.0.2", ("ip4", "10.0.0.2", None)),
        ("/ip4/", None),
        ("10.0.0.2:52414", None),
        ("/unix/tmp/sock", None),
    ],
)
def test_multiaddr(text, parsed):
    assert multiaddr(text) == parsed


def test_os_reason_quotes_the_os_else_the_error():
    assert os_reason(PermissionError(errno.EACCES, "Permission denied", "/x")) == (
        "Permission denied"
    )
    assert os_reason(UnicodeDecodeError("utf-8", b"\xff", 0, 1, "invalid start byte")) == (
        "'utf-8' codec can't decode byte 0xff in position 0: invalid start byte"
    )
    assert os_reason(OSError()) == "OSError"


def test_gib():
    assert gib(48 << 30) == "48.0 GiB"
    assert gib(1536 << 20, 2) == "1.50 GiB"
    assert gib(None) == "unknown"
