"""The gateway as a real process in front of EXO test doubles: keys, proxying, streaming,
failover, body limit, TLS and metrics."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import ssl
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import KEY_A, KEY_B, gateway_config, run_gateway, write_keys

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
AUTH = {"Authorization": f"Bearer {KEY_A}"}


@pytest.fixture
def keys_file(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "api-keys", f"# test keys\nalice:{KEY_A}\n")


@pytest.fixture
def double():
    with run_double("--instance", MODEL) as running:
        yield running


async def fetch(
    method: str,
    url: str,
    *,
    headers: dict[str, str] | None = None,
    body: Any = None,
    data: Any = None,
    ssl_context: ssl.SSLContext | bool = True,
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session,
        session.request(
            method, url, headers=headers, json=body, data=data, ssl=ssl_context
        ) as response,
    ):
        return response.status, dict(response.headers), await response.read()


def call(method: str, url: str, **kwargs: Any) -> tuple[int, dict[str, str], bytes]:
    return asyncio.run(fetch(method, url, **kwargs))


def chat(words: int, *, stream: bool) -> dict[str, Any]:
    text = " ".join(f"w{i}" for i in range(words))
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], "stream": stream}


def sse_events(raw: bytes) -> list[str]:
    return [
        block.removeprefix("data: ")
        for block in raw.decode().split("\n\n")
        if block.startswith("data: ")
    ]


def metric_samples(text: str) -> dict[str, list[Any]]:
    samples: dict[str, list[Any]] = {}
    for family in text_string_to_metric_families(text):
        samples[family.name] = list(family.samples)
    return samples


# --- authentication -----------------------------------------------------------------------


def _timeless(models: dict[str, Any]) -> dict[str, Any]:
    """A /v1/models answer without its `created` stamps: EXO stamps each answer anew."""
    return {**models, "data": [{**m, "created": None} for m in models["data"]]}


def test_keys_no_key_wrong_key_right_key(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        status, headers, body = call("GET", f"{gateway.url}/v1/models")
        assert status == 401
        assert headers["WWW-Authenticate"].startswith("Basic")
        assert json.loads(body)["error"]["type"] == "authentication_error"

        status, _, _ = call("GET", f"{gateway.url}/v1/models", headers={"x-api-key": KEY_B})
        assert status == 401
        status, _, _ = call(
            "GET", f"{gateway.url}/v1/models", headers={"Authorization": f"Bearer {KEY_B}"}
        )
        assert status == 401

        _, _, direct = call("GET", f"{double.url}/v1/models")
        for headers in (AUTH, {"x-api-key": KEY_A}):
            status, _, body = call("GET", f"{gateway.url}/v1/models", headers=headers)
            assert status == 200
            assert _timeless(json.loads(body)) == _timeless(json.loads(direct))
        # Browsers (the dashboard) send the key as a Basic password.
        status, _, body = call(
            "GET",
            f"{gateway.url}/",
            headers={"Authorization": "Basic " + base64.b64encode(f"me:{KEY_A}".encode()).decode()},
        )
        assert status == 200 and b"<html" in body

        # /health is public by default; /metrics is not.
        status, _, body = call("GET", f"{gateway.url}/health")
        assert status == 200 and json.loads(body)["status"] in {"ok", "degraded"}
        assert call("GET", f"{gateway.url}/metrics")[0] == 401
        assert call("GET", f"{gateway.url}/metrics", headers=AUTH)[0] == 200


def test_sighup_reloads_keys_and_keeps_them_on_a_bad_file(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        url = f"{gateway.url}/node_id"
        assert call("GET", url, headers=AUTH)[0] == 200

        keys_file.write_text(f"bob:{KEY_B}\n")
        gateway.signal(signal.SIGHUP)
        deadline = time.monotonic() + 10
        while call("GET", url, headers=AUTH)[0] != 401:
            assert time.monotonic() < deadline, gateway.log_text()
            time.sleep(0.05)
        assert call("GET", url, headers={"x-api-key": KEY_B})[0] == 200

        keys_file.write_text("not-a-valid-key\n")
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("keeping the 1 loaded")
        assert call("GET", url, headers={"x-api-key": KEY_B})[0] == 200
        assert call("GET", url, headers=AUTH)[0] == 401


def test_sighup_with_a_fifo_for_key_file_keeps_serving(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        keys_file.unlink()
        os.mkfifo(keys_file, 0o600)
        gateway.signal(signal.SIGHUP)
        gateway.wait_for_log("API keys not reloaded")
        assert "not a regular file" in gateway.log_text()
        # the loop was never blocked: the gateway answers, with the keys it had
        assert call("GET", f"{gateway.url}/health")[0] == 200
        assert call("GET", f"{gateway.url}/node_id", headers=AUTH)[0] == 200


def test_key_file_open_to_every_user_stops_start_with_one_line(tmp_path: Path):
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    keys.chmod(0o644)
    config = gateway_config(
        port=free_port(), keys_file=keys, static_backends=["http://127.0.0.1:9"]
    )
    with pytest.raises(RuntimeError) as caught, run_gateway(config):
        pass
    message = str(caught.value)
    assert "exited with 2" in message
    assert f"{keys}: the API key file is readable or writable by every user" in message
    assert "chmod 0440" in message and "Traceback" not in message


def test_clients_key_is_not_forwarded_and_forwarded_headers_are_set(keys_file):
    seen: list[dict[str, str]] = []

    async def scenario() -> None:
        from aiohttp import web

        async def echo(request: web.Request) -> web.Response:
            seen.append(dict(request.headers))
            return web.json_response(
                "node", headers={"Access-Control-Allow-Origin": "*", "X-Exo": "1"}
            )

        app = web.Application()
        app.router.add_get("/{tail:.*}", echo)
        runner = web.AppRunner(app)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            config = gateway_config(
                port=free_port(), keys_file=keys_file, static_backends=[f"http://127.0.0.1:{port}"]
            )
            loop = asyncio.get_running_loop()
            with run_gateway(config) as gateway:
                headers = {
                    **AUTH,
                    "x-api-key": KEY_A,
                    "X-Forwarded-For": "192.0.2.1",
                    "Connection": "keep-alive, X-Drop-Me",
                    "X-Drop-Me": "1",
                    "X-Keep-Me": "1",
                }
                status, answer, _ = await fetch(
                    "GET", f"{gateway.url}/node_id?x=1", headers=headers
                )
                assert status == 200
                assert "Access-Control-Allow-Origin" not in answer
                assert answer["X-Exo"] == "1"
                await loop.run_in_executor(None, gateway.stop)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
    forwarded = [h for h in seen if h.get("X-Keep-Me")]
    assert len(forwarded) == 1
    headers = {k.lower(): v for k, v in forwarded[0].items()}
    assert "authorization" not in headers
    assert "x-api-key" not in headers
    assert "x-drop-me" not in headers
    assert headers["x-forwarded-for"] == "192.0.2.1, 127.0.0.1"
    assert headers["x-forwarded-proto"] == "http"


def test_exposed_gateway_without_keys_is_refused(tmp_path: Path):
    config = gateway_config(port=free_port(), static_backends=["http://127.0.0.1:9"])
    config["gateway"]["listenAddress"] = "0.0.0.0"
    with pytest.raises(RuntimeError, match="without apiKeysFile would expose"), run_gateway(config):
        pass


def test_bad_key_file_stops_start_with_one_line(tmp_path: Path):
    keys = write_keys(tmp_path / "keys", "short\n")
    config = gateway_config(
        port=free_port(), keys_file=keys, static_backends=["http://127.0.0.1:9"]
    )
    with pytest.raises(RuntimeError) as caught, run_gateway(config):
        pass
    message = str(caught.value)
    assert "exited with 2" in message
    assert "line 1: key 'line1' is shorter than 16 characters" in message
    assert "Traceback" not in message


def raw_request(port: int, data: bytes, *, source: str = "127.0.0.1") -> bytes:
    """Send raw bytes to the gateway and read its answer until it closes the connection or
    stays silent for a second after answering (keep-alive)."""
    with socket.create_connection(
        ("127.0.0.1", port), timeout=10, source_address=(source, 0)
    ) as sock:
        sock.sendall(data)
        answer = b""
        while True:
            try:
                chunk = sock.recv(65536)
            except TimeoutError:
                break
            if not chunk:
                break
            answer += chunk
            sock.settimeout(1.0)
        return answer


def test_non_utf8_key_is_a_401_without_a_traceback(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        for header in (b"Authorization: Bearer ", b"x-api-key: "):
            answer = raw_request(
                gateway.port,
                b"GET /node_id HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n"
                + header
                + b"\xff\xfe" * 12
                + b"\r\n\r\n",
            )
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            assert json.loads(answer.partition(b"\r\n\r\n")[2])["error"]["code"] == 401
        assert "Traceback" not in gateway.log_text()
        assert "Error" not in gateway.log_text()


def test_malformed_requests_log_one_line_each(keys_file):
    config = gateway_config(
        port=free_port(), keys_file=keys_file, static_backends=["http://127.0.0.1:9"]
    )
    malformed = [
        b"GET / HTTP/1.1\r\nHost: gw\r\nno colon in this header\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nContent-Length: x\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nX-Long: " + b"a" * 20000 + b"\r\n\r\n",
        b"GET / HTTP/1.1\r\nHost: gw\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    ]
    with run_gateway(config) as gateway:
        for request in malformed:
            before = gateway.log_text().count("\n")
            answer = raw_request(gateway.port, request)
            assert answer.split(b" ", 2)[1] == b"400", answer[:200]
            deadline = time.monotonic() + 5
            while gateway.log_text().count("\n") == before:
                assert time.monotonic() < deadline, gateway.log_text()
                time.sleep(0.05)
            time.sleep(0.2)  # anything else the event writes
            new = gateway.log_text().splitlines()[before:]
            assert len(new) == 1, new
            assert "from 127.0.0.1" in new[0] and "ERROR" not in new[0], new
        assert "Traceback" not in gateway.log_text()


def test_expect_100_continue_checks_the_key_first(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    body = json.dumps(chat(3, stream=False)).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        b"Expect: 100-continue\r\nContent-Length: " + str(len(body)).encode() + b"\r\n"
    )
    with run_gateway(config) as gateway:
        for key in (None, KEY_B):
            headers = head + (f"Authorization: Bearer {key}\r\n".encode() if key else b"")
            # the headers only: a gateway that said "100 Continue" would wait for the body
            answer = raw_request(gateway.port, headers + b"\r\n")
            assert answer.startswith(b"HTTP/1.1 401 "), answer[:200]
            assert b"100 Continue" not in answer

        with socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock:
            sock.sendall(head + f"Authorization: Bearer {KEY_A}\r\n\r\n".encode())
            assert sock.recv(64).startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
            sock.sendall(body)
            answer = b""
            while b"\r\n\r\n" not in answer:
                answer += sock.recv(65536)
            assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed ``sock`` (end of file or reset); False while it is open."""
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except ConnectionError:
        return True


