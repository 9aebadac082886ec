"""API key file parsing, key extraction from headers and constant-time checking."""

from __future__ import annotations

import asyncio
import base64
import logging
import os
from pathlib import Path

import pytest

from exo_nixos.addresses import url_for
from exo_nixos.errors import UserError
from exo_nixos.gateway.auth import KeyStore, parse_keys, presented_key
from exo_nixos.gateway.backends import address_host
from tests.gateway_helpers import write_keys

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
        (f"a:{GOOD}\x00{GOOD}\n", "line 1: key 'a' contains a control character"),
        (f"{GOOD}\x00\n", "line 1: key 'line1' contains a control character"),
        (f"a:{GOOD}\x1b[0m\n", "line 1: key 'a' contains a control character"),
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
    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\nbob:{GOOD}b\n")
    store = KeyStore(path)
    assert store.enabled and len(store) == 2
    assert store.check(f"{GOOD}a") == "alice"
    assert store.check(f"{GOOD}b") == "bob"
    assert store.check(f"{GOOD}c") is None
    assert store.check(f"{GOOD}") is None
    assert store.check(None) is None
    # a header value that is not UTF-8 (aiohttp keeps its bytes as surrogates)
    assert store.check("\udcff\udcfe" * 12) is None

    path.write_text("tooshort\n")
    with caplog.at_level(logging.ERROR):
        assert asyncio.run(store.reload()) is False
    assert store.check(f"{GOOD}a") == "alice"
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "keeping the 2 loaded" in errors[0]

    path.write_text(f"carol:{GOOD}c\n")
    assert asyncio.run(store.reload()) is True
    assert store.check(f"{GOOD}c") == "carol"
    assert store.check(f"{GOOD}a") is None


def _reload_logged(store: KeyStore, caplog) -> list[str]:
    caplog.clear()
    with caplog.at_level(logging.INFO):
        assert asyncio.run(store.reload()) is False
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.INFO]


