"""``gateway.server`` in the test's own process: HTTPS, what systemd is told at start, reload
and stop, the listening socket let go on SIGTERM, a worker's start and reload, what
``--check`` says, and aiohttp's errors as one log line each."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import re
import signal
import socket
import ssl
from collections.abc import Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
import trustme
from aiohttp.http_exceptions import BadHttpMessage

from exo_nixos.config import parse_config
from exo_nixos.errors import UserError
from exo_nixos.gateway.proxy import ProxySettings
from exo_nixos.gateway.server import (
    ServerLog,
    Shared,
    Worker,
    build_gateway,
    check,
    tls_context,
)
from tests.exo_double.fixture import free_port
from tests.gateway_helpers import KEY_A, KEY_B, write_keys
from tests.gateway_served import backend, served
from tests.notify_listener import NotifyListener

SERVER_LOG = "exo_nixos.gateway.server"


def run(coroutine: object) -> object:
    return asyncio.run(coroutine)  # type: ignore[arg-type]


@pytest.fixture
def pki(tmp_path: Path) -> tuple[Path, Path, ssl.SSLContext]:
    """A certificate and key for 127.0.0.1 and a client context that trusts their CA."""
    ca = trustme.CA()
    issued = ca.issue_cert("127.0.0.1", "localhost")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    issued.private_key_pem.write_to_path(str(key))
    for index, pem in enumerate(issued.cert_chain_pems):
        pem.write_to_path(str(cert), append=index > 0)
    client = ssl.create_default_context()
    ca.configure_trust(client)
    return cert, key, client


def lines(caplog: pytest.LogCaptureFixture, logger: str) -> list[tuple[str, str]]:
    return [(r.levelname, r.getMessage()) for r in caplog.records if r.name == logger]


@contextlib.contextmanager
def notify_socket(monkeypatch: pytest.MonkeyPatch) -> Iterator[NotifyListener]:
    """A datagram socket standing in for systemd's; NOTIFY_SOCKET names it."""
    listener = NotifyListener()
    monkeypatch.setenv("NOTIFY_SOCKET", listener.address)
    try:
        yield listener
    finally:
        listener.close()


def heard(listener: NotifyListener) -> list[str]:
    """The messages so far, each as its ``KEY=VALUE`` lines."""
    return ["\n".join(f"{k}={v}" for k, v in m.fields.items()) for m in listener.messages]


async def until(condition: Callable[[], object], what: str) -> None:
    for _ in range(250):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"not within 5 s: {what}")


# ---------------------------------------------------------------- HTTPS


def test_https_is_served_and_a_client_that_never_says_hello_is_closed(
    pki: tuple[Path, Path, ssl.SSLContext], caplog: pytest.LogCaptureFixture
) -> None:
    cert, key, client = pki

    async def scenario() -> None:
        async with (
            backend() as node,
            served(
                [node.url],
                tls=client,
                tlsCertificateFile=str(cert),
                tlsKeyFile=str(key),
                headerReadTimeoutSec=0.3,
            ) as gateway,
        ):
            assert gateway.url.startswith("https://")
            async with (
                aiohttp.ClientSession() as session,
                session.get(gateway.url + "/anything", ssl=client) as answer,
            ):
                assert answer.status == 200
                assert await answer.json() == {"backend": node.url}
            # plain HTTP to the TLS port gets no answer
            plain = gateway.url.replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):
                async with aiohttp.ClientSession() as session, session.get(plain + "/health"):
                    pass
            # the handshake counts as reading the request's headers: a client that connects
            # and says nothing is let go after headerReadTimeoutSec, not aiohttp's 60 s
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert node.hits == 1

    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run(scenario())
    (started,) = [m for level, m in lines(caplog, SERVER_LOG) if m.startswith("gateway listening")]
    assert re.fullmatch(r"gateway listening on https://127\.0\.0\.1:\d+ \(0 API keys\)", started)


