"""The kube-apiserver double answers like the real server for the calls it serves."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

from tests.kube_double import Fault, KubeApiDouble

BASE = "/apis/discovery.k8s.io/v1/namespaces/exo-system/endpointslices"
AUTH = {"Authorization": "Bearer good-token"}


def slice_body(rv: str | None = None) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": "s"}
    if rv:
        meta["resourceVersion"] = rv
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": meta,
        "addressType": "IPv4",
        "endpoints": [{"addresses": ["10.0.0.1"]}],
    }


async def call(
    session: aiohttp.ClientSession,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> tuple[int, str, Any]:
    data = None if body is None else json.dumps(body)
    async with session.request(
        method, path, data=data, headers={**AUTH, **(headers or {})}
    ) as response:
        return response.status, response.headers["Content-Type"], await response.json()


def test_crud_conflicts_and_errors() -> None:
    async def main() -> None:
        api = KubeApiDouble()
        await api.start()
        try:
            async with aiohttp.ClientSession(api.url) as s:
                status, ctype, body = await call(s, "POST", BASE, slice_body())
                assert (status, ctype) == (201, "application/json")
                rv = body["metadata"]["resourceVersion"]
                assert body["metadata"]["uid"] and body["metadata"]["generation"] == 1
                status, _, body = await call(s, "POST", BASE, slice_body())
                assert (status, body["reason"]) == (409, "AlreadyExists")
                status, _, body = await call(s, "POST", BASE, {**slice_body("5")})
                assert status == 500
                status, _, body = await call(s, "PUT", BASE + "/s", slice_body(rv))
                assert status == 200
                new_rv = body["metadata"]["resourceVersion"]
                assert int(new_rv) > int(rv)
                status, _, body = await call(s, "PUT", BASE + "/s", slice_body(rv))
                assert (status, body["reason"], body["code"]) == (409, "Conflict", 409)
                changed = {**slice_body(new_rv), "addressType": "IPv6"}
                status, _, body = await call(s, "PUT", BASE + "/s", changed)
                assert (status, body["reason"]) == (422, "Invalid")
                merge = {"Content-Type": "application/merge-patch+json"}
                patch = {"metadata": {"labels": {"a": "b"}, "resourceVersion": rv}}
                status, _, body = await call(s, "PATCH", BASE + "/s", patch, merge)
                assert status == 409
                patch = {"metadata": {"labels": {"a": "b"}}}
                status, _, body = await call(s, "PATCH", BASE + "/s", patch, merge)
                assert (status, body["metadata"]["labels"]) == (200, {"a": "b"})
                apply = {"Content-Type": "application/apply-patch+yaml"}
                status, _, _ = await call(s, "PATCH", BASE + "/s", patch, apply)
                assert status == 415
                status, _, _ = await call(s, "DELETE", BASE + "/s")
                assert status == 200
                status, _, body = await call(s, "GET", BASE + "/s")
                assert (status, body["reason"]) == (404, "NotFound")
                status, _, body = await call(
                    s, "GET", BASE + "/s", headers={"Authorization": "Bearer x"}
                )
                assert (status, body["reason"]) == (401, "Unauthorized")
                other = BASE.replace("exo-system", "nope")
                status, _, body = await call(s, "POST", other, slice_body())
                assert (status, body["message"]) == (404, 'namespaces "nope" not found')
        finally:
            await api.stop()

    asyncio.run(main())


def test_pause_refuses_connections_until_resume() -> None:
    async def main() -> None:
        api = KubeApiDouble()
        await api.start()
        try:
            await api.pause()
            async with aiohttp.ClientSession(api.url) as s:
                try:
                    await call(s, "GET", BASE + "/s")
                except aiohttp.ClientConnectionError:
                    pass
                else:
                    raise AssertionError("a paused double answered")
                await api.resume()
                status, _, _ = await call(s, "GET", BASE + "/s")
                assert status == 404
        finally:
            await api.stop()

    asyncio.run(main())


def test_forbidden_throttled_and_invalid_names_like_the_real_server() -> None:
    async def main() -> None:
        api = KubeApiDouble()
        await api.start()
        try:
            async with aiohttp.ClientSession(api.url) as s:
                bad = slice_body()
                bad["endpoints"][0]["nodeName"] = "GPU_01"
                status, _, body = await call(s, "POST", BASE, bad)
                assert (status, body["reason"]) == (422, "Invalid")
                assert 'endpoints[0].nodeName: Invalid value: "GPU_01"' in body["message"]
                upper = {**slice_body(), "metadata": {"name": "Exo-API"}}
                status, _, body = await call(s, "POST", BASE, upper)
                assert status == 422 and "metadata.name" in body["message"]
                api.forbidden = True
                status, _, body = await call(s, "GET", BASE + "/s")
                assert (status, body["reason"]) == (403, "Forbidden")
                assert 'cannot get resource "endpointslices"' in body["message"]
                api.forbidden = False
                api.fail_next = [Fault(429, retry_after=3)]
                async with s.get(BASE + "/s", headers=AUTH) as response:
                    assert response.status == 429
                    assert response.headers["Retry-After"] == "3"
                    answer = await response.json()
                assert answer["reason"] == "TooManyRequests"
                assert answer["details"]["retryAfterSeconds"] == 3
        finally:
            await api.stop()

    asyncio.run(main())