def test_bad_reloads_keep_the_old_keys(tmp_path: Path, caplog):
    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\n")
    store = KeyStore(path)
    # a key with NUL, a FIFO in the file's place (opening it for reading would block), a
    # directory, a file every user may read or write: each keeps the key set as it was
    for name, replace, reason in [
        ("NUL", lambda: write_keys(path, f"bob:{GOOD}\x00b\n"), "control character"),
        ("FIFO", lambda: os.mkfifo(path, 0o600), "not a regular file"),
        ("directory", lambda: path.mkdir(0o700), "not a regular file"),
        ("mode 0644", lambda: write_keys(path, f"bob:{GOOD}b\n").chmod(0o644), "every user"),
        ("mode 0602", lambda: write_keys(path, f"bob:{GOOD}b\n").chmod(0o602), "every user"),
    ]:
        if path.is_dir():
            path.rmdir()
        else:
            path.unlink(missing_ok=True)
        replace()
        logged = _reload_logged(store, caplog)
        assert len(logged) == 1, (name, logged)
        assert logged[0].startswith("API keys not reloaded, keeping the 1 loaded"), name
        assert str(path) in logged[0] and reason in logged[0], name
        assert store.check(f"{GOOD}a") == "alice", name
        assert store.check(f"{GOOD}b") is None, name


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o606, 0o666])
def test_key_file_open_to_other_users_is_refused(tmp_path: Path, mode: int):
    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\n")
    path.chmod(mode)
    with pytest.raises(UserError) as caught:
        KeyStore(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: the API key file is readable or writable by every user")
    assert f"mode {mode:04o}" in message and "chmod 0440" in message and "0400" in message
    assert "\n" not in message


@pytest.mark.parametrize("mode", [0o400, 0o440, 0o600, 0o640])
def test_key_file_for_owner_and_group_is_accepted(tmp_path: Path, mode: int):
    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\n")
    path.chmod(mode)
    assert KeyStore(path).check(f"{GOOD}a") == "alice"


def test_key_file_that_is_a_fifo_is_refused_at_start(tmp_path: Path):
    path = tmp_path / "keys"
    os.mkfifo(path, 0o600)
    with pytest.raises(UserError, match="not a regular file"):
        KeyStore(path)


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


def test_check_compares_every_digest_through_hmac(tmp_path: Path, monkeypatch):
    """Constant time: each key's digest goes through hmac.compare_digest, all of them even
    after a match (never ``==``, which stops at the first differing byte)."""
    import hmac

    from exo_nixos.gateway import auth

    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\nbob:{GOOD}b\ncarol:{GOOD}c\n")
    store = KeyStore(path)
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert store.check(f"{GOOD}a") == "alice"
    presented = auth._digest(f"{GOOD}a")
    assert calls == [(presented, k.digest) for k in store._keys]
    calls.clear()
    assert store.check(f"{GOOD}z") is None
    assert len(calls) == 3

    # with compare_digest answering "no", nothing matches: the check has no other path
    monkeypatch.setattr(hmac, "compare_digest", lambda a, b: False)
    assert store.check(f"{GOOD}a") is None


def test_check_source_compares_digests_only_with_hmac():
    """A structural check to go with the one above: no ``==`` on digests in check()."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(KeyStore.check)))
    compares = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    assert all(not isinstance(op, ast.Eq | ast.NotEq) for c in compares for op in c.ops)
    calls = {ast.unparse(n.func) for n in ast.walk(tree) if isinstance(n, ast.Call)}
    assert "hmac.compare_digest" in calls


def test_key_length_limit_is_inclusive():
    exactly = "k" * 16
    assert [k.name for k in parse_keys(f"a:{exactly}\n", "keys")] == ["a"]
    with pytest.raises(UserError, match="shorter than 16"):
        parse_keys(f"a:{exactly[1:]}\n", "keys")


def test_parse_errors_name_the_remedy():
    for text, message in [
        (
            f"a:{GOOD}\x00\n",
            "keys line 1: key 'a' contains a control character (e.g. NUL); "
            "a key is printable characters only",
        ),
        (
            "a:short\n",
            "keys line 1: key 'a' is shorter than 16 characters; "
            "generate one with `openssl rand -hex 32`",
        ),
    ]:
        with pytest.raises(UserError) as caught:
            parse_keys(text, "keys")
        assert str(caught.value) == message


def test_key_file_size_limit(tmp_path: Path):
    from exo_nixos.gateway.auth import MAX_KEY_FILE_BYTES

    key = f"last:{GOOD}x"
    padding = MAX_KEY_FILE_BYTES - len(key) - 1
    path = write_keys(tmp_path / "keys", "#" * padding + "\n" + key)
    assert path.stat().st_size == MAX_KEY_FILE_BYTES
    # the whole file is read: the key at its very end is intact
    assert KeyStore(path).check(f"{GOOD}x") == "last"
    write_keys(path, "#" * (padding + 1) + "\n" + key)
    with pytest.raises(UserError) as caught:
        KeyStore(path)
    assert str(caught.value) == f"{path}: the API key file is over {MAX_KEY_FILE_BYTES} bytes"


def test_key_file_that_is_not_utf8_is_one_line(tmp_path: Path):
    path = write_keys(tmp_path / "keys", "")
    path.write_bytes(b"a:" + b"\xff" * 20 + b"\n")
    with pytest.raises(UserError) as caught:
        KeyStore(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: cannot read the API key file: 'utf-8' codec")
    assert "\n" not in message


def test_key_file_read_error_gives_the_reason(tmp_path: Path):
    # a symlink loop: an OSError with a strerror, which the message gives
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    with pytest.raises(UserError) as caught:
        KeyStore(loop)
    assert str(caught.value) == (
        f"{loop}: cannot read the API key file: Too many levels of symbolic links"
    )


def test_basic_auth_password_may_hold_colons_and_base64_is_strict():
    basic = base64.b64encode(f"anyone:{GOOD}:more".encode()).decode()
    assert presented_key({"Authorization": f"Basic {basic}"}) == f"{GOOD}:more"
    # characters outside base64's alphabet are refused, not skipped
    assert presented_key({"Authorization": f"Basic {basic[:4]}!{basic[4:]}"}) is None


def test_reload_without_a_key_file_succeeds_and_success_is_logged(tmp_path: Path, caplog):
    assert asyncio.run(KeyStore(None).reload()) is True
    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\n")
    store = KeyStore(path)
    write_keys(path, f"alice:{GOOD}a\nbob:{GOOD}b\n")
    with caplog.at_level(logging.INFO):
        assert asyncio.run(store.reload()) is True
    assert [r.getMessage() for r in caplog.records] == [f"API keys reloaded from {path}: 2 keys"]


def test_a_reload_while_one_is_under_way_is_refused(tmp_path: Path, caplog, monkeypatch):
    import threading

    from exo_nixos.gateway import auth

    path = write_keys(tmp_path / "keys", f"alice:{GOOD}a\n")
    store = KeyStore(path)
    release = threading.Event()
    real = auth.read_key_file

    def slow_read(p: Path) -> list[auth.ApiKey]:
        release.wait(10)
        return real(p)

    monkeypatch.setattr(auth, "read_key_file", slow_read)

    async def scenario() -> tuple[bool, bool, bool]:
        first = asyncio.create_task(store.reload())
        await asyncio.sleep(0.05)
        second = await store.reload()
        release.set()
        ok = await first
        third = await store.reload()  # the flag is cleared once a reload ends
        return ok, second, third

    with caplog.at_level(logging.ERROR):
        assert asyncio.run(scenario()) == (True, False, True)
    assert [r.getMessage() for r in caplog.records] == [
        f"API keys not reloaded, keeping the 1 loaded: {path}: the previous reload "
        "has not finished reading it"
    ]


def test_a_clients_key_file_is_read_once_and_bounded(tmp_path: Path):
    """``--api-key-file`` of ``status`` and ``models``: the first key line, from a file or a
    pipe; a directory, an endless device or a file without a key is one line."""
    import os
    import threading

    from exo_nixos.errors import UserError
    from exo_nixos.gateway.auth import read_client_key

    named = tmp_path / "named"
    named.write_text(f"# ops\n\nalice:{GOOD}a\nbob:{GOOD}b\n")
    assert read_client_key(str(named)) == f"{GOOD}a"
    bare = tmp_path / "bare"
    bare.write_text(f"  {GOOD}z  \n")
    assert read_client_key(str(bare)) == f"{GOOD}z"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(target=lambda: fifo.write_text(f"{GOOD}p\n"))
    writer.start()
    try:
        assert read_client_key(str(fifo)) == f"{GOOD}p"
    finally:
        writer.join(5)
    zero = tmp_path / "zero"
    zero.symlink_to("/dev/zero")
    empty = tmp_path / "empty"
    empty.write_text("# nothing yet\n")
    for path, message in [
        (tmp_path / "absent", "no such file"),
        (tmp_path, "cannot read it: Is a directory"),
        (zero, "cannot read it: larger than 1048576 bytes"),
        (empty, "no key in it; write the key on the first line"),
    ]:
        with pytest.raises(UserError) as caught:
            read_client_key(str(path))
        assert str(caught.value) == f"--api-key-file {path}: {message}"