def test_tls_files_that_cannot_be_used_are_one_line_each(
    pki: tuple[Path, Path, ssl.SSLContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cert, key, _ = pki
    with pytest.raises(UserError) as missing:
        tls_context(tmp_path / "absent.pem", key)
    assert str(missing.value) == (
        f"{tmp_path / 'absent.pem'}: TLS file not found; fix tlsCertificateFile/tlsKeyFile"
    )
    other = trustme.CA().issue_cert("127.0.0.1")
    other_key = tmp_path / "other-key.pem"
    other.private_key_pem.write_to_path(str(other_key))
    with pytest.raises(UserError) as mismatched:
        tls_context(cert, other_key)
    assert str(mismatched.value) == (
        f"{cert}, {other_key}: not a matching PEM certificate and key: KEY_VALUES_MISMATCH"
    )
    context = tls_context(cert, key)
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2

    def denied(self: ssl.SSLContext, certfile: object, keyfile: object = None) -> None:
        # what a file the service user may not read gives (the tests run as root)
        raise PermissionError(13, "Permission denied", str(keyfile))

    monkeypatch.setattr(ssl.SSLContext, "load_cert_chain", denied)
    with pytest.raises(UserError) as unreadable:
        tls_context(cert, key)
    assert str(unreadable.value) == f"{key}: cannot read the TLS file (permission denied)"


def test_check_says_where_it_listens_and_what_it_loaded(
    pki: tuple[Path, Path, ssl.SSLContext], tmp_path: Path
) -> None:
    cert, key, _ = pki
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\nbob:{KEY_B}\n")
    gateway = {
        "listenAddress": "127.0.0.1",
        "port": 8443,
        "apiKeysFile": str(keys),
        "staticBackends": ["http://10.0.0.2:52415"],
        "localBackend": False,
    }
    config = parse_config({"schemaVersion": 1, "gateway": gateway})
    assert check(config) == "gateway config usable: http://127.0.0.1:8443, 2 API keys"
    gateway |= {
        "tlsCertificateFile": str(cert),
        "tlsKeyFile": str(key),
        "keyPolicies": {"alice": {"requestsPerMinute": 10}},
    }
    config = parse_config({"schemaVersion": 1, "gateway": gateway})
    assert check(config) == (
        "gateway config usable: https://127.0.0.1:8443, 2 API keys, 1 key policies"
    )
    policies = tmp_path / "policies.json"
    policies.write_text(json.dumps({"bob": {"concurrency": 1}, "*": {"concurrency": 2}}))
    gateway |= {"policyFile": str(policies)}
    config = parse_config({"schemaVersion": 1, "gateway": gateway})
    assert check(config).endswith(", 2 API keys, 3 key policies")


# ---------------------------------------------------------------- systemd and signals


def test_systemd_hears_ready_then_reloading_and_ready_on_sighup_then_stopping(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")

    async def scenario() -> None:
        with notify_socket(monkeypatch) as listener:
            async with backend() as node, served([node.url], keys_file=str(keys), key=KEY_A):
                await until(lambda: len(heard(listener)) >= 1, "ready")
                assert heard(listener) == ["READY=1"]
                write_keys(keys, f"alice:{KEY_A}\nbob:{KEY_B}\n")
                os.kill(os.getpid(), signal.SIGHUP)
                await until(lambda: len(heard(listener)) >= 3, "reload")
                assert heard(listener)[1:] == ["RELOADING=1", "READY=1"]
            await until(lambda: len(heard(listener)) >= 4, "stopping")
            assert heard(listener)[3:] == ["STOPPING=1"]

    with caplog.at_level(logging.INFO, logger="exo_nixos.gateway"):
        run(scenario())
    messages = [m for _, m in lines(caplog, SERVER_LOG)]
    assert [m for m in messages if m.startswith("gateway listening")] == [
        m for m in messages if m.startswith("gateway listening on http://127.0.0.1:")
    ]
    assert any(m.endswith(" (1 API keys)") for m in messages), messages
    assert not any(m.startswith("no apiKeysFile") for m in messages)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_signal_ends_serve_and_lets_the_port_go(sig: signal.Signals) -> None:
    async def scenario() -> None:
        async with backend() as node, served([node.url]) as gateway:
            task = next(t for t in asyncio.all_tasks() if t.get_coro().__name__ == "serve")  # type: ignore[union-attr]
            os.kill(os.getpid(), sig)
            await asyncio.wait_for(asyncio.shield(task), 5)  # returns, not cancelled
            assert task.done() and not task.cancelled() and task.exception() is None
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", gateway.port)
        # the handlers are gone with serve: SIGHUP is ignored again only by the test's own
        assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    run(scenario())


def test_without_keys_serve_warns_once_that_every_request_is_let_through(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with backend() as node, served([node.url]):
            pass

    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run(scenario())
    assert (
        "WARNING",
        "no apiKeysFile: every request is let through (listening on loopback only)",
    ) in lines(caplog, SERVER_LOG)


@pytest.mark.parametrize("index", [0, 1])
def test_a_worker_tells_the_master_it_listens_and_reloaded(
    index: int, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker speaks to the master (which speaks to systemd), never to systemd itself; only
    worker 0 logs the start and the missing keys."""
    calls: list[str] = []
    shared = Shared(workers=2)
    shared.become(index)
    worker = Worker(shared, lambda: calls.append("ready"), lambda: calls.append("reloaded"))

    async def scenario() -> None:
        with notify_socket(monkeypatch) as listener:
            async with backend() as node, served([node.url], worker=worker):
                assert calls == ["ready"]
                os.kill(os.getpid(), signal.SIGHUP)
                await until(lambda: calls == ["ready", "reloaded"], "reloaded")
            await asyncio.sleep(0.1)  # what was sent has arrived
            assert heard(listener) == []

    with caplog.at_level(logging.INFO, logger=SERVER_LOG):
        run(scenario())
    messages = [m for _, m in lines(caplog, SERVER_LOG)]
    if index == 0:
        assert any(
            m.startswith("gateway listening on http://127.0.0.1:")
            and m.endswith(" (0 API keys) in 2 worker processes")
            for m in messages
        ), messages
        assert any(m.startswith("no apiKeysFile") for m in messages)
    else:
        assert messages == []


def test_a_port_in_use_is_one_line_naming_the_address_and_the_fix() -> None:
    port = free_port()
    holder = socket.socket()
    holder.bind(("127.0.0.1", port))
    holder.listen()

    async def scenario() -> None:
        async with backend() as node:
            config = parse_config(
                {
                    "schemaVersion": 1,
                    "gateway": {"port": port, "staticBackends": [node.url], "localBackend": False},
                }
            )
            from exo_nixos.gateway.server import serve

            with pytest.raises(UserError) as error:
                await serve(config)
            assert str(error.value) == (
                f"cannot listen on 127.0.0.1 port {port}: Address already in use; "
                "choose another gateway.port or stop what uses it"
            )

    try:
        run(scenario())
    finally:
        holder.close()


# ---------------------------------------------------------------- shared state


def test_a_worker_writes_its_own_column_of_the_shared_tables() -> None:
    shared = Shared(workers=3)
    assert shared.index == 0
    shared.become(2)
    assert shared.index == 2
    for table in (shared.keys, shared.backends):
        row = table.row("alice")
        table.add_own(row, 5)
        assert table.total(row) == 5
        table.clear_worker(2)
        assert table.total(row) == 0


# ---------------------------------------------------------------- aiohttp's log


def test_aiohttp_errors_are_one_line_and_a_clients_error_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = ServerLog(logging.getLogger("exo_nixos.gateway.http"), {})
    with caplog.at_level(logging.DEBUG, logger="exo_nixos.gateway.http"):
        try:
            raise BadHttpMessage("bad\n  header")
        except BadHttpMessage:
            logger.exception("Error handling request from %s", "192.0.2.1")
        try:
            raise RuntimeError("boom")
        except RuntimeError:
            logger.exception("Error handling request from %s", "192.0.2.9")
        logger.exception("explicit", exc_info=BadHttpMessage("given"))
        given = RuntimeError("given, outside an except block")
        logger.exception("explicit unexpected", exc_info=given)
        logger.debug("Ignored premature client disconnection", exc_info=ConnectionResetError())
        logger.debug("long", exc_info=ValueError("x" * 500))
        logger.debug("plain %s", "words")
        logger.debug("100% plain")
    records = [r for r in caplog.records if r.name == "exo_nixos.gateway.http"]
    assert [(r.levelname, r.getMessage()) for r in records] == [
        ("WARNING", "Error handling request from 192.0.2.1: 400, message: bad header"),
        ("ERROR", "Error handling request from 192.0.2.9"),
        ("WARNING", "explicit: 400, message: given"),
        ("ERROR", "explicit unexpected"),
        ("DEBUG", "Ignored premature client disconnection: ConnectionResetError"),
        ("DEBUG", "long: " + "x" * 300),
        ("DEBUG", "plain words"),
        ("DEBUG", "100% plain"),
    ]
    # only the unexpected errors keep their tracebacks
    tracebacks = [r.exc_info[1] if r.exc_info else None for r in records]
    assert isinstance(tracebacks[1], RuntimeError) and tracebacks[3] is given
    assert [t is not None for t in tracebacks] == [False, True, False, True] + [False] * 4


def test_aiohttp_debug_lines_cost_nothing_when_debug_is_off(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Loud:
        def __str__(self) -> str:
            raise AssertionError("formatted although nobody reads it")

    logger = ServerLog(logging.getLogger("exo_nixos.gateway.http"), {})
    with caplog.at_level(logging.INFO, logger="exo_nixos.gateway.http"):
        logger.debug(Loud())
    assert caplog.records == []


# ---------------------------------------------------------------- the listening socket


def test_it_listens_on_the_listen_address_only_and_writes_no_access_log(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """127.0.0.1 only (the rest of 127/8 is as local, and refused); a request adds no access
    log line (aiohttp's own would be one per request)."""

    async def scenario() -> None:
        async with backend() as node, served([node.url]) as gateway:
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.2", gateway.port)
            async with (
                aiohttp.ClientSession() as session,
                session.get(gateway.url + "/v1/models") as answer,
            ):
                assert answer.status == 200

    with caplog.at_level(logging.DEBUG):
        run(scenario())
    assert [r for r in caplog.records if r.name.startswith("aiohttp.access")] == []


def test_an_idle_client_connection_is_closed_after_the_keep_alive_timeout() -> None:
    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], keepAliveTimeoutSec=0.3, headerReadTimeoutSec=30.0) as gateway,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
                # the answer, then nothing: the gateway closes the connection (not after
                # aiohttp's default of 75 s)
                await reader.read()
            assert reader.at_eof()
            writer.close()

    run(scenario())


def test_a_restart_right_after_serving_binds_the_same_port() -> None:
    """Connections the gateway closed sit in TIME_WAIT on its port; a restart (systemctl
    restart) binds the port all the same (SO_REUSEADDR)."""
    port = free_port()

    async def once() -> None:
        async with backend() as node, served([node.url], port=port) as gateway:
            for _ in range(3):
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
                async with asyncio.timeout(5):
                    assert (await reader.read()).startswith(b"HTTP/1.1 200")
                writer.close()

    run(once())
    run(once())


def test_two_workers_listen_on_one_port() -> None:
    """Each worker has a socket of its own on the port (SO_REUSEPORT)."""
    port = free_port()

    def worker(index: int) -> Worker:
        shared = Shared(workers=2)
        shared.become(index)
        return Worker(shared, lambda: None, lambda: None)

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], port=port, worker=worker(0)),
            served([node.url], port=port, worker=worker(1)) as second,
        ):
            assert (await second.health())["status"] == "ok"

    run(scenario())


# ---------------------------------------------------------------- the parts


def test_each_setting_reaches_the_part_that_uses_it(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    config = parse_config(
        {
            "schemaVersion": 1,
            "apiPort": 52499,
            "healthCheck": {"intervalSec": 7.0, "timeoutSec": 2.5, "failures": 4},
            "gateway": {
                "apiKeysFile": str(keys),
                "staticBackends": ["http://10.0.0.2:52415"],
                "publicPaths": ["/health", "/metrics"],
                "maxBodyBytes": 1 << 20,
                "connectTimeoutSec": 3.0,
                "responseTimeoutSec": 120.0,
                "streamIdleTimeoutSec": 60.0,
                "headerReadTimeoutSec": 4.0,
                "maxConnectionsPerAddress": 9,
                "keyPolicies": {"alice": {"concurrency": 1}},
            },
        }
    )
    shared = Shared(workers=2)
    gateway = build_gateway(config, shared=shared)
    pool = gateway.pool
    assert (pool.api_port, pool.interval, pool.timeout, pool.failure_threshold) == (
        52499,
        7.0,
        2.5,
        4,
    )
    assert pool.local is not None and pool.local.url == "http://127.0.0.1:52499"
    assert [b.url for b in pool.static] == ["http://10.0.0.2:52415"]
    assert pool.shared is shared.backends
    assert gateway.settings == ProxySettings(
        public_paths=frozenset({"/health", "/metrics"}),
        max_body_bytes=1 << 20,
        connect_timeout=3.0,
        response_timeout=120.0,
        stream_idle_timeout=60.0,
        header_read_timeout=4.0,
        max_connections_per_address=9,
    )
    assert gateway.limiter is not None and gateway.limiter.table is shared.keys
    assert gateway.metrics.multiprocess_dir is None  # one process: its own registry
    # without keys there is nothing to limit
    config = parse_config({"schemaVersion": 1})
    assert build_gateway(config).limiter is None


def test_tls_files_are_read_from_systemds_credentials_when_it_passes_them(
    pki: tuple[Path, Path, ssl.SSLContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """LoadCredential= hands the unit copies it may read; the configured paths (root's) are
    then not opened."""
    cert, key, _ = pki
    credentials = tmp_path / "credentials"
    credentials.mkdir()
    (credentials / "tls-certificate").write_bytes(cert.read_bytes())
    (credentials / "tls-key").write_bytes(key.read_bytes())
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(credentials))
    gateway = {"tlsCertificateFile": "/nonexistent/cert.pem", "tlsKeyFile": "/nonexistent/key.pem"}
    config = parse_config({"schemaVersion": 1, "gateway": gateway})
    assert check(config).startswith("gateway config usable: https://127.0.0.1:52417, ")
