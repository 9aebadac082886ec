"""The proxy's failover in one process: a scripted health probe and aiohttp backends.

Fast and deterministic (no subprocess, no timing): which backend a request reaches, that a
failed request marks its backend down, and that a JSON response cut off half way is retried
on another node.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from exo_nixos.exoapi import ExoApiError, NodeView
from exo_nixos.gateway.auth import KeyStore
from exo_nixos.gateway.backends import Backend, BackendPool
from exo_nixos.gateway.metrics import GatewayMetrics
from exo_nixos.gateway.proxy import Gateway, ProxySettings
from tests.exo_double.fixture import free_port

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class FakeNode:
    """An aiohttp server standing in for one node's API; ``hits`` counts its requests."""

    name: str
    handler: Handler | None = None
    hits: int = 0
    server: TestServer | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        assert self.server is not None
        return str(self.server.make_url("")).rstrip("/")

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        self.hits += 1
        if self.handler is not None:
            return await self.handler(request)
        return web.json_response({"node": self.name})


@asynccontextmanager
async def serving(node: FakeNode) -> AsyncIterator[FakeNode]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", node._handle)
    node.server = TestServer(app)
    await node.server.start_server()
    try:
        yield node
    finally:
        await node.server.close()


async def cut_off_json(request: web.Request) -> web.StreamResponse:
    """A chunked JSON document whose connection drops half way (a node dying mid-answer)."""
    response = web.StreamResponse(headers={"Content-Type": "application/json"})
    response.enable_chunked_encoding()
    await response.prepare(request)
    await response.write(b'{"choices": [{"message": {"content": "half')
    assert request.transport is not None
    request.transport.close()
    return response


@asynccontextmanager
async def gateway_for(
    urls: list[str],
    up: set[str],
    *,
    keys: KeyStore | None = None,
    settings: ProxySettings | None = None,
) -> AsyncIterator[tuple[Gateway, str]]:
    """A gateway whose static backends are ``urls``; the health probe passes for those in
    ``up`` only (it runs once: the interval is an hour)."""

    async def probe(url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
        if url not in up:
            raise ExoApiError(f"cannot connect to {url}", kind="connect")
        return NodeView(url=url, node_id=url, peers=(), state_ok=True, synced=True)

    metrics = GatewayMetrics()
    pool = BackendPool(
        local_url=None,
        static_urls=urls,
        api_port=52415,
        interval=3600.0,
        timeout=1.0,
        failures=3,
        metrics=metrics,
        probe=probe,
    )
    settings = settings or ProxySettings(stream_idle_timeout=10.0)
    gateway = Gateway(keys or KeyStore(None), pool, metrics, settings)
    server = TestServer(gateway.app)
    await server.start_server()
    try:
        await asyncio.wait_for(pool.checked.wait(), 10)
        yield gateway, str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def backend(gateway: Gateway, url: str) -> Backend:
    return next(b for b in gateway.pool.all() if b.url == url)


async def post(url: str) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(url + "/v1/chat/completions", json={"model": "m"}) as response,
    ):
        return response.status, await response.read()


def test_a_backend_known_dead_is_not_tried():
    async def scenario() -> None:
        async with (
            serving(FakeNode("dead")) as dead,
            serving(FakeNode("live")) as live,
            gateway_for([dead.url, live.url], up={live.url}) as (gateway, url),
        ):
            assert not backend(gateway, dead.url).healthy
            for _ in range(6):  # the pool takes its backends in turn: each comes first
                assert await post(url) == (200, b'{"node": "live"}')
            assert (dead.hits, live.hits) == (0, 6)

    asyncio.run(scenario())


def test_candidates_skip_backends_down_and_fall_back_to_all_when_none_is_up():
    async def scenario() -> None:
        async with gateway_for(["http://a:1", "http://b:1", "http://c:1"], up={"http://b:1"}) as (
            gateway,
            _,
        ):
            pool = gateway.pool
            for _ in range(3):
                assert [b.url for b in pool.candidates()] == ["http://b:1"]
            pool.mark_failed(backend(gateway, "http://b:1"), "test")
            for _ in range(3):
                assert sorted(b.url for b in pool.candidates()) == [
                    "http://a:1",
                    "http://b:1",
                    "http://c:1",
                ]

    asyncio.run(scenario())


def test_a_request_that_cannot_connect_marks_its_backend_down():
    async def scenario() -> None:
        refused = f"http://127.0.0.1:{free_port()}"  # nothing listens there
        # the probe says both are up: only the failed request can tell the pool otherwise
        async with (
            serving(FakeNode("live")) as live,
            gateway_for([refused, live.url], up={refused, live.url}) as (gw, url),
        ):
            assert backend(gw, refused).healthy
            assert await post(url) == (200, b'{"node": "live"}')
            assert not backend(gw, refused).healthy
            assert backend(gw, live.url).healthy
            assert gw.pool.summary() == {"healthy": 1, "total": 2}
            # from now on requests go to the live node only, first try
            for _ in range(4):
                assert await post(url) == (200, b'{"node": "live"}')
            assert live.hits == 5

    asyncio.run(scenario())


def test_a_json_response_cut_off_is_retried_on_another_node():
    async def scenario() -> None:
        async with (
            serving(FakeNode("dying", cut_off_json)) as dying,
            serving(FakeNode("live")) as live,
            gateway_for([dying.url, live.url], up={dying.url, live.url}) as (gw, url),
        ):
            status, body = await post(url)  # the first request tries the dying node first
            assert dying.hits == 1
            assert (status, json.loads(body)) == (200, {"node": "live"})
            assert not backend(gw, dying.url).healthy
            assert live.hits == 1

    asyncio.run(scenario())