def test_idle_connections_are_closed_and_capped_per_address(keys_file):
    # 306 connections without a key, sending nothing, from one address, against a gateway
    # that may open 256 files: it keeps answering others, and closes every idle one.
    config = gateway_config(
        port=free_port(), keys_file=keys_file, static_backends=["http://127.0.0.1:9"]
    )
    config["gateway"].update(
        headerReadTimeoutSec=2, keepAliveTimeoutSec=2, maxConnectionsPerAddress=64
    )
    with run_gateway(config, max_files=256) as gateway:
        idle = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(306)]
        try:
            for sock in idle:
                sock.setblocking(False)
            # another address is served meanwhile (127.0.0.2 is loopback too)
            answer = raw_request(
                gateway.port,
                b"GET /health HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n",
                source="127.0.0.2",
            )
            assert answer.startswith(b"HTTP/1.1 "), gateway.log_text()
            status = int(answer.split(b" ", 2)[1])
            assert status in {200, 503}  # the backend is down: the gateway itself answers
            deadline = time.monotonic() + 30
            while not all(closed_by_server(s) for s in idle):
                assert time.monotonic() < deadline, sum(map(closed_by_server, idle))
                time.sleep(0.1)
        finally:
            for sock in idle:
                sock.close()
        log = gateway.log_text()
        _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
        samples = metric_samples(text.decode())
        refused = samples["exo_gateway_connections_refused"][0].value
        timed_out = samples["exo_gateway_header_timeouts"][0].value
        # each one was either refused at once or admitted and closed when it sent nothing
        assert refused + timed_out == 306 and refused >= 306 - 3 * 64
        # the limit is logged when the address reaches it and when it drops below, not once
        # per refused connection
        at_limit = log.count("client 127.0.0.1 has 64 connections open")
        assert 1 <= at_limit <= 306 // 64, log
        assert log.count("client 127.0.0.1 is below maxConnectionsPerAddress") in {
            at_limit - 1,
            at_limit,
        }
        assert "Traceback" not in log and "Too many open files" not in log, log


