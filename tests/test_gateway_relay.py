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
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from tests.exo_double.cluster import Cluster
from tests.exo_double.server import Double, Fault, Log, Options, build_app
from tests.gateway_helpers import KEY_A, KEY_B, write_keys
from tests.gateway_served import app_backend, backend, header_lines, raw_exchange, served

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


def test_a_stream_cut_off_by_its_backend_is_cut_off_for_the_client() -> None:
    """Part of the answer is out: it cannot be retried, and the client must see an incomplete
    response (never one that looks whole). The backend is down until its probe passes."""

    async def dying(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(0.05)
        assert request.transport is not None
        request.transport.abort()
        return response

    async def scenario() -> None:
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
            assert (await gateway.health()) == {
                "status": "degraded",
                "backends": {"healthy": 1, "total": 2},
            }
            assert await gateway.metric("exo_gateway_retries_total") == 0
            assert other.hits <= 1

    run(scenario())


def test_a_stalled_stream_is_cut_off_after_the_idle_timeout() -> None:
    async def stalling(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await response.write(b"data: one\n\n")
        await asyncio.sleep(30)
        return response

    async def scenario() -> None:
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


def test_a_backend_that_refuses_connections_fails_over_and_is_marked_down() -> None:
    async def scenario() -> None:
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

    run(scenario())


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
            assert json.loads(await body_of(reader, answer))["error"]["message"] == (
                "unknown expectation 'magic'"
            )
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


def test_connections_past_the_per_address_limit_are_closed_at_once() -> None:
    async def scenario() -> None:
        async with (
            backend() as node,
            served([node.url], maxConnectionsPerAddress=2, headerReadTimeoutSec=30.0) as gateway,
        ):
            held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(2)]
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            assert await asyncio.wait_for(reader.read(), 5) == b""  # closed without a word
            writer.close()
            for _, w in held:
                w.close()
                await w.wait_closed()
            await asyncio.sleep(0.1)
            assert await gateway.metric("exo_gateway_connections_refused_total") == 1
            assert await gateway.metric("exo_gateway_connections_open") == 1  # this request's
            # a held connection that sends a request is served as any other
            held = [await asyncio.open_connection("127.0.0.1", gateway.port) for _ in range(1)]
            reader, writer = held[0]
            writer.write(b"GET /health HTTP/1.1\r\nHost: gw\r\n\r\n")
            async with asyncio.timeout(5):
                assert (await reader.readuntil(b"\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()

    run(scenario())


def test_a_connection_that_sends_no_request_is_closed_after_the_header_timeout() -> None:
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
            assert await gateway.metric("exo_gateway_key_requests_total", key="bob") == 1
            keys.chmod(0o644)  # readable by anyone: refused, the old set stays
            os.kill(os.getpid(), signal.SIGHUP)

            async def refused() -> bool:
                return await gateway.metric("exo_gateway_key_reloads_total", result="error") == 1

            await until(refused)
            assert await status(url, KEY_B) == 200
            assert await gateway.metric("exo_gateway_api_keys") == 2

    run(scenario())
