"""The gateway's own answers in one process: /health, 401s, 413, and the headers it forwards."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from exo_nixos.gateway.auth import KeyStore
from exo_nixos.gateway.proxy import ProxySettings
from tests.gateway_helpers import KEY_A, write_keys
from tests.test_gateway_failover import FakeNode, gateway_for, serving

UNAUTHORIZED = {"WWW-Authenticate": 'Basic realm="exo", charset="UTF-8"'}


async def get(url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    async with aiohttp.ClientSession() as session, session.request(url=url, **kwargs) as r:
        return r.status, dict(r.headers), await r.read()


def error(status: int, message: str, kind: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "code": status}}


def test_health_is_ok_degraded_or_down():
    async def scenario() -> None:
        urls = ["http://127.0.0.1:1", "http://127.0.0.1:2"]
        for up, status, word, healthy in [
            (set(urls), 200, "ok", 2),
            ({urls[0]}, 200, "degraded", 1),
            (set(), 503, "down", 0),
        ]:
            async with gateway_for(urls, up) as (_, url):
                code, headers, body = await get(url + "/health", method="GET")
                assert code == status
                assert headers["Content-Type"].startswith("application/json")
                document = json.loads(body)
                assert document["status"] == word
                assert document["backends"] == {"healthy": healthy, "total": 2}
                assert [(n["url"], n["up"]) for n in document["nodes"]] == [
                    (u, u in up) for u in urls
                ]

    asyncio.run(scenario())


def test_health_lists_each_backend_without_credentials():
    """/health names every backend: its address (never a password in it), node, state and
    the requests it serves now."""
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.StreamResponse:
        await release.wait()
        return web.json_response({"done": True})

    async def scenario() -> None:
        async with serving(FakeNode("slow", slow)) as node:
            plain_url = node.url
            secret_url = node.url.replace("http://", "http://ops:hunter2-secret@")
            down = "http://127.0.0.1:1"
            async with gateway_for([secret_url, down], {secret_url}) as (gateway, url):
                pending = asyncio.create_task(get(url + "/v1/models", method="GET"))
                for _ in range(100):
                    if gateway.pool.all()[0].inflight:
                        break
                    await asyncio.sleep(0.01)
                code, _, body = await get(url + "/health", method="GET")
                release.set()
                assert (await pending)[0] == 200
                _, _, metrics = await get(url + "/metrics", method="GET")
        assert code == 200
        nodes = json.loads(body)["nodes"]
        # (the scripted probe answers with its URL as the node id: only that may hold it)
        shown = json.dumps([{k: v for k, v in n.items() if k != "nodeId"} for n in nodes])
        assert "hunter2" not in shown and "ops:" not in shown
        assert b"hunter2" not in metrics
        assert nodes == [
            {
                "url": plain_url,
                "nodeId": secret_url,  # the scripted probe answers with the URL as node id
                "source": "static",
                "up": True,
                "inflight": 1,
            },
            {"url": down, "nodeId": None, "source": "static", "up": False, "inflight": 0},
        ]

    asyncio.run(scenario())


def test_keys_are_required_except_on_public_paths(tmp_path: Path):
    keys = KeyStore(write_keys(tmp_path / "keys", f"alice:{KEY_A}\n"))

    async def scenario() -> None:
        async with (
            serving(FakeNode("live")) as live,
            gateway_for([live.url], {live.url}, keys=keys) as (gateway, url),
        ):
            code, headers, body = await get(url + "/v1/models", method="GET")
            assert code == 401 and headers["WWW-Authenticate"] == UNAUTHORIZED["WWW-Authenticate"]
            assert json.loads(body) == error(
                401,
                "an API key is required: send 'Authorization: Bearer KEY' or 'x-api-key: KEY'",
                "authentication_error",
            )
            code, _, body = await get(
                url + "/v1/models", method="GET", headers={"Authorization": "Bearer wrong-key"}
            )
            assert code == 401
            assert json.loads(body) == error(
                401, "the API key is not valid", "authentication_error"
            )
            code, _, body = await get(
                url + "/v1/models", method="GET", headers={"x-api-key": KEY_A}
            )
            assert (code, body) == (200, b'{"node": "live"}')
            code, _, _ = await get(url + "/health", method="GET")
            assert code == 200
            assert live.hits == 1
            samples = gateway.metrics.registry.get_sample_value
            assert samples("exo_gateway_auth_failures_total", {"reason": "missing"}) == 1
            assert samples("exo_gateway_auth_failures_total", {"reason": "invalid"}) == 1

    asyncio.run(scenario())


def test_a_body_over_the_limit_is_a_413_and_none_known_a_503():
    async def scenario() -> None:
        async with (
            serving(FakeNode("live")) as live,
            gateway_for([live.url], {live.url}, settings=ProxySettings(max_body_bytes=10)) as (
                _,
                url,
            ),
        ):
            code, _, body = await get(url + "/v1/chat/completions", method="POST", data=b"x" * 11)
            assert code == 413
            assert json.loads(body) == error(
                413,
                "request body of 11 bytes is over the limit of 10",
                "invalid_request_error",
            )
            code, _, _ = await get(url + "/v1/chat/completions", method="POST", data=b"x" * 10)
            assert code == 200 and live.hits == 1
        async with gateway_for([], set()) as (_, url):
            code, _, body = await get(url + "/v1/models", method="GET")
            assert code == 503
            assert json.loads(body) == error(
                503, "no EXO node API is known to the gateway", "gateway_error"
            )

    asyncio.run(scenario())


def test_forwarded_headers_both_ways(tmp_path: Path):
    keys = KeyStore(write_keys(tmp_path / "keys", f"alice:{KEY_A}\n"))
    seen: dict[str, str] = {}

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.update(request.headers)
        return web.json_response(
            {"ok": True},
            headers={
                "Access-Control-Allow-Origin": "*",
                "X-Exo": "kept",
                "X-Drop-Me": "gone",
                "Connection": "X-Drop-Me",
            },
        )

    async def scenario() -> None:
        async with (
            serving(FakeNode("echo", echo)) as node,
            gateway_for([node.url], {node.url}, keys=keys) as (_, url),
        ):
            code, headers, _ = await get(
                url + "/v1/models?x=1",
                method="GET",
                headers={
                    "Authorization": f"Bearer {KEY_A}",
                    "X-Forwarded-For": "10.9.9.9",
                    "X-Client": "kept",
                    "X-Private": "dropped",
                    "Connection": "X-Private",
                },
            )
            assert code == 200
            assert headers.get("X-Exo") == "kept"
            assert "Access-Control-Allow-Origin" not in headers and "X-Drop-Me" not in headers

    asyncio.run(scenario())
    assert seen["X-Client"] == "kept"
    assert "Authorization" not in seen and "X-Private" not in seen
    assert seen["X-Forwarded-For"] == "10.9.9.9, 127.0.0.1"
    assert seen["X-Forwarded-Proto"] == "http"
    assert seen["X-Forwarded-Host"].startswith("127.0.0.1:")