def test_keep_alive_connection_is_closed_when_idle(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    config["gateway"]["keepAliveTimeoutSec"] = 1
    request = f"GET /node_id HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {KEY_A}\r\n\r\n"
    with (
        run_gateway(config) as gateway,
        socket.create_connection(("127.0.0.1", gateway.port), timeout=10) as sock,
    ):
        sock.sendall(request.encode())
        answer = b""
        while not answer.endswith(json.dumps(double.node_id).encode()):
            chunk = sock.recv(65536)
            assert chunk, answer
            answer += chunk
        assert answer.startswith(b"HTTP/1.1 200 ")
        # nothing more is sent: the gateway closes the connection
        sock.settimeout(30)
        assert sock.recv(1) == b""


# --- proxying -----------------------------------------------------------------------------


def test_every_route_passes_through(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        for method, path, body in [
            ("GET", "/", None),
            ("GET", "/node_id", None),
            ("GET", "/state", None),
            ("GET", "/models", None),
            ("GET", "/ollama/api/version", None),
            ("POST", "/v1/chat/completions", chat(5, stream=False)),
            ("POST", "/v1/chat/completions", {"model": "missing", "messages": []}),
        ]:
            direct = call(method, f"{double.url}{path}", body=body)
            proxied = call(method, f"{gateway.url}{path}", body=body, headers=AUTH)
            assert proxied[0] == direct[0], path
            assert proxied[1].get("Content-Type") == direct[1].get("Content-Type"), path
            if path in {"/v1/chat/completions"} and direct[0] == 200:
                a, b = json.loads(proxied[2]), json.loads(direct[2])
                assert a["choices"] == b["choices"]
            elif path != "/state":
                assert proxied[2] == direct[2], path


def test_streams_complete_in_order_and_unbuffered(keys_file):
    with run_double("--instance", MODEL, "--stream-delay", "0.05") as slow:
        config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[slow.url])
        with run_gateway(config) as gateway:

            async def stream(url: str, headers: dict[str, str]) -> tuple[list[str], list[float]]:
                chunks: list[bytes] = []
                arrivals: list[float] = []
                async with (
                    aiohttp.ClientSession() as session,
                    session.post(url, json=chat(40, stream=True), headers=headers) as response,
                ):
                    assert response.status == 200
                    assert response.content_type == "text/event-stream"
                    async for chunk in response.content.iter_any():
                        chunks.append(chunk)
                        arrivals.append(time.monotonic())
                return sse_events(b"".join(chunks)), arrivals

            async def scenario() -> None:
                direct, _ = await stream(f"{slow.url}/v1/chat/completions", {})
                results = await asyncio.gather(
                    *(stream(f"{gateway.url}/v1/chat/completions", AUTH) for _ in range(8))
                )
                for events, arrivals in results:
                    assert events[-1] == "[DONE]"
                    tokens = [json.loads(e)["choices"][0]["delta"]["content"] for e in events[:-1]]
                    expected = [
                        json.loads(e)["choices"][0]["delta"]["content"] for e in direct[:-1]
                    ]
                    assert tokens == expected
                    assert len(tokens) > 40
                    # Unbuffered: events arrive spread over the generation, not at once at its end.
                    assert len(arrivals) > 10
                    assert arrivals[-1] - arrivals[0] > 1.0

            asyncio.run(scenario())


def test_body_size_limit_gives_413(double, keys_file):
    config = gateway_config(
        port=free_port(), keys_file=keys_file, static_backends=[double.url], max_body_bytes=4096
    )
    with run_gateway(config) as gateway:
        url = f"{gateway.url}/v1/chat/completions"
        small = chat(10, stream=False)
        assert call("POST", url, body=small, headers=AUTH)[0] == 200
        big = json.dumps(chat(2000, stream=False)).encode()
        status, _, body = call("POST", url, data=big, headers=AUTH)
        assert status == 413
        assert "over the limit of 4096" in json.loads(body)["error"]["message"]

        async def chunked() -> int:
            async def parts():
                for _ in range(10):
                    yield b"x" * 1024

            async with (
                aiohttp.ClientSession() as session,
                session.post(url, data=parts(), headers=AUTH) as response,
            ):
                return response.status

        assert asyncio.run(chunked()) == 413


def test_no_backend_answers_gives_502(keys_file):
    dead = f"http://127.0.0.1:{free_port()}"
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[dead])
    with run_gateway(config) as gateway:
        for _ in range(5):
            status, headers, body = call("GET", f"{gateway.url}/models", headers=AUTH)
            assert status == 502
            assert headers["Content-Type"].startswith("application/json")
            # no backend address, no client-library error in what the client gets
            assert json.loads(body) == {
                "error": {
                    "message": "no EXO node could answer the request",
                    "type": "gateway_error",
                    "code": 502,
                }
            }
        status, _, body = call("GET", f"{gateway.url}/health")
        assert status == 503 and json.loads(body)["status"] == "down"
        # the log says so: once for the backend, once for the pool, not once per request
        gateway.wait_for_log("no EXO backend is up")
        time.sleep(1.5)  # three more health checks, which must not repeat it
        log = gateway.log_text()
        assert log.count(f"backend {dead} down: ") == 1, log
        assert log.count("no EXO backend is up (1 known)") == 1, log
        assert "Traceback" not in log


