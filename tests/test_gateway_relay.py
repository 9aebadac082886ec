"""The gateway served in-process (``tests/gateway_served.py``), judged over HTTP only: streams
passed on as they arrive, streams cut off or stalled, EXO's failure shapes (an SSE error
event, a 200 cut off), ``Expect: 100-continue``, failover, connection limits, key reloads and
the one-line log of a malformed request."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from tests.exo_double.cluster import Cluster
from tests.exo_double.server import Double, Fault, Log, Options, build_app
from tests.gateway_helpers import KEY_A, KEY_B, write_keys
from tests.gateway_served import (
    app_backend,
    backend,
    cut_off,
    header_lines,
    raw_exchange,
    served,
)

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def run(coroutine: Any) -> Any:
    return asyncio.run(coroutine)


# ---------------------------------------------------------------- streaming


def test_an_event_stream_is_passed_on_as_it_arrives_with_end_to_end_headers() -> None:
    """The second event is sent only after the client has the first: a gateway that buffered
    the stream would hang here."""
    client_has_first = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            headers={
                "Content-Type": "text/event-stream",
                "Cache-Control": "no-cache",
                "X-Exo-Node": "n1",
                "Access-Control-Allow-Origin": "*",
                "Keep-Alive": "timeout=5",
            }
        )
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.wait_for(client_has_first.wait(), 5)
        await response.write(b"data: two\n\n")
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with backend(events) as node, served([node.url]) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.post(gateway.url + "/v1/chat/completions", data=b'{"stream":true}') as r,
            ):
                assert r.status == 200
                assert r.headers["Content-Type"] == "text/event-stream"
                assert r.headers["Cache-Control"] == "no-cache"
                assert r.headers["X-Exo-Node"] == "n1"
                assert "Access-Control-Allow-Origin" not in r.headers
                assert "Keep-Alive" not in r.headers
                assert "Content-Length" not in r.headers
                first = await asyncio.wait_for(r.content.readuntil(b"\n\n"), 5)
                assert first == b"data: one\n\n"
                client_has_first.set()
                assert await asyncio.wait_for(r.read(), 5) == b"data: two\n\n"
            assert node.bodies == [b'{"stream":true}']
            assert (
                await gateway.metric("exo_gateway_requests_total", method="POST", code="200") == 1
            )
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 0
            assert (
                await gateway.metric(
                    "exo_gateway_backend_requests_total", backend=node.url, outcome="response"
                )
                == 1
            )
            assert await gateway.metric("exo_gateway_backend_inflight", backend=node.url) == 0
            post = frozenset({("method", "POST")})
            samples = await gateway.metrics()
            assert samples[("exo_gateway_response_latency_seconds_count", post)] == 1
            assert 0 < samples[("exo_gateway_response_latency_seconds_sum", post)] < 60
            assert (await gateway.health())["status"] == "ok"

    run(scenario())


def test_a_large_response_of_known_length_is_streamed_whole() -> None:
    """Over the buffering limit, a document with a Content-Length is passed on as it comes,
    with its length."""
    body = bytes(range(256)) * (5 << 12)  # 5 MiB

    async def big(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/octet-stream")

    async def scenario() -> None:
        async with (
            backend(big) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/x") as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(body))
            assert await r.read() == body

    run(scenario())


def test_a_stream_cut_off_by_its_backend_is_cut_off_for_the_client(caplog) -> None:
    """Part of the answer is out: it cannot be retried, and the client must see an incomplete
    response (never one that looks whole). The backend is down until its probe passes."""

    dying = cut_off({"Content-Type": "text/event-stream"}, b"data: one\n\n")

    async def scenario() -> str:
        async with (
            backend(dying) as node,
            backend() as other,
            served([node.url, other.url]) as gateway,
        ):
            # the first request goes to the first backend in turn (both idle, both healthy)
            got = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async with aiohttp.ClientSession() as session:
                    for _ in range(2):
                        async with session.post(gateway.url + "/v1/chat/completions") as r:
                            got = await r.read()
            assert got == b""
            assert node.hits == 1
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 1
            assert await gateway.metric("exo_gateway_backend_up", backend=node.url) == 0
            health = await gateway.health()
            assert health["status"] == "degraded"
            assert health["backends"] == {"healthy": 1, "total": 2}
            assert [n["up"] for n in health["nodes"] if n["url"] == node.url] == [False]
            assert await gateway.metric("exo_gateway_retries_total") == 0
            assert other.hits <= 1
            return node.url

    caplog.set_level(logging.INFO, logger="exo_nixos.gateway")
    url = run(scenario())
    assert any(m.startswith(f"stream from {url} cut off: ") for m in caplog.messages)
    assert any(
        m.startswith(f"backend {url} down: {url}: stream cut off: ClientPayloadError")
        for m in caplog.messages
    ), caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_stalled_stream_is_cut_off_after_the_idle_timeout(caplog) -> None:
    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(30)
        return response

    async def scenario() -> str:
        async with (
            backend(stalling) as node,
            served([node.url], streamIdleTimeoutSec=0.3) as gateway,
        ):
            async with (
                aiohttp.ClientSession() as session,
                session.post(gateway.url + "/v1/chat/completions") as r,
            ):
                assert r.status == 200
                assert await r.content.readuntil(b"\n\n") == b"data: one\n\n"
                with pytest.raises(aiohttp.ClientPayloadError):
                    await asyncio.wait_for(r.read(), 5)
            assert await gateway.metric("exo_gateway_stalled_streams_total", side="backend") == 1
            assert await gateway.metric("exo_gateway_stalled_streams_total", side="client") == 0
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 1
            # a slow node is not a dead one
            assert (await gateway.health())["status"] == "ok"
            return node.url

    caplog.set_level(logging.INFO, logger="exo_nixos.gateway")
    url = run(scenario())
    assert f"stream from {url} stalled: no data for 0.3s; cut off" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_a_slow_but_steady_stream_outlasts_the_idle_timeout() -> None:
    """The idle limit is per gap, not per stream: chunks 0.1 s apart for 1 s pass a 0.3 s
    limit whole."""
    parts = [f"data: {n}\n\n".encode() for n in range(10)]

    async def steady(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(0.1)
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with (
            backend(steady) as node,
            served([node.url], streamIdleTimeoutSec=0.3) as gateway,
        ):
            async with (
                aiohttp.ClientSession() as session,
                session.post(gateway.url + "/v1/chat/completions") as r,
            ):
                assert r.status == 200
                assert await asyncio.wait_for(r.read(), 5) == b"".join(parts)
            assert await gateway.metric("exo_gateway_stalled_streams_total", side="backend") == 0
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 0

    run(scenario())


def test_a_client_that_goes_away_closes_the_stream_to_the_backend() -> None:
    """No node keeps generating for nobody: the backend's connection is closed too."""
    gone = asyncio.Event()

    async def endless(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: more\n\n")
                await asyncio.sleep(0.02)
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    async def scenario() -> None:
        async with backend(endless) as node, served([node.url]) as gateway:
            async with aiohttp.ClientSession() as session:
                r = await session.post(gateway.url + "/v1/chat/completions")
                assert await r.content.readuntil(b"\n\n") == b"data: more\n\n"
                r.close()
            await asyncio.wait_for(gone.wait(), 5)
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 0
            # nginx's 499: the client closed the connection before its answer was complete
            closed = gateway.metric("exo_gateway_requests_total", method="POST", code="499")
            for _ in range(100):
                if await closed == 1:
                    break
                await asyncio.sleep(0.02)
                closed = gateway.metric("exo_gateway_requests_total", method="POST", code="499")
            else:
                raise AssertionError("no 499 counted")
            post = frozenset({("method", "POST")})
            samples = await gateway.metrics()
            assert samples[("exo_gateway_request_duration_seconds_count", post)] == 1
            assert 0 < samples[("exo_gateway_request_duration_seconds_sum", post)] < 60
            assert (await gateway.health())["status"] == "ok"

    run(scenario())


# ---------------------------------------------------------------- EXO's own failure shapes


def double_app(**fault: Any) -> tuple[web.Application, Double]:
    """The EXO double's application, serving ``MODEL``, with ``fault`` set."""
    options = Options(node_id="12D3KooWdouble", instances=[MODEL])
    cluster = Cluster(node_id=options.node_id, api_port=52415, instance_models=[MODEL])
    double = Double(options=options, log=Log(0, io.StringIO()), cluster=cluster)
    double.fault = Fault(**fault)
    return build_app(double), double


def completion(stream: bool) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stream": stream}


def test_an_sse_error_event_is_passed_on_as_exo_sent_it() -> None:
    """Upstream fails a streamed completion after its 200 with an error event and [DONE]: the
    gateway relays the stream unchanged, does not retry, and the node stays up."""
    app, _ = double_app(mode="sse_error")

    async def scenario() -> None:
        async with (
            app_backend(app) as exo,
            backend() as other,
            served([exo, other.url]) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    exo + "/v1/chat/completions", json=completion(True)
                ) as direct:
                    expected = await direct.read()
                for _ in range(2):  # one of the two goes to the double
                    async with session.post(
                        gateway.url + "/v1/chat/completions", json=completion(True)
                    ) as r:
                        body = await r.read()
                        if body != b'{"backend": "%s"}' % other.url.encode():
                            assert r.status == 200
                            assert r.headers["Content-Type"] == "text/event-stream; charset=utf-8"
                            assert body == expected
            events = [line for line in expected.split(b"\n\n") if line.startswith(b"data: ")]
            error = json.loads(events[0].removeprefix(b"data: "))
            assert error["error"]["type"] == "InternalServerError"
            assert events[-1] == b"data: [DONE]"
            assert other.hits == 1
            assert await gateway.metric("exo_gateway_retries_total") == 0
            assert (await gateway.health())["status"] == "ok"

    run(scenario())


def test_a_completion_cut_off_after_its_200_is_retried_on_another_node() -> None:
    """Upstream's non-streamed completion fails as a 200 with an unterminated empty body
    (hypercorn closes the connection): nothing was sent to the client, so another node answers."""
    app, _ = double_app(mode="cutoff")

    async def scenario() -> None:
        async with (
            app_backend(app) as exo,
            backend() as other,
            served([exo, other.url]) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.post(
                        gateway.url + "/v1/chat/completions", json=completion(False)
                    ) as r:
                        assert r.status == 200
                        assert await r.json() == {"backend": other.url}
            assert other.hits == 2
            assert await gateway.metric("exo_gateway_retries_total") == 1
            assert await gateway.metric("exo_gateway_backend_up", backend=exo) == 0
            # it did answer (a 200 cut off), which is not a connection error
            requests = "exo_gateway_backend_requests_total"
            assert await gateway.metric(requests, backend=exo, outcome="response") == 1
            assert await gateway.metric(requests, backend=exo, outcome="error") == 0

    run(scenario())


def test_a_streamed_completion_of_the_double_is_relayed_whole() -> None:
    app, _ = double_app()

    async def scenario() -> None:
        async with app_backend(app) as exo, served([exo]) as gateway:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    exo + "/v1/chat/completions", json=completion(True)
                ) as direct:
                    expected = await direct.read()
                async with session.post(
                    gateway.url + "/v1/chat/completions", json=completion(True)
                ) as r:
                    assert r.status == 200
                    body = await r.read()
            strip = [
                json.loads(e.removeprefix(b"data: "))["choices"]
                for e in body.split(b"\n\n")
                if e.startswith(b"data: {")
            ]
            direct_events = [
                json.loads(e.removeprefix(b"data: "))["choices"]
                for e in expected.split(b"\n\n")
                if e.startswith(b"data: {")
            ]
            assert strip == direct_events and strip
            assert body.rstrip().endswith(b"data: [DONE]")

    run(scenario())


# ---------------------------------------------------------------- failover


def test_a_backend_that_refuses_connections_fails_over_and_is_marked_down(caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.gateway")

    async def scenario() -> str:
        async with backend() as doomed:
            dead = doomed.url
        # ``dead`` is closed now, but its probe passes: only a request finds out
        async with backend() as live, served([dead, live.url]) as gateway:
            async with aiohttp.ClientSession() as session:
                for _ in range(3):
                    async with session.get(gateway.url + "/v1/models") as r:
                        assert r.status == 200
                        assert await r.json() == {"backend": live.url}
            assert live.hits == 3
            assert await gateway.metric("exo_gateway_retries_total") == 1
            assert (
                await gateway.metric(
                    "exo_gateway_backend_requests_total", backend=dead, outcome="error"
                )
                == 1
            )
            assert await gateway.metric("exo_gateway_backend_up", backend=dead) == 0
            assert (await gateway.health())["backends"] == {"healthy": 1, "total": 2}
            return dead

    dead = run(scenario())
    # the pool logs why: the backend, the client error and its text
    [down] = [m for m in caplog.messages if m.startswith(f"backend {dead} down: ")]
    assert down.startswith(f"backend {dead} down: {dead}: ClientConnectorError: Cannot connect")


def test_no_backend_answering_is_a_502_without_internals() -> None:
    async def scenario() -> None:
        async with backend() as a, backend() as b:
            urls = [a.url, b.url]
        async with served(urls) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.post(gateway.url + "/v1/chat/completions", data=b"{}") as r,
            ):
                assert r.status == 502
                assert await r.json() == {
                    "error": {
                        "message": "no EXO node could answer the request",
                        "type": "gateway_error",
                        "code": 502,
                    }
                }
            assert await gateway.metric("exo_gateway_retries_total") == 1
            assert (
                await gateway.metric("exo_gateway_requests_total", method="POST", code="502") == 1
            )

    run(scenario())


def test_at_most_three_backends_are_tried_for_one_request() -> None:
    async def scenario() -> None:
        async with backend() as a, backend() as b, backend() as c, backend() as d:
            urls = [a.url, b.url, c.url, d.url]
        async with served(urls) as gateway:
            async with aiohttp.ClientSession() as session, session.get(gateway.url + "/x") as r:
                assert r.status == 502
            assert await gateway.metric("exo_gateway_retries_total") == 2
            assert (await gateway.health())["backends"] == {"healthy": 1, "total": 4}

    run(scenario())


def test_a_backend_error_status_is_an_answer_not_a_failure() -> None:
    async def teapot(request: web.Request) -> web.StreamResponse:
        return web.json_response({"detail": "no"}, status=500, reason="Broken")

    async def scenario() -> None:
        async with backend(teapot) as node, served([node.url]) as gateway:
            async with aiohttp.ClientSession() as session, session.get(gateway.url + "/x") as r:
                assert (r.status, r.reason) == (500, "Broken")
                assert await r.json() == {"detail": "no"}
            assert (await gateway.health())["status"] == "ok"
            assert await gateway.metric("exo_gateway_requests_total", method="GET", code="500") == 1

    run(scenario())


def test_the_path_and_query_reach_the_backend_as_sent() -> None:
    seen: list[str] = []

    async def echo(request: web.Request) -> web.StreamResponse:
        seen.append(request.raw_path)
        return web.Response(text="ok")

    async def scenario() -> None:
        async with backend(echo) as node, served([node.url]) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.get(gateway.url + "/state/a%2Fb?x=1&y=%20", allow_redirects=False) as r,
            ):
                assert await r.text() == "ok"
            assert seen == ["/state/a%2Fb?x=1&y=%20"]

    run(scenario())


