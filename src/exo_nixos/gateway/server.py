"""Run the gateway from the config: build the pieces, listen, handle SIGHUP and SIGTERM."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from exo_nixos.addresses import local_api_url, url_for
from exo_nixos.config import Config
from exo_nixos.credentials import systemd_credential
from exo_nixos.errors import UserError
from exo_nixos.gateway.auth import KeyStore
from exo_nixos.gateway.backends import BackendPool, Probe, backend_table, default_probe
from exo_nixos.gateway.metrics import GatewayMetrics
from exo_nixos.gateway.policy import Limiter, PolicyStore, key_table
from exo_nixos.gateway.proxy import Gateway, ProxySettings
from exo_nixos.network.instance_net import node_urls
from exo_nixos.supervisor.notify import Notifier

log = logging.getLogger(__name__)

# systemd credential names the module passes with LoadCredential= (read in preference to the
# configured paths, which the unit cannot read).
CREDENTIAL_TLS_CERTIFICATE = "tls-certificate"
CREDENTIAL_TLS_KEY = "tls-key"


class ServerLog(logging.LoggerAdapter[logging.Logger]):
    """The logger aiohttp's connection handler writes to: a request it cannot parse (the
    client's doing) is one line, never a traceback; anything else keeps its traceback."""

    def exception(
        self, msg: object, *args: object, exc_info: object = True, **kwargs: object
    ) -> None:
        exc = sys.exc_info()[1] if exc_info is True else exc_info
        if isinstance(exc, HttpProcessingError):
            self._one_line(logging.WARNING, msg, args, exc)
        else:
            self.logger.error(msg, *args, exc_info=exc if isinstance(exc, BaseException) else True)

    def debug(self, msg: object, *args: object, exc_info: object = None, **kwargs: object) -> None:
        self._one_line(logging.DEBUG, msg, args, exc_info)

    def _one_line(self, level: int, msg: object, args: tuple[object, ...], exc: object) -> None:
        if not self.logger.isEnabledFor(level):
            return
        text = str(msg) % args if args else str(msg)
        if isinstance(exc, BaseException):
            reason = " ".join(str(exc).split()) or type(exc).__name__
            text = f"{text}: {reason[:300]}"
        self.logger.log(level, "%s", text)


