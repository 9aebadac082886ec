"""API key file parsing, key extraction from headers and constant-time checking."""

from __future__ import annotations

import base64
import logging
from pathlib import Path

import pytest

from exo_nixos.errors import UserError
from exo_nixos.exoapi import url_for
from exo_nixos.gateway.auth import KeyStore, parse_keys, presented_key
from exo_nixos.gateway.backends import address_host

GOOD = "0123456789abcdef0123"


def test_parse_keys_names_comments_and_blank_lines():
    text = f"# team keys\n\nalice:{GOOD}a\n  {GOOD}b  \nci.bot-1: {GOOD}c\n"
    keys = parse_keys(text, "keys")
    assert [k.name for k in keys] == ["alice", "line4", "ci.bot-1"]
    assert len({k.digest for k in keys}) == 3


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("", "no API keys"),
        ("# only a comment\n", "no API keys"),
        ("short\n", "line 1: key 'line1' is shorter than 16"),
        (f"a:{GOOD}1\na:{GOOD}2\n", "line 2: the name 'a' is used twice"),
        (f"a:{GOOD}\nb:{GOOD}\n", "line 2: key 'b' repeats an earlier key"),
        (f"a:{GOOD} {GOOD}\n", "line 1: a key must not contain whitespace"),
    ],
)
def test_parse_keys_rejects_bad_files_with_one_line(text, fragment):
    with pytest.raises(UserError) as caught:
        parse_keys(text, "keys")
    assert fragment in str(caught.value)
    assert "\n" not in str(caught.value)


def test_presented_key_from_each_header_form():
    basic = base64.b64encode(f"anyone:{GOOD}".encode()).decode()
    assert presented_key({"Authorization": f"Bearer {GOOD}"}) == GOOD
    assert presented_key({"Authorization": f"bearer  {GOOD} "}) == GOOD
    assert presented_key({"x-api-key": GOOD}) == GOOD
    assert presented_key({"Authorization": f"Basic {basic}"}) == GOOD
    assert presented_key({"Authorization": "Basic !!notbase64"}) is None
    assert presented_key({"Authorization": f"Token {GOOD}"}) is None
    assert presented_key({}) is None


def test_keystore_checks_and_keeps_old_keys_on_bad_reload(tmp_path: Path, caplog):
    path = tmp_path / "keys"
    path.write_text(f"alice:{GOOD}a\nbob:{GOOD}b\n")
    store = KeyStore(path)
    assert store.enabled and len(store) == 2
    assert store.check(f"{GOOD}a") == "alice"
    assert store.check(f"{GOOD}b") == "bob"
    assert store.check(f"{GOOD}c") is None
    assert store.check(f"{GOOD}") is None
    assert store.check(None) is None

    path.write_text("tooshort\n")
    with caplog.at_level(logging.ERROR):
        assert store.reload() is False
    assert store.check(f"{GOOD}a") == "alice"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the 2 loaded" in errors[0]

    path.write_text(f"carol:{GOOD}c\n")
    assert store.reload() is True
    assert store.check(f"{GOOD}c") == "carol"
    assert store.check(f"{GOOD}a") is None


def test_keystore_missing_file_is_a_user_error(tmp_path: Path):
    with pytest.raises(UserError, match="API key file not found"):
        KeyStore(tmp_path / "absent")


def test_no_key_file_means_no_authentication():
    store = KeyStore(None)
    assert not store.enabled
    assert store.check(GOOD) is None


@pytest.mark.parametrize(
    ("address", "host"),
    [
        ("10.0.0.2", "10.0.0.2"),
        ("10.0.0.2:52414", "10.0.0.2"),
        ("/ip4/192.168.1.7/tcp/52414", "192.168.1.7"),
        ("/ip6/fd00::7/tcp/52414", "fd00::7"),
        ("[fd00::8]:52414", "fd00::8"),
        ("fd00::9", "fd00::9"),
        ("/ip6/fe80::1/tcp/52414", None),
        ("0.0.0.0", None),
        ("/dns/example/tcp/1", None),
        ("not an address", None),
    ],
)
def test_address_host(address, host):
    assert address_host(address) == host


def test_api_url_brackets_ipv6():
    assert url_for("10.0.0.2", 52415) == "http://10.0.0.2:52415"
    assert url_for("fd00::7", 52415) == "http://[fd00::7]:52415"
    assert url_for("::1", 52417, "https") == "https://[::1]:52417"


def test_gateway_urls_bracket_ipv6(tmp_path: Path):
    from exo_nixos.config import parse_config
    from exo_nixos.gateway.server import build_gateway, check

    config = parse_config({"schemaVersion": 1, "gateway": {"listenAddress": "::1"}})
    assert check(config) == "gateway config usable: http://[::1]:52417, no API keys (loopback only)"
    pool = build_gateway(config).pool
    assert pool.local is not None and pool.local.url == "http://127.0.0.1:52415"