# --- failover -----------------------------------------------------------------------------


def test_failover_under_load_loses_no_request(keys_file):
    with (
        run_double("--instance", MODEL) as first,
        run_double("--instance", MODEL) as second,
        run_double("--instance", MODEL) as third,
    ):
        backends = [first, second, third]
        config = gateway_config(
            port=free_port(), keys_file=keys_file, static_backends=[d.url for d in backends]
        )
        with run_gateway(config) as gateway:
            url = f"{gateway.url}/v1/chat/completions"
            total = 900
            done = 0
            failures: list[str] = []
            served_by: dict[str, int] = {}
            killed = asyncio.Event()

            async def worker(session: aiohttp.ClientSession, queue: asyncio.Queue[int]) -> None:
                nonlocal done
                while True:
                    try:
                        queue.get_nowait()
                    except asyncio.QueueEmpty:
                        return
                    async with session.post(url, json=chat(8, stream=False)) as response:
                        body = await response.read()
                        if response.status != 200:
                            failures.append(f"{response.status} {body[:200]!r}")
                        else:
                            reply = json.loads(body)["choices"][0]["message"]["content"]
                            node = reply.split()[3]
                            served_by[node] = served_by.get(node, 0) + 1
                    done += 1
                    if done == total // 3 and not killed.is_set():
                        killed.set()
                        first.process.kill()

            async def scenario() -> None:
                queue: asyncio.Queue[int] = asyncio.Queue()
                for i in range(total):
                    queue.put_nowait(i)
                async with aiohttp.ClientSession(headers=AUTH) as session:
                    await asyncio.gather(*(worker(session, queue) for _ in range(48)))

            asyncio.run(scenario())
            assert killed.is_set()
            assert failures == []
            assert done == total
            # Every node served some; the killed one only before it died.
            assert len(served_by) == 3, served_by

            _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
            samples = metric_samples(text.decode())
            up = {s.labels["backend"]: s.value for s in samples["exo_gateway_backend_up"]}
            assert up[first.url] == 0
            assert up[second.url] == 1 and up[third.url] == 1
            # Requests in flight on the killed node were sent again to the others.
            assert samples["exo_gateway_retries"][0].value >= 1