# ---------------------------------------------------------------- Expect: 100-continue


def expect_head(key: str | None, length: int, expect: str = "100-continue", version: str = "1.1"):
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (
        f"POST /v1/chat/completions HTTP/{version}\r\nHost: gw\r\n{auth}"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\nExpect: {expect}\r\n\r\n"
    ).encode()


async def body_of(reader: asyncio.StreamReader, head: bytes) -> bytes:
    async with asyncio.timeout(5):
        return await reader.readexactly(int(header_lines(head)["content-length"]))


def test_expect_100_continue_is_answered_only_after_the_key_and_size_are_checked(
    tmp_path: Path,
) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    body = b'{"model": "m"}'

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], keys_file=str(keys), key=KEY_A, maxBodyBytes=1024) as gateway,
        ):
            # no key: the 401 comes instead of 100 Continue, and the connection closes
            reader, writer, answer = await raw_exchange(gateway.port, expect_head(None, len(body)))
            assert answer.startswith(b"HTTP/1.1 401 "), answer
            assert header_lines(answer)["connection"] == "close"
            assert json.loads(await body_of(reader, answer))["error"]["type"] == (
                "authentication_error"
            )
            writer.close()
            # a key, but a declared body over the limit: 413 before the body is sent
            reader, writer, answer = await raw_exchange(gateway.port, expect_head(KEY_A, 4096))
            assert answer.startswith(b"HTTP/1.1 413 "), answer
            assert json.loads(await body_of(reader, answer)) == {
                "error": {
                    "message": "request body of 4096 bytes is over the limit of 1024",
                    "type": "invalid_request_error",
                    "code": 413,
                }
            }
            writer.close()
            # an expectation the gateway does not know
            reader, writer, answer = await raw_exchange(
                gateway.port, expect_head(KEY_A, len(body), expect="magic")
            )
            assert answer.startswith(b"HTTP/1.1 417 "), answer
            assert json.loads(await body_of(reader, answer)) == {
                "error": {
                    "message": "unknown expectation 'magic'",
                    "type": "invalid_request_error",
                    "code": 417,
                }
            }
            writer.close()
            assert node.hits == 0
            # a good key: 100 Continue, then the body, then the backend's answer
            reader, writer, answer = await raw_exchange(gateway.port, expect_head(KEY_A, len(body)))
            assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
            writer.write(body)
            async with asyncio.timeout(5):
                answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            document = json.loads(await body_of(reader, answer))
            assert document == {"backend": node.url}
            writer.close()
            assert node.bodies == [body]
            metric = gateway.metric
            assert await metric("exo_gateway_requests_total", method="POST", code="401") == 1
            assert await metric("exo_gateway_requests_total", method="POST", code="413") == 1
            assert await metric("exo_gateway_requests_total", method="POST", code="417") == 1
            assert await metric("exo_gateway_requests_total", method="POST", code="200") == 1
            assert await metric("exo_gateway_auth_failures_total", reason="missing") == 1

    run(scenario())


