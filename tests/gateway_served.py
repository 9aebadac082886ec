"""The gateway as ``exo-nixos gateway`` runs it, in the test's own process: ``serve(config,
probe)`` on a loopback port, with a scripted health probe.

Tests that use this talk to the gateway only over HTTP (answers, ``/health``, ``/metrics``),
so they hold whatever the gateway's internals look like, and mutation testing can attribute
what they exercise (it sees calls in the pytest process only, never in a subprocess).
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families

from exo_nixos.config import parse_config
from exo_nixos.exoapi import ExoApiError, NodeView
from exo_nixos.gateway.server import Worker, serve
from tests.exo_double.fixture import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Backend:
    """An aiohttp server standing in for one node's API; ``hits`` counts its requests and
    ``bodies`` keeps what each carried."""

    handler: Handler | None = None
    hits: int = 0
    bodies: list[bytes] = field(default_factory=list)
    server: TestServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        self.bodies.append(await request.read())
        if self.handler is not None:
            return await self.handler(request)
        return web.json_response({"backend": self.url})


def cut_off(
    headers: Mapping[str, str], *chunks: bytes, length: int | None = None, chunked: bool = False
) -> Handler:
    """A backend handler that starts an answer (``headers``, a ``length`` or chunked), sends
    ``chunks`` and then drops the connection: a node failing half way through."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers=dict(headers))
        if length is not None:
            response.content_length = length
        if chunked:
            response.enable_chunked_encoding()
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    return handler


@contextlib.asynccontextmanager
async def backend(handler: Handler | None = None) -> AsyncIterator[Backend]:
    node = Backend(handler)
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", node._handle)
    node.server = TestServer(app)
    await node.server.start_server(access_log=None)  # only the gateway's log is of interest
    try:
        yield node
    finally:
        await node.server.close()


@contextlib.asynccontextmanager
async def app_backend(app: web.Application) -> AsyncIterator[str]:
    """Serve another aiohttp application (the EXO double's) as a backend; yield its URL."""
    server = TestServer(app)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


@dataclass
class Served:
    url: str
    port: int
    key: str | None = None  # sent with /metrics when the gateway has keys
    tls: ssl.SSLContext | None = None  # the client's context when the gateway serves HTTPS

    async def metrics(self) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
        """``/metrics`` as {(sample name, labels): value}."""
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/metrics", headers=headers, ssl=self.tls or True) as r,
        ):
            assert r.status == 200
            text = await r.text()
        return {
            (s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    async def metric(self, name: str, **labels: str) -> float:
        return (await self.metrics()).get((name, frozenset(labels.items())), 0.0)

    async def health(self) -> dict[str, Any]:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.url + "/health", ssl=self.tls or True) as r,
        ):
            document: dict[str, Any] = await r.json()
            return document


@contextlib.asynccontextmanager
async def served(
    backends: list[str],
    up: set[str] | None = None,
    *,
    keys_file: str | None = None,
    key: str | None = None,
    healthy: int | None = None,
    tls: ssl.SSLContext | None = None,
    worker: Worker | None = None,
    **gateway: Any,
) -> AsyncIterator[Served]:
    """``serve`` with ``backends`` as its static backends; the probe passes for those in ``up``
    (all by default; it runs at start and then hourly). Yields once ``/health`` counts
    ``healthy`` backends (``len(up)`` by default). ``gateway`` adds gateway options; ``key``
    is sent for ``/metrics``; ``tls`` is the client's context for a gateway given
    ``tlsCertificateFile`` and ``tlsKeyFile``; ``worker`` serves as one of several workers."""
    up = set(backends) if up is None else up

    async def probe(url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
        assert timeout == 1.0, timeout  # healthCheck.timeoutSec below
        if url not in up:
            raise ExoApiError(f"cannot connect to {url}", kind="connect")
        return NodeView(url=url, node_id=url)

    port = gateway.pop("port", None) or free_port()
    options: dict[str, Any] = {
        "listenAddress": "127.0.0.1",
        "port": port,
        "localBackend": False,
        "staticBackends": backends,
        **gateway,
    }
    if keys_file is not None:
        options["apiKeysFile"] = keys_file
    config = parse_config(
        {
            "schemaVersion": 1,
            "gateway": options,
            "healthCheck": {"intervalSec": 3600.0, "timeoutSec": 1.0, "failures": 3},
        }
    )
    task = asyncio.create_task(serve(config, probe, worker))
    scheme = "https" if tls else "http"
    result = Served(f"{scheme}://127.0.0.1:{port}", port, key, tls)
    try:
        await _until_ready(task, result, len(up) if healthy is None else healthy)
        yield result
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _until_ready(task: asyncio.Task[None], gateway: Served, healthy: int) -> None:
    deadline = time.monotonic() + 10
    while True:
        if task.done():
            task.result()  # raises what stopped it
            raise RuntimeError("the gateway stopped")
        with contextlib.suppress(OSError, aiohttp.ClientError):
            if (await gateway.health())["backends"]["healthy"] == healthy:
                return
        if time.monotonic() > deadline:
            raise TimeoutError("the gateway did not become ready in 10s")
        await asyncio.sleep(0.02)


async def raw_exchange(
    port: int, head: bytes, *, read_timeout: float = 5.0
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Open a connection, send ``head`` and read what comes back before ``read_timeout`` or
    the end of the headers of one response; return the streams for more."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head)
    await writer.drain()
    async with asyncio.timeout(read_timeout):
        answer = await reader.readuntil(b"\r\n\r\n")
    return reader, writer, answer


def header_lines(answer: bytes) -> Mapping[str, str]:
    lines = answer.decode("latin-1").split("\r\n")[1:]
    return {
        k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines if line)
    }