def test_stream_cut_by_a_dying_backend_is_not_passed_as_complete(keys_file):
    with run_double("--instance", MODEL, "--stream-delay", "0.05") as dying:
        config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[dying.url])
        with run_gateway(config) as gateway:

            async def scenario() -> None:
                async with (
                    aiohttp.ClientSession(headers=AUTH) as session,
                    session.post(
                        f"{gateway.url}/v1/chat/completions", json=chat(60, stream=True)
                    ) as response,
                ):
                    assert response.status == 200
                    first = await response.content.readany()
                    assert first
                    dying.process.kill()
                    with pytest.raises(aiohttp.ClientPayloadError):
                        await response.read()

            asyncio.run(scenario())


def _completion(url: str) -> tuple[int, bytes]:
    status, _, body = call(
        "POST", f"{url}/v1/chat/completions", headers=AUTH, body=chat(3, stream=False)
    )
    return status, body


def test_cut_off_json_200_is_retried_elsewhere_never_passed_on(keys_file):
    # Upstream answers a non-streamed completion whose runner fails with a 200 whose chunked
    # body never ends (the double's "cutoff" fault): it is a failure, not an answer.
    with (
        run_double("--instance", MODEL) as failing,
        run_double("--instance", MODEL) as healthy,
    ):
        failing.set_fault("cutoff")
        alone = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[failing.url])
        with run_gateway(alone) as gateway:
            for _ in range(3):
                status, body = _completion(gateway.url)
                assert status == 502, body
                assert json.loads(body)["error"]["type"] == "gateway_error"
            assert "response cut off" in gateway.log_text()
        both = gateway_config(
            port=free_port(), keys_file=keys_file, static_backends=[failing.url, healthy.url]
        )
        with run_gateway(both) as gateway:
            for _ in range(6):
                status, body = _completion(gateway.url)
                assert status == 200, body
                reply = json.loads(body)["choices"][0]["message"]["content"]
                assert reply.split()[3] == healthy.node_id[:8]


def test_sse_error_event_reaches_the_client_and_the_backend_stays_up(keys_file):
    # Upstream reports a runner failure in a stream as an SSE event after its 200:
    # data: {"error": {...}} then data: [DONE]. The gateway has sent the 200 by then; it
    # passes the event on unchanged (the client's OpenAI library raises it) and the node,
    # whose API answered, is not taken for down.
    with run_double("--instance", MODEL) as double:
        double.set_fault("sse_error")
        config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
        with run_gateway(config) as gateway:
            status, headers, body = call(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                headers=AUTH,
                body=chat(3, stream=True),
            )
            assert status == 200
            assert headers["Content-Type"].startswith("text/event-stream")
            events = sse_events(body)
            assert events[-1] == "[DONE]"
            error = json.loads(events[0])["error"]
            assert (error["type"], error["code"]) == ("InternalServerError", 500)
            _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
            samples = metric_samples(text.decode())
            up = {s.labels["backend"]: s.value for s in samples["exo_gateway_backend_up"]}
            assert up[double.url] == 1
            assert "down" not in gateway.log_text()