def test_a_client_that_takes_its_time_after_100_continue_is_not_cut_off() -> None:
    """The header-read deadline ends with the headers, even when the body waits for 100."""
    body = b"{}"

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], headerReadTimeoutSec=0.2, keepAliveTimeoutSec=30.0) as gateway,
        ):
            reader, writer, answer = await raw_exchange(gateway.port, expect_head(None, len(body)))
            assert answer == b"HTTP/1.1 100 Continue\r\n\r\n"
            await asyncio.sleep(0.5)
            writer.write(body)
            async with asyncio.timeout(5):
                answer = await reader.readuntil(b"\r\n\r\n")
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            writer.close()
            assert await gateway.metric("exo_gateway_header_timeouts_total") == 0

    run(scenario())


def test_a_client_that_stops_reading_a_stream_is_let_go(caplog) -> None:
    """A client that takes nothing for the idle timeout: both connections are closed."""
    caplog.set_level(logging.INFO, logger="exo_nixos.gateway")
    gone = asyncio.Event()

    async def firehose(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        try:
            while True:
                await response.write(b"data: " + b"x" * 65536 + b"\n\n")
        except (ConnectionError, asyncio.CancelledError):
            gone.set()
            raise

    async def scenario() -> str:
        async with (
            backend(firehose) as node,
            served([node.url], streamIdleTimeoutSec=0.3) as gateway,
        ):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gateway.port))
            _, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /events HTTP/1.1\r\nHost: gw\r\n\r\n")
            await asyncio.wait_for(gone.wait(), 20)  # never read: the gateway gives up
            writer.close()
            assert await gateway.metric("exo_gateway_stalled_streams_total", side="client") == 1
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 0
            return node.url

    url = run(scenario())
    assert f"client 127.0.0.1 took no data for 0.3s: stream from {url} closed" in caplog.messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_expect_on_http_1_0_gets_no_interim_answer(tmp_path: Path) -> None:
    """HTTP/1.0 has no 100 Continue (RFC 9110 10.1.1): the body is read as it comes."""
    body = b"{}"

    async def scenario() -> None:
        async with backend() as node, served([node.url]) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(expect_head(None, len(body), expect="whatever", version="1.0") + body)
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.0 200 "), answer
            assert b"100 Continue" not in answer
            writer.close()
            assert node.bodies == [body]

    run(scenario())