def tls_context(certificate: Path, key: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(certificate, key)
    except FileNotFoundError as exc:
        raise UserError(
            f"{exc.filename or certificate}: TLS file not found; fix tlsCertificateFile/tlsKeyFile"
        ) from None
    except PermissionError as exc:
        raise UserError(
            f"{exc.filename or key}: cannot read the TLS file (permission denied)"
        ) from None
    except ssl.SSLError as exc:
        raise UserError(
            f"{certificate}, {key}: not a matching PEM certificate and key: {exc.reason or exc}"
        ) from None
    return context


def _tls(config: Config) -> ssl.SSLContext | None:
    gw = config.gateway
    if not (gw.tls_certificate_file and gw.tls_key_file):
        return None
    return tls_context(
        systemd_credential(gw.tls_certificate_file, CREDENTIAL_TLS_CERTIFICATE),
        systemd_credential(gw.tls_key_file, CREDENTIAL_TLS_KEY),
    )


def check(config: Config) -> str:
    """Load what the gateway needs at start and on reload; raise UserError on a problem."""
    keys = _keys(config)
    policies = _policies(config)
    tls = _tls(config)
    auth = f"{len(keys)} API keys" if keys.enabled else "no API keys (loopback only)"
    if len(policies):
        auth += f", {len(policies)} key policies"
    return f"gateway config usable: {_listen_url(config, tls)}, {auth}"


def _listen_url(config: Config, tls: ssl.SSLContext | None) -> str:
    gw = config.gateway
    return url_for(gw.listen_address, gw.port, "https" if tls else "http")


def _keys(config: Config) -> KeyStore:
    gw = config.gateway
    return KeyStore(Path(gw.api_keys_file) if gw.api_keys_file else None)


def _policies(config: Config) -> PolicyStore:
    gw = config.gateway
    return PolicyStore(gw.key_policies, Path(gw.policy_file) if gw.policy_file else None)


@dataclass
class Shared:
    """What the worker processes share, made before they are forked: the key policies'
    table, the backends' table and the directory of the metrics' files."""

    workers: int = 1
    metrics_dir: str | None = None
    index: int = 0  # the worker this process is

    def __post_init__(self) -> None:
        self.keys = key_table(self.workers)
        self.backends = backend_table(self.workers)

    def become(self, index: int) -> None:
        """In a forked worker: this process is worker ``index``."""
        self.index = index
        self.keys.worker = self.backends.worker = index

    def clear_worker(self, index: int) -> None:
        """What worker ``index`` held in every table (it died): let go."""
        self.keys.clear_worker(index)
        self.backends.clear_worker(index)


def build_gateway(
    config: Config, probe: Probe = default_probe, shared: Shared | None = None
) -> Gateway:
    gw = config.gateway
    shared = shared or Shared()
    keys = _keys(config)
    metrics = GatewayMetrics(shared.metrics_dir)
    limiter = Limiter(_policies(config), shared.keys) if keys.enabled else None
    # one node per GPU: the host's nodes, each at its own address, are the local backends
    nodes = node_urls(config) if gw.local_backend else []
    pool = BackendPool(
        local_url=local_api_url(config.api_port) if gw.local_backend and not nodes else None,
        static_urls=[*gw.static_backends, *nodes],
        api_port=config.api_port,
        interval=config.health_check.interval_sec,
        timeout=config.health_check.timeout_sec,
        failures=config.health_check.failures,
        metrics=metrics,
        probe=probe,
        shared=shared.backends,
    )
    settings = ProxySettings(
        public_paths=frozenset(gw.public_paths),
        max_body_bytes=gw.max_body_bytes,
        connect_timeout=gw.connect_timeout_sec,
        response_timeout=gw.response_timeout_sec,
        stream_idle_timeout=gw.stream_idle_timeout_sec,
        header_read_timeout=gw.header_read_timeout_sec,
        max_connections_per_address=gw.max_connections_per_address,
    )
    return Gateway(keys, pool, metrics, settings, limiter)


@dataclass
class Worker:
    """A worker process under ``workers.supervise``: what it shares with the others, and
    how it tells the master it listens or finished a reload (the master speaks to systemd)."""

    shared: Shared
    ready: Callable[[], None]
    reloaded: Callable[[], None]


async def serve(config: Config, probe: Probe = default_probe, worker: Worker | None = None) -> None:
    """Serve until SIGTERM or SIGINT: the only process, or one of several ``worker``s."""
    gw = config.gateway
    gateway = build_gateway(config, probe, worker.shared if worker else None)
    context = _tls(config)
    if not gateway.keys.enabled and (worker is None or worker.shared.index == 0):
        log.warning("no apiKeysFile: every request is let through (listening on loopback only)")
    # handler_cancellation: a client that goes away cancels its request, and with it the
    # request to EXO, so no node keeps generating for nobody. keepalive_timeout: an idle
    # client connection is closed (aiohttp's default is an hour).
    runner = web.AppRunner(
        gateway.app,
        access_log=None,
        handle_signals=False,
        handler_cancellation=True,
        keepalive_timeout=gw.keep_alive_timeout_sec,
        logger=ServerLog(logging.getLogger("exo_nixos.gateway.http")),
    )
    await runner.setup()
    assert runner.server is not None
    loop = asyncio.get_running_loop()
    # Not web.TCPSite: each connection goes through the gateway's connection limits first.
    try:
        listener = await loop.create_server(
            gateway.connections.wrap(runner.server),
            gw.listen_address,
            gw.port,
            reuse_address=True,
            # several workers: each has a socket of its own on the port, and the kernel
            # spreads new connections over them
            reuse_port=worker is not None,
            ssl=context,
            # a TLS handshake is part of getting a request's headers in
            ssl_handshake_timeout=gw.header_read_timeout_sec if context else None,
        )
    except OSError as exc:
        await runner.cleanup()
        # asyncio's text repeats the address: the errno's own words are enough
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(
            f"cannot listen on {gw.listen_address} port {gw.port}: {reason}; "
            "choose another gateway.port or stop what uses it"
        ) from None
    if worker is None or worker.shared.index == 0:
        log.info(
            "gateway listening on %s (%d API keys)%s",
            _listen_url(config, context),
            len(gateway.keys),
            f" in {worker.shared.workers} worker processes" if worker else "",
        )
    stop = asyncio.Event()
    notifier = Notifier.from_environ() if worker is None else None

    reloads: set[asyncio.Task[None]] = set()

    async def reload_keys() -> None:
        await gateway.reload_keys()
        if notifier is not None:
            notifier.ready()
        if worker is not None:
            worker.reloaded()

    def reload() -> None:
        # The key file is read in a worker thread: the loop keeps serving meanwhile.
        if notifier is not None:
            notifier.send("RELOADING=1")
        task = asyncio.create_task(reload_keys(), name="exo-gateway-reload")
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, reload)
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    if notifier is not None:
        notifier.ready()
    if worker is not None:
        worker.ready()
    try:
        await stop.wait()
    finally:
        if notifier is not None:
            notifier.stopping()
        for sig in (signal.SIGHUP, signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(sig)
        listener.close()
        await runner.cleanup()  # closes the client connections
        if notifier is not None:
            notifier.close()