def test_stalled_backend_stream_is_cut_after_the_idle_timeout(keys_file):
    released: list[str] = []  # the paths whose backend connection the gateway closed

    async def scenario() -> None:
        from aiohttp import web

        async def stall(request: web.Request) -> web.StreamResponse:
            json_body = request.path == "/json"
            response = web.StreamResponse(
                headers={"Content-Type": "application/json" if json_body else "text/event-stream"}
            )
            await response.prepare(request)
            await response.write(b'{"partial": ' if json_body else b"data: first\n\n")
            try:
                await asyncio.sleep(3600)  # and then nothing, with the connection open
            finally:
                released.append(request.path)
            return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", stall)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            config = gateway_config(
                port=free_port(), keys_file=keys_file, static_backends=[f"http://127.0.0.1:{port}"]
            )
            config["gateway"]["streamIdleTimeoutSec"] = 1
            loop = asyncio.get_running_loop()
            with run_gateway(config) as gateway:
                async with aiohttp.ClientSession(
                    headers=AUTH, timeout=aiohttp.ClientTimeout(total=60)
                ) as session:
                    async with session.post(f"{gateway.url}/v1/chat/completions") as response:
                        assert response.status == 200
                        assert await response.content.readany() == b"data: first\n\n"
                        # cut off, not ended: the client sees an incomplete response
                        with pytest.raises(aiohttp.ClientPayloadError):
                            await response.read()
                    # a JSON body that stalls is a failure before the response: 502
                    async with session.get(f"{gateway.url}/json") as response:
                        assert response.status == 502
                        error = (await response.json())["error"]
                        assert error["type"] == "gateway_error"
                    deadline = time.monotonic() + 10
                    while not {"/json", "/v1/chat/completions"} <= set(released):
                        assert time.monotonic() < deadline, (released, gateway.log_text())
                        await asyncio.sleep(0.05)
                    _, _, text = await fetch("GET", f"{gateway.url}/metrics", headers=AUTH)
                stalled = metric_samples(text.decode())["exo_gateway_stalled_streams"]
                assert {
                    s.labels["side"]: s.value for s in stalled if s.name.endswith("_total")
                } == {"backend": 1}
                assert "stalled: no data for 1s; cut off" in gateway.log_text()
                await loop.run_in_executor(None, gateway.stop)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())


@pytest.mark.parametrize("edges", [True, False], ids=["edge", "no-edge-yet"])
def test_peers_are_discovered_from_the_local_node(keys_file, edges: bool):
    # Two nodes on one machine share the API port on two loopback addresses, as two hosts
    # would: the gateway learns the second from the first's cluster state. The peer also
    # reports an IPv6 address (::1), where it does not listen: upstream's API binds IPv4
    # 0.0.0.0 only. With an edge, its URL (IPv4, the local node's own API port) comes first;
    # before any edge (no reachability probe passed yet) the interfaces' order is all there
    # is, the IPv6 URL comes first and fails, and the gateway must move on to the IPv4 one.
    port = free_port()
    peer_id = "peer" + "0" * 28
    peer_args = ["--peer", f"{peer_id}=::1", "--peer", f"{peer_id}=127.0.0.2"]
    with (
        run_double(
            "--instance",
            MODEL,
            "--api-port",
            str(port),
            "--bind",
            "127.0.0.1",
            *peer_args,
            *([] if edges else ["--no-edges"]),
        ) as local,
        run_double(
            "--instance",
            MODEL,
            "--bind",
            "127.0.0.2",
            "--api-port",
            str(port),
            node_id=peer_id,
            wait=False,
        ) as peer,
    ):
        peer_url = f"http://127.0.0.2:{port}"
        ipv6_url = f"http://[::1]:{port}"
        label = peer_url if edges else ipv6_url  # a backend is labelled by its first URL
        deadline = time.monotonic() + 20
        while True:
            try:
                if call("GET", f"{peer_url}/node_id")[0] == 200:
                    break
            except aiohttp.ClientError:
                pass
            assert time.monotonic() < deadline, peer.log_text()
            time.sleep(0.1)
        config = gateway_config(
            port=free_port(), keys_file=keys_file, api_port=port, local_backend=True
        )
        with run_gateway(config) as gateway:
            deadline = time.monotonic() + 15
            while True:
                _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
                samples = metric_samples(text.decode())
                up = {
                    s.labels["backend"]: s.value for s in samples.get("exo_gateway_backend_up", [])
                }
                if up.get(label) == 1 and up.get(local.url) == 1:
                    break
                assert time.monotonic() < deadline, (up, gateway.log_text())
                time.sleep(0.1)
            log = gateway.log_text()
            first, second = (peer_url, ipv6_url) if edges else (ipv6_url, peer_url)
            assert f"peer {peer_id} found at {first}, {second}" in log, log
            assert f"backend {peer_url} up (node {peer_id})" in log, log
            if not edges:
                assert f"backend {ipv6_url} down: " in log, log
            local.stop()
            for _ in range(5):
                status, _, body = call("GET", f"{gateway.url}/node_id", headers=AUTH)
                assert status == 200
                assert json.loads(body) == peer_id