# ---------------------------------------------------------------- connections


def test_connections_past_the_per_address_limit_are_closed_at_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Past the limit, new connections are closed without a word; the refusal is logged once
    while the address stays at the limit, and once more when it is below it again."""

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], maxConnectionsPerAddress=2, headerReadTimeoutSec=30.0) as gateway,
        ):
            held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(2)]
            for _ in range(2):
                reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
                assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a word
                writer.close()
            assert connection_lines() == [refusing]
            # one closed: below the limit again (said once), though another is still open
            held[0][1].close()
            await held[0][1].wait_closed()
            await asyncio.sleep(0.1)
            assert connection_lines() == [refusing, below]
            held[1][1].close()
            await held[1][1].wait_closed()
            await asyncio.sleep(0.1)
            assert await gateway.metric("exo_gateway_connections_refused_total") == 2
            assert await gateway.metric("exo_gateway_connections_open") == 1  # this request's
            # a held connection that sends a request is served as any other
            held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(1)]
            reader, writer = held[0]
            writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()

    refusing = (
        "WARNING",
        "client 127.0.0.1 has 2 connections open, the most allowed "
        "(maxConnectionsPerAddress): closing its new ones until some close",
    )
    below = ("INFO", "client 127.0.0.1 is below maxConnectionsPerAddress again")

    def connection_lines() -> list[tuple[str, str]]:
        return [
            (r.levelname, r.getMessage())
            for r in caplog.records
            if r.name == "exo_nixos.gateway.connections"
        ]

    with caplog.at_level(logging.INFO, logger="exo_nixos.gateway.connections"):
        run(scenario())
    assert connection_lines() == [refusing, below]


def test_the_per_address_limit_holds_as_connections_come_and_go() -> None:
    """Closing a connection gives back one place, no more: after connections opened and
    closed in every order, the limit is what it was; and a client that leaves before the
    header-read deadline is not counted as timed out."""

    async def refused(port: int) -> bool:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            async with asyncio.timeout(0.3):
                return await reader.read() == b""
        except TimeoutError:
            return False  # still open: admitted
        finally:
            writer.close()

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], maxConnectionsPerAddress=3, headerReadTimeoutSec=0.5) as gateway,
        ):
            for _ in range(2):
                opened = [
                    await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(3)
                ]
                assert await refused(gateway.port)
                for _, writer in opened[:2]:  # two places back
                    writer.close()
                    await writer.wait_closed()
                await asyncio.sleep(0.1)
                more = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(2)]
                assert await refused(gateway.port)  # 3 open again: the fourth is refused
                for _, writer in [*opened[2:], *more]:
                    writer.close()
                    await writer.wait_closed()
                await asyncio.sleep(0.1)
            await asyncio.sleep(0.6)  # past the header-read deadline of every connection
            # each was closed by its client first (or refused): none timed out
            assert await gateway.metric("exo_gateway_header_timeouts_total") == 0

    run(scenario())


def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], headerReadTimeoutSec=0.2, keepAliveTimeoutSec=30.0) as gateway,
        ):
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            assert await gateway.metric("exo_gateway_header_timeouts_total") == 1
            # a request in time disarms it: the connection stays for the next one
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(5):
                head = await reader.readuntil(b"\r\n\r\n")
                await reader.readexactly(int(header_lines(head)["content-length"]))
            await asyncio.sleep(0.4)
            writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()
            assert await gateway.metric("exo_gateway_header_timeouts_total") == 1

    with caplog.at_level(logging.DEBUG, logger="exo_nixos.gateway.connections"):
        run(scenario())
    assert [
        (r.levelname, r.getMessage())
        for r in caplog.records
        if r.name == "exo_nixos.gateway.connections"
    ] == [("DEBUG", "closing a connection from 127.0.0.1: no request within 0.2s")]


def test_a_client_that_reads_slowly_gets_the_whole_answer() -> None:
    """A large answer fills the client's socket; the gateway waits (aiohttp pauses writing)
    and goes on when the client reads again: the pause and the resume reach aiohttp."""
    size = 16 * 1024 * 1024
    payload = bytes(range(256)) * (size // 256)

    async def big(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
        response.content_length = size
        await response.prepare(request)
        for start in range(0, size, 1 << 20):
            await response.write(payload[start : start + (1 << 20)])
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with backend(big) as node, served([node.url], streamIdleTimeoutSec=30.0) as gateway:
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.connect(("127.0.0.1", gateway.port))
            sock.setblocking(False)
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET /blob HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n")
            await asyncio.sleep(0.5)  # nothing read: the gateway's writes back up
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200"), head
                body = await reader.read()
            writer.close()
            assert len(body) == size and body == payload

    run(scenario())


def test_a_malformed_request_is_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        async with backend() as node, served([node.url]) as gateway:
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(b"NOT HTTP AT ALL\r\n\r\n")
            answer = await asyncio.wait_for(reader.read(), 5)
            assert answer.startswith(b"HTTP/1.0 400") or answer.startswith(b"HTTP/1.1 400")
            writer.close()

    with caplog.at_level(logging.DEBUG, logger="exo_nixos.gateway.http"):
        run(scenario())
    records = [r for r in caplog.records if r.name == "exo_nixos.gateway.http"]
    assert records, caplog.text
    for record in records:
        assert record.exc_info is None and record.exc_text is None
        assert "\n" not in record.getMessage()
    assert [r.getMessage() for r in records] == [
        "Error handling request from 127.0.0.1: 400, message: Invalid method encountered: "
        "b'NOT HTTP AT ALL' ^"
    ]


# ---------------------------------------------------------------- keys


def test_sighup_reloads_the_key_file_and_a_bad_one_keeps_the_old_keys(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")

    async def status(url: str, key: str) -> int:
        headers = {"Authorization": f"Bearer {key}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            return r.status

    async def until(predicate: Any) -> None:
        for _ in range(250):  # a reload is a worker thread's read: polled, 5 s at most
            if await predicate():
                return
            await asyncio.sleep(0.02)
        raise TimeoutError("no reload seen in 5 s")

    async def scenario() -> None:
        async with backend() as node, served([node.url], keys_file=str(keys), key=KEY_A) as gateway:
            url = gateway.url + "/v1/models"
            assert await status(url, KEY_A) == 200
            assert await status(url, KEY_B) == 401
            assert await gateway.metric("exo_gateway_api_keys") == 1
            write_keys(keys, f"alice:{KEY_A}\nbob:{KEY_B}\n")
            os.kill(os.getpid(), signal.SIGHUP)

            async def reloaded() -> bool:
                return await gateway.metric("exo_gateway_key_reloads_total", result="ok") == 1

            await until(reloaded)
            assert await status(url, KEY_B) == 200
            assert await gateway.metric("exo_gateway_api_keys") == 2
            # by key and model; /v1/models names no model
            assert await gateway.metric("exo_gateway_key_requests_total", key="bob", model="") == 1
            keys.chmod(0o644)  # readable by anyone: refused, the old set stays
            os.kill(os.getpid(), signal.SIGHUP)

            async def refused() -> bool:
                return await gateway.metric("exo_gateway_key_reloads_total", result="error") == 1

            await until(refused)
            assert await status(url, KEY_B) == 200
            assert await gateway.metric("exo_gateway_api_keys") == 2

    run(scenario())


def test_sighup_reloads_the_policy_file_and_a_bad_one_keeps_the_last_good_policy(
    tmp_path: Path,
) -> None:
    """The policy file is read again with the keys; each read is counted as ok or error, and a
    bad file leaves the policy last read in force."""
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    policy = tmp_path / "policy.json"
    policy.write_text('{"alice": {"requestsPerMinute": 100}}')
    policy.chmod(0o600)

    async def status(url: str) -> int:
        headers = {"Authorization": f"Bearer {KEY_A}"}
        async with aiohttp.ClientSession() as session, session.get(url, headers=headers) as r:
            return r.status

    async def reloads(gateway: Any, result: str, count: int) -> None:
        for _ in range(250):  # a reload is a worker thread's read: polled, 5 s at most
            if await gateway.metric("exo_gateway_policy_reloads_total", result=result) == count:
                return
            await asyncio.sleep(0.02)
        raise TimeoutError(f"no {result} reload seen in 5 s")

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], keys_file=str(keys), key=KEY_A, policyFile=str(policy)) as gateway,
        ):
            url = gateway.url + "/v1/models"
            assert await status(url) == 200
            policy.write_text('{"alice": {"requestsPerMinute": 1}}')
            os.kill(os.getpid(), signal.SIGHUP)
            await reloads(gateway, "ok", 1)
            assert await gateway.metric("exo_gateway_policy_reloads_total", result="error") == 0
            assert await status(url) == 429  # the new limit applies
            policy.write_text('{"alice": {"requestsPerMinute": "lots"}}')
            os.kill(os.getpid(), signal.SIGHUP)
            await reloads(gateway, "error", 1)
            assert await gateway.metric("exo_gateway_policy_reloads_total", result="ok") == 1
            assert await status(url) == 429  # the last good policy stays
            assert await gateway.metric("exo_gateway_key_reloads_total", result="ok") == 2

    run(scenario())


def test_sighup_without_a_policy_file_counts_no_policy_reload(tmp_path: Path) -> None:
    """Policies from the config alone: a SIGHUP reloads the keys, and no policy read is
    counted (there is no file to read)."""
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")

    async def scenario() -> None:
        policies = {"alice": {"requestsPerMinute": 100}}
        async with (
            backend() as node,
            served([node.url], keys_file=str(keys), key=KEY_A, keyPolicies=policies) as gateway,
        ):
            os.kill(os.getpid(), signal.SIGHUP)
            for _ in range(250):
                if await gateway.metric("exo_gateway_key_reloads_total", result="ok") == 1:
                    break
                await asyncio.sleep(0.02)
            else:
                raise TimeoutError("no key reload seen in 5 s")
            for result in ("ok", "error"):
                metric = "exo_gateway_policy_reloads_total"
                assert await gateway.metric(metric, result=result) == 0

    run(scenario())


def test_key_policies_limit_refuse_and_count_usage_in_process(tmp_path: Path) -> None:
    """Per-key policy through the gateway's own process: a model outside the key's list is a
    403, past its requests per minute a 429 with Retry-After, past its tokens per minute
    (EXO's usage, from a document or a stream) a 429; usage counts by key and model, and an
    error answer's usage is not counted."""
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\nbob:{KEY_B}\n")
    usage_event = b'data: {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}'

    async def exo(request: web.Request) -> web.StreamResponse:
        document = json.loads(await request.read())
        if document["model"] == "broken":
            usage = {"prompt_tokens": 100, "completion_tokens": 100}
            return web.json_response({"error": "bad", "usage": usage}, status=400)
        if document.get("stream"):
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            await response.write(b'data: {"choices": []}\n\n' + usage_event + b"\n\n")
            await response.write(b"data: [DONE]\n\n")
            await response.write_eof()
            return response
        return web.json_response({"usage": {"prompt_tokens": 2, "completion_tokens": 5}})

    async def post(url: str, key: str, model: str, stream: bool = False) -> Any:
        headers = {"Authorization": f"Bearer {key}"}
        body = {"model": model, "stream": stream, "messages": []}
        async with (
            aiohttp.ClientSession() as session,
            session.post(url, json=body, headers=headers) as r,
        ):
            return r.status, r.headers, await r.read()

    policies = {
        "alice": {"requestsPerMinute": 3, "models": ["m", "broken"]},
        "bob": {"tokensPerMinute": 5},
    }

    async def scenario() -> None:
        async with (
            backend(exo) as node,
            served([node.url], keys_file=str(keys), key=KEY_A, keyPolicies=policies) as gateway,
        ):
            url = gateway.url + "/v1/chat/completions"
            metric = gateway.metric
            assert (await post(url, KEY_A, "m"))[0] == 200
            assert (await post(url, KEY_A, "m", stream=True))[0] == 200
            status, headers, body = await post(url, KEY_A, "other")
            assert status == 403
            assert "Retry-After" not in headers  # waiting would not help
            error = json.loads(body)["error"]
            assert error["type"] == "permission_error" and "'other'" in error["message"], error
            assert await metric("exo_gateway_key_limited_total", key="alice", limit="model") == 1
            assert (await post(url, KEY_A, "broken"))[0] == 400
            status, headers, body = await post(url, KEY_A, "m")
            assert status == 429
            assert 1 <= int(headers["Retry-After"]) <= 60
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
            limit = "requests_per_minute"
            assert await metric("exo_gateway_key_limited_total", key="alice", limit=limit) == 1
            assert node.hits == 3
            tokens = "exo_gateway_key_prompt_tokens_total"
            assert await metric(tokens, key="alice", model="m") == 2 + 3
            assert (
                await metric("exo_gateway_key_completion_tokens_total", key="alice", model="m") == 9
            )
            assert await metric(tokens, key="alice", model="") == 0  # the 400's usage
            completed = "exo_gateway_key_completion_tokens_total"
            assert await metric(completed, key="alice", model="") == 0
            # an answer of 400 and over is not counted under the model the request named
            assert await metric("exo_gateway_key_requests_total", key="alice", model="broken") == 0
            requests = "exo_gateway_key_requests_total"
            assert await metric(requests, key="alice", model="m") == 2
            # bob: tokens per minute; an error answer's usage does not use them up
            assert (await post(url, KEY_B, "broken"))[0] == 400
            assert (await post(url, KEY_B, "m"))[0] == 200  # 7 tokens of 5 used
            status, _, body = await post(url, KEY_B, "m")
            assert status == 429
            assert json.loads(body)["error"]["type"] == "rate_limit_error"
            limit = "tokens_per_minute"
            assert await metric("exo_gateway_key_limited_total", key="bob", limit=limit) == 1
            assert await metric(tokens, key="bob", model="m") == 2

    run(scenario())


# ---------------------------------------------------------------- documents and their failures


def chunked(*parts: bytes, content_type: str = "application/json", pause: float = 0.01) -> Any:
    """A handler that sends ``parts`` as separate chunks, a little apart."""

    async def handler(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.enable_chunked_encoding()
        await response.prepare(request)
        for part in parts:
            await response.write(part)
            await asyncio.sleep(pause)
        await response.write_eof()
        return response

    return handler


def test_a_json_document_in_many_chunks_arrives_whole_and_unchanged() -> None:
    parts = [b'{"choices": [', b'{"text": "a"}', b", ", b'{"text": "b"}', b"]}"]

    async def scenario() -> None:
        async with (
            backend(chunked(*parts)) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
            session.post(gateway.url + "/x") as r,
        ):
            assert r.status == 200
            assert r.headers["Content-Length"] == str(len(b"".join(parts)))
            assert await r.read() == b"".join(parts)

    run(scenario())


MIB = 1 << 20


def test_a_json_document_over_the_buffer_limit_is_passed_on_whole() -> None:
    """Past 1 MiB a document without a length is streamed on: the first MiB read ahead is
    not lost and nothing is cut short."""
    parts = [bytes([65 + i]) * (MIB // 2) for i in range(6)]  # 3 MiB in 6 chunks

    async def scenario() -> None:
        async with (
            backend(chunked(*parts, pause=0)) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/x") as r,
        ):
            assert r.status == 200
            assert "Content-Length" not in r.headers
            assert await r.read() == b"".join(parts)

    run(scenario())


def test_a_json_document_cut_off_past_the_buffer_limit_is_cut_off_not_retried() -> None:
    """Once more than the read-ahead is out, a failure cannot be retried: the client sees an
    incomplete response."""

    dying = cut_off({"Content-Type": "application/json"}, *[b" " * (MIB // 2)] * 4, chunked=True)

    async def scenario() -> None:
        async with (
            backend(dying) as node,
            backend() as other,
            served([node.url, other.url]) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                statuses = []
                for _ in range(2):  # one of the two goes to the dying node
                    try:
                        async with session.get(gateway.url + "/x") as r:
                            await r.read()
                            statuses.append(r.status)
                    except aiohttp.ClientPayloadError:
                        statuses.append(-1)
            assert sorted(statuses) == [-1, 200]
            assert other.hits == 1 and node.hits == 1
            assert await gateway.metric("exo_gateway_retries_total") == 0
            assert await gateway.metric("exo_gateway_aborted_streams_total") == 1

    run(scenario())


def test_a_json_document_that_stalls_before_its_end_is_retried_elsewhere(caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.gateway")

    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        await response.write(b'{"choices": ')
        await asyncio.sleep(30)
        return response

    async def scenario() -> str:
        async with (
            backend(stalling) as node,
            backend() as other,
            served([node.url, other.url], streamIdleTimeoutSec=0.3) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.get(gateway.url + "/x") as r:
                        assert r.status == 200
                        assert await r.json() == {"backend": other.url}
            assert await gateway.metric("exo_gateway_retries_total") == 1
            return node.url

    url = run(scenario())
    assert f"backend {url} down: {url}: response cut off: TimeoutError" in caplog.messages


@pytest.mark.parametrize("content_type", ["text/event-stream", "application/x-ndjson"])
def test_a_stream_is_never_held_back_even_with_a_length(content_type: str) -> None:
    """An event or NDJSON stream with a Content-Length still goes out as it comes."""
    first, second = b'{"n": 1}\n', b'{"n": 2}\n'
    client_has_first = asyncio.Event()

    async def events(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": content_type})
        response.content_length = len(first + second)
        await response.prepare(request)
        await response.write(first)
        await asyncio.wait_for(client_has_first.wait(), 5)
        await response.write(second)
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with (
            backend(events) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/x") as r,
        ):
            assert r.headers["Content-Length"] == str(len(first + second))
            assert await asyncio.wait_for(r.content.readuntil(b"\n"), 5) == first
            client_has_first.set()
            assert await asyncio.wait_for(r.read(), 5) == second

    run(scenario())


def test_a_small_document_of_known_length_cut_off_is_retried() -> None:
    dying = cut_off({"Content-Type": "text/plain"}, b"half of it", length=100)

    async def scenario() -> None:
        async with (
            backend(dying) as node,
            backend() as other,
            served([node.url, other.url]) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.get(gateway.url + "/x") as r:
                        assert await r.json() == {"backend": other.url}
            assert node.hits == 1

    run(scenario())


def test_a_streamed_answer_keeps_its_status_and_reason() -> None:
    async def created(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(
            status=202, reason="Queued Up", headers={"Content-Type": "text/event-stream"}
        )
        await response.prepare(request)
        await response.write(b"data: x\n\n")
        await response.write_eof()
        return response

    async def scenario() -> None:
        async with (
            backend(created) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
            session.get(gateway.url + "/x") as r,
        ):
            assert (r.status, r.reason) == (202, "Queued Up")
            assert await r.read() == b"data: x\n\n"

    run(scenario())


def test_a_backend_slow_to_start_its_answer_is_given_up_for_another() -> None:
    async def slow(request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(30)
        return web.Response(text="late")

    async def scenario() -> None:
        async with (
            backend(slow) as node,
            backend() as other,
            served([node.url, other.url], responseTimeoutSec=0.3) as gateway,
        ):
            async with aiohttp.ClientSession() as session:
                for _ in range(2):
                    async with session.get(gateway.url + "/x") as r:
                        assert await r.json() == {"backend": other.url}
            assert await gateway.metric("exo_gateway_retries_total") == 1
            assert await gateway.metric("exo_gateway_backend_up", backend=node.url) == 0

    run(scenario())


def test_requests_to_one_backend_run_side_by_side() -> None:
    """No limit on connections to a backend: a second request does not wait for the first."""
    both = asyncio.Event()
    inside = 0

    async def meeting(request: web.Request) -> web.StreamResponse:
        nonlocal inside
        inside += 1
        if inside == 2:
            both.set()
        await asyncio.wait_for(both.wait(), 5)
        return web.Response(text="met")

    async def scenario() -> None:
        async with (
            backend(meeting) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession() as session,
        ):

            async def one() -> str:
                async with session.get(gateway.url + "/x") as r:
                    return await r.text()

            answers: list[str] = [*await asyncio.gather(one(), one())]
            assert answers == ["met", "met"]

    run(scenario())


# ---------------------------------------------------------------- what is forwarded


def test_the_request_reaches_the_backend_with_only_end_to_end_headers() -> None:
    seen: list[tuple[str, dict[str, str], bytes]] = []

    async def record(request: web.Request) -> web.StreamResponse:
        seen.append((request.raw_path, dict(request.headers), await request.read()))
        return web.Response(
            text="ok",
            headers={"Connection": "X-Hop", "X-Hop": "1", "X-Kept": "2", "Set-Cookie": "s=1"},
        )

    async def scenario() -> None:
        async with backend(record) as node, served([node.url]) as gateway:
            # a bare client: no User-Agent, Accept-Encoding or Content-Type of its own
            head = (
                b"GET http://gw.example/v1/models?x=1 HTTP/1.1\r\nHost: gw.example\r\n"
                b"Connection: keep-alive, X-Secret-A ,X-Secret-B\r\nX-Secret-A: a\r\n"
                b"X-Secret-B: b\r\nX-Forwarded-For: 192.0.2.7\r\nX-Custom: c\r\n\r\n"
            )
            reader, writer, answer = await raw_exchange(gateway.port, head)
            assert answer.startswith(b"HTTP/1.1 200 "), answer
            headers = header_lines(answer)
            assert "x-hop" not in headers and headers["x-kept"] == "2"
            assert (await body_of(reader, answer)) == b"ok"
            # the next request: no cookie kept from the answer above
            writer.write(b"GET /v1/models HTTP/1.1\r\nHost: gw.example\r\n\r\n")
            async with asyncio.timeout(5):
                answer = await reader.readuntil(b"\r\n\r\n")
            await body_of(reader, answer)
            writer.close()
        (path, headers, body), (_, second, _) = seen
        assert path == "/v1/models?x=1"
        assert body == b""
        assert headers["X-Custom"] == "c"
        for absent in ("X-Secret-A", "X-Secret-B", "User-Agent", "Accept-Encoding"):
            assert absent not in headers, absent
        assert "Content-Type" not in headers and "Content-Length" not in headers
        assert headers["X-Forwarded-For"] == "192.0.2.7, 127.0.0.1"
        assert headers["X-Forwarded-Proto"] == "http"
        assert headers["X-Forwarded-Host"] == "gw.example"
        assert second["X-Forwarded-For"] == "127.0.0.1"
        assert "Cookie" not in second

    run(scenario())


def test_a_redirect_is_passed_on_not_followed() -> None:
    async def moved(request: web.Request) -> web.StreamResponse:
        if request.path == "/new":
            return web.Response(text="followed")
        return web.Response(status=307, headers={"Location": "/new"})

    async def scenario() -> None:
        async with backend(moved) as node, served([node.url]) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.get(gateway.url + "/old", allow_redirects=False) as r,
            ):
                assert r.status == 307 and r.headers["Location"] == "/new"
            assert node.hits == 1

    run(scenario())


def test_a_compressed_answer_passes_undecoded() -> None:
    import gzip

    packed = gzip.compress(b'{"a": 1}' * 100)

    async def gzipped(request: web.Request) -> web.StreamResponse:
        return web.Response(
            body=packed, headers={"Content-Encoding": "gzip", "Content-Type": "application/json"}
        )

    async def scenario() -> None:
        async with (
            backend(gzipped) as node,
            served([node.url]) as gateway,
            aiohttp.ClientSession(auto_decompress=False) as session,
            session.get(gateway.url + "/x", headers={"Accept-Encoding": "gzip"}) as r,
        ):
            assert r.headers["Content-Encoding"] == "gzip"
            assert await r.read() == packed

    run(scenario())


def test_a_body_over_the_limit_without_a_declared_length_is_a_413() -> None:
    async def chunks() -> Any:
        for _ in range(4):
            yield b"x" * 1024

    async def scenario() -> None:
        async with backend() as node, served([node.url], maxBodyBytes=2048) as gateway:
            async with (
                aiohttp.ClientSession() as session,
                session.post(gateway.url + "/v1/chat/completions", data=chunks()) as r,
            ):
                assert r.status == 413
                assert r.headers["Content-Type"] == "application/json; charset=utf-8"
                assert await r.json() == {
                    "error": {
                        "message": "Request Entity Too Large",
                        "type": "invalid_request_error",
                        "code": 413,
                    }
                }
            assert node.hits == 0
            assert (
                await gateway.metric("exo_gateway_requests_total", method="POST", code="413") == 1
            )

    run(scenario())


# ---------------------------------------------------------------- metrics and logs


def test_every_answer_is_counted_and_timed_by_method() -> None:
    async def scenario() -> None:
        async with backend() as node, served([node.url]) as gateway:
            async with aiohttp.ClientSession() as session:
                for method, path in [("GET", "/health"), ("GET", "/v1/models"), ("PUT", "/x")]:
                    async with session.request(method, gateway.url + path) as r:
                        await r.read()
                async with session.get(gateway.url + "/metrics") as r:
                    # Prometheus' text exposition format, as prometheus_client names it
                    assert r.headers["Content-Type"] == CONTENT_TYPE_LATEST
            samples = await gateway.metrics()

            def value(name: str, **labels: str) -> float:
                return samples.get((name, frozenset(labels.items())), 0.0)

            # the /health polls before the test began count too: compare with the counters
            gets = value("exo_gateway_requests_total", method="GET", code="200")
            assert value("exo_gateway_request_duration_seconds_count", method="GET") == gets
            # /metrics itself is neither: its answer starts once its text is made
            assert value("exo_gateway_response_latency_seconds_count", method="GET") == gets
            assert value("exo_gateway_request_duration_seconds_count", method="PUT") == 1
            assert value("exo_gateway_response_latency_seconds_count", method="PUT") == 1
            for name in ("request_duration", "response_latency"):
                for method in ("GET", "PUT"):
                    total = value(f"exo_gateway_{name}_seconds_sum", method=method)
                    assert 0 < total < 60, (name, method, total)
            assert not [k for k in samples if ("method", "None") in k[1]]

    run(scenario())


def test_refused_requests_are_timed_too(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")

    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], keys_file=str(keys), key=KEY_A) as gateway,
        ):
            async with (
                aiohttp.ClientSession() as session,
                session.delete(gateway.url + "/v1/x") as r,
            ):
                assert r.status == 401
            _, writer, answer = await raw_exchange(gateway.port, expect_head(None, 10))
            assert answer.startswith(b"HTTP/1.1 401 ")
            writer.close()
            samples = await gateway.metrics()
            latency = (
                "exo_gateway_response_latency_seconds_sum",
                frozenset({("method", "DELETE")}),
            )
            assert 0 < samples[latency] < 60
            duration = ("exo_gateway_request_duration_seconds_sum", frozenset({("method", "POST")}))
            assert 0 < samples[duration] < 60

    run(scenario())