# --- TLS and metrics ----------------------------------------------------------------------


def test_tls_with_a_test_certificate(double, keys_file, tmp_path: Path):
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_path))
    for pem in cert.cert_chain_pems[1:]:
        pem.write_to_path(str(cert_path), append=True)
    cert.private_key_pem.write_to_path(str(key_path))
    config = gateway_config(
        port=free_port(),
        keys_file=keys_file,
        static_backends=[double.url],
        tls=(cert_path, key_path),
    )
    with run_gateway(config) as gateway:
        assert gateway.url.startswith("https://")
        client = ssl.create_default_context()
        ca.configure_trust(client)
        status, _, body = call("GET", f"{gateway.url}/node_id", headers=AUTH, ssl_context=client)
        assert status == 200 and json.loads(body) == double.node_id
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            call("GET", f"{gateway.url}/node_id", headers=AUTH)
        plain = gateway.url.replace("https://", "http://")
        with pytest.raises(aiohttp.ClientError):
            call("GET", f"{plain}/node_id", headers=AUTH)


def test_metrics_parse_as_prometheus_text(double, keys_file):
    config = gateway_config(
        port=free_port(),
        keys_file=keys_file,
        static_backends=[double.url],
        public_paths=["/health", "/metrics"],
    )
    with run_gateway(config) as gateway:
        call("GET", f"{gateway.url}/models", headers=AUTH)
        call("GET", f"{gateway.url}/models")
        status, headers, text = call("GET", f"{gateway.url}/metrics")
        assert status == 200
        assert headers["Content-Type"].startswith("text/plain")
        samples = metric_samples(text.decode())
        requests = {
            (s.labels["method"], s.labels["code"]): s.value
            for s in samples["exo_gateway_requests"]
            if s.name == "exo_gateway_requests_total"
        }
        assert requests[("GET", "200")] >= 1
        assert requests[("GET", "401")] >= 1
        assert any(s.labels.get("key") == "alice" for s in samples["exo_gateway_key_requests"])
        assert any(
            s.name.endswith("_bucket") for s in samples["exo_gateway_response_latency_seconds"]
        )
        up = {s.labels["backend"]: s.value for s in samples["exo_gateway_backend_up"]}
        assert set(up) == {double.url}
        assert samples["exo_gateway_api_keys"][0].value == 1


def test_client_going_away_releases_the_backend_request(double, keys_file):
    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[double.url])
    with run_gateway(config) as gateway:
        double.set_fault("hang", paths=["/v1/chat/completions"])

        async def give_up() -> None:
            async with aiohttp.ClientSession(
                headers=AUTH, timeout=aiohttp.ClientTimeout(total=1.0)
            ) as session:
                with pytest.raises(TimeoutError):
                    await session.post(
                        f"{gateway.url}/v1/chat/completions", json=chat(3, stream=False)
                    )

        def inflight() -> tuple[float, float]:
            _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
            samples = metric_samples(text.decode())
            busy = sum(s.value for s in samples["exo_gateway_backend_inflight"])
            closed = sum(
                s.value
                for s in samples["exo_gateway_requests"]
                if s.name.endswith("_total") and s.labels["code"] == "499"
            )
            return busy, closed

        asyncio.run(give_up())
        deadline = time.monotonic() + 10
        while inflight() != (0, 1):
            assert time.monotonic() < deadline, inflight()
            time.sleep(0.1)


def test_backend_errors_pass_through_without_retry_and_health_degrades(keys_file):
    with run_double("--instance", MODEL) as failing:
        dead = f"http://127.0.0.1:{free_port()}"
        config = gateway_config(
            port=free_port(), keys_file=keys_file, static_backends=[failing.url, dead]
        )
        with run_gateway(config) as gateway:
            failing.set_fault("error500", paths=["/v1/chat/completions"])
            status, _, body = call(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                body=chat(3, stream=False),
                headers=AUTH,
            )
            assert status == 500 and body == b"Internal Server Error"
            _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
            samples = metric_samples(text.decode())
            assert samples["exo_gateway_retries"][0].value == 0

            deadline = time.monotonic() + 10
            while True:
                status, _, body = call("GET", f"{gateway.url}/health")
                if status == 200 and json.loads(body)["status"] == "degraded":
                    break
                assert time.monotonic() < deadline, body
                time.sleep(0.1)
            assert json.loads(body)["backends"] == {"healthy": 1, "total": 2}


def test_client_leaving_a_stream_is_not_a_backend_failure(keys_file):
    with run_double("--instance", MODEL, "--stream-delay", "0.05") as slow:
        config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[slow.url])
        with run_gateway(config) as gateway:

            async def leave_early() -> None:
                async with (
                    aiohttp.ClientSession(headers=AUTH) as session,
                    session.post(
                        f"{gateway.url}/v1/chat/completions", json=chat(60, stream=True)
                    ) as response,
                ):
                    assert await response.content.readany()
                    response.close()

            asyncio.run(leave_early())
            # the backend's first health probe may still be under way: wait for it, and for
            # the abandoned request to be released
            deadline = time.monotonic() + 10
            while True:
                _, _, text = call("GET", f"{gateway.url}/metrics", headers=AUTH)
                samples = metric_samples(text.decode())
                busy = sum(s.value for s in samples["exo_gateway_backend_inflight"])
                up = {s.labels["backend"]: s.value for s in samples["exo_gateway_backend_up"]}
                if busy == 0 and up.get(slow.url) == 1:
                    break
                assert time.monotonic() < deadline, (busy, up)
                time.sleep(0.1)
            assert samples["exo_gateway_aborted_streams"][0].value == 0
            # The gateway still streams from the same backend.
            status, _, body = call(
                "POST",
                f"{gateway.url}/v1/chat/completions",
                body=chat(3, stream=True),
                headers=AUTH,
            )
            assert status == 200 and sse_events(body)[-1] == "[DONE]"


def test_check_reports_usable_and_unusable_key_files(tmp_path: Path, keys_file):
    import subprocess
    import sys

    from tests.exo_double.fixture import REPO_ROOT, double_env

    def check(config: dict[str, Any]) -> subprocess.CompletedProcess[str]:
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        return subprocess.run(
            [sys.executable, "-m", "exo_nixos", "gateway", "--check", "--config", str(path)],
            capture_output=True,
            text=True,
            env=double_env(),
            cwd=REPO_ROOT,
            check=False,
        )

    config = gateway_config(port=free_port(), keys_file=keys_file, static_backends=[])
    config["gateway"]["localBackend"] = True
    good = check(config)
    assert good.returncode == 0, good.stderr
    assert "1 API keys" in good.stdout
    keys_file.write_text("short\n")
    bad = check(config)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert "line 1: key 'line1' is shorter than 16 characters" in bad.stderr


def test_client_that_stops_reading_is_cut_after_the_idle_timeout(keys_file):
    """A client that takes no data for streamIdleTimeoutSec while the backend has more: both
    connections are closed and it is counted as a client stall."""
    released: list[bool] = []

    async def scenario() -> None:
        from aiohttp import web

        async def flood(request: web.Request) -> web.StreamResponse:
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await response.prepare(request)
            event = b"data: " + b"x" * 65536 + b"\n\n"
            try:
                for _ in range(4096):  # 256 MiB: far more than the sockets buffer
                    await response.write(event)
            except (ConnectionError, asyncio.CancelledError):
                released.append(True)
                raise
            return response

        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", flood)
        runner = web.AppRunner(app, handler_cancellation=True)
        await runner.setup()
        port = free_port()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        loop = asyncio.get_running_loop()
        try:
            config = gateway_config(
                port=free_port(), keys_file=keys_file, static_backends=[f"http://127.0.0.1:{port}"]
            )
            config["gateway"]["streamIdleTimeoutSec"] = 1
            with run_gateway(config) as gateway:
                request = (
                    f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n"
                    f"Authorization: Bearer {KEY_A}\r\nContent-Length: 0\r\n\r\n"
                ).encode()
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                sock.setblocking(False)
                await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
                await loop.sock_sendall(sock, request)
                head = await asyncio.wait_for(loop.sock_recv(sock, 64), 10)
                assert head.startswith(b"HTTP/1.1 200")
                # and then read nothing: the gateway's writes back up
                deadline = time.monotonic() + 20
                while "took no data for 1s" not in gateway.log_text():
                    assert time.monotonic() < deadline, gateway.log_text()
                    await asyncio.sleep(0.1)
                while not released:
                    assert time.monotonic() < deadline, "the backend connection stays open"
                    await asyncio.sleep(0.05)
                with contextlib.suppress(ConnectionError):
                    # the rest of what was buffered, then the end: the gateway closed it
                    while await asyncio.wait_for(loop.sock_recv(sock, 1 << 20), 10):
                        pass
                sock.close()
                _, _, text = await fetch("GET", f"{gateway.url}/metrics", headers=AUTH)
                stalled = metric_samples(text.decode())["exo_gateway_stalled_streams"]
                assert {
                    s.labels["side"]: s.value for s in stalled if s.name.endswith("_total")
                } == {"client": 1}
                await loop.run_in_executor(None, gateway.stop)
        finally:
            await runner.cleanup()

    asyncio.run(scenario())
