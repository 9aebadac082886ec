"""Several gateway worker processes on one port (SO_REUSEPORT), against EXO test doubles.

Connections spread over the workers; per-key usage and limits add up across them; a backend
one worker found dead is not used by another; SIGHUP reaches every worker; a worker that
dies is started again.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from exo_nixos.gateway.workers import MAX_DEFAULT_WORKERS, default_workers
from exo_nixos.supervisor.notify import Notifier
from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import (
    KEY_A,
    KEY_B,
    GatewayProcess,
    gateway_config,
    run_gateway,
    write_keys,
)
from tests.test_gateway import MODEL, metric_samples
from tests.test_gateway_policy import answer_usage, say

AUTH = {"Authorization": f"Bearer {KEY_A}"}


def workers_of(gateway: GatewayProcess) -> list[int]:
    pid = gateway.process.pid
    text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    return [int(p) for p in text.split()]


def wait_for(condition: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def accepted_by(pid: int, port: int) -> int:
    """Established TCP connections to ``port`` held by process ``pid``."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    count = 0
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            count += 1
    return count


async def fresh(method: str, url: str, **kwargs: Any) -> tuple[int, bytes]:
    """One request on a new connection (so the kernel picks a worker for it)."""
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, **kwargs) as response,
    ):
        return response.status, await response.read()


async def metrics(url: str) -> dict[str, list[Any]]:
    status, body = await fresh("GET", url + "/metrics", headers=AUTH)
    assert status == 200
    return metric_samples(body.decode())


def test_default_workers_follow_the_cores():
    assert default_workers() == min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0)))


@pytest.fixture
def keys(tmp_path: Path) -> Path:
    return write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")


def test_connections_spread_and_usage_adds_up_across_workers(keys: Path):
    with run_double("--instance", MODEL) as double:
        config = gateway_config(
            port=free_port(),
            keys_file=keys,
            static_backends=[double.url],
            workers=2,
            key_policies={"alice": {"requestsPerMinute": 40}},
        )
        with run_gateway(config) as gateway:
            workers = workers_of(gateway)
            assert len(workers) == 2
            wait_for(lambda: "2 worker processes listening" in gateway.log_text(), "listening")
            # the kernel spreads new connections over the workers' sockets
            sockets = [socket.create_connection(("127.0.0.1", gateway.port)) for _ in range(32)]
            try:
                wait_for(
                    lambda: sum(accepted_by(p, gateway.port) for p in workers) == 32, "accepted"
                )
                assert all(accepted_by(p, gateway.port) > 0 for p in workers)
            finally:
                for sock in sockets:
                    sock.close()

            async def scenario() -> None:
                used = [0, 0]
                began = time.monotonic()
                served = 0
                for n in range(80):  # each on a new connection: both workers serve some
                    body = say(1 + n % 5, stream=n % 2 == 0)
                    status, raw = await fresh(
                        "POST", gateway.url + "/v1/chat/completions", json=body, headers=AUTH
                    )
                    if status == 429:
                        break
                    assert status == 200, raw
                    served += 1
                    prompt, completed = answer_usage(raw, body["stream"])
                    used[0] += prompt
                    used[1] += completed
                # the key's 40 a minute hold across the workers (each alone would let 40
                # through): 40, plus one per 1.5 s of refill while the requests ran
                refilled = (time.monotonic() - began) / 1.5
                assert 40 <= served <= 40 + refilled + 1, (served, refilled)
                samples = await metrics(gateway.url)

                def value(name: str) -> float:
                    return sum(
                        float(s.value)
                        for s in samples[name]
                        if s.name.endswith("_total") and s.labels.get("model") == MODEL
                    )

                assert value("exo_gateway_key_requests") == served
                assert value("exo_gateway_key_prompt_tokens") == used[0]
                assert value("exo_gateway_key_completion_tokens") == used[1]

            asyncio.run(scenario())


def test_a_backend_one_worker_found_dead_is_not_used_by_another(keys: Path):
    with run_double("--instance", MODEL) as first, run_double("--instance", MODEL) as second:
        config = gateway_config(
            port=free_port(),
            keys_file=keys,
            static_backends=[first.url, second.url],
            workers=2,
            interval=60.0,  # probes at start only: what a worker learns it learns from requests
            public_paths=["/health", "/metrics"],
        )
        with run_gateway(config) as gateway:
            wait_for(lambda: gateway.log_text().count("up (node") == 4, "both up in both workers")
            first.process.kill()
            first.process.wait()

            async def scenario() -> None:
                for _ in range(30):
                    status, raw = await fresh("GET", gateway.url + "/v1/models", headers=AUTH)
                    assert status == 200, raw
                samples = await metrics(gateway.url)
                errors = [
                    s.value
                    for s in samples["exo_gateway_backend_requests"]
                    if s.labels == {"backend": first.url, "outcome": "error"}
                ]
                # one worker found it dead; the other never tried it (its probe is an hour off)
                assert errors == [1.0]
                for _ in range(6):  # every worker's /health says so
                    status, raw = await fresh("GET", gateway.url + "/health")
                    nodes = {n["url"]: n["up"] for n in json.loads(raw)["nodes"]}
                    assert nodes == {first.url: False, second.url: True}

            asyncio.run(scenario())


def test_sighup_reaches_every_worker_and_a_dead_worker_is_replaced(tmp_path: Path):
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    with run_double("--instance", MODEL) as double:
        config = gateway_config(
            port=free_port(), keys_file=keys, static_backends=[double.url], workers=2
        )
        with run_gateway(config) as gateway:
            wait_for(lambda: "2 worker processes listening" in gateway.log_text(), "listening")
            write_keys(keys, f"bob:{KEY_B}\n")
            gateway.signal(signal.SIGHUP)
            wait_for(lambda: gateway.log_text().count("API keys reloaded") == 2, "both reloaded")

            async def keys_everywhere() -> None:
                for _ in range(16):
                    old = await fresh("GET", gateway.url + "/v1/models", headers=AUTH)
                    new = await fresh(
                        "GET",
                        gateway.url + "/v1/models",
                        headers={"Authorization": f"Bearer {KEY_B}"},
                    )
                    assert (old[0], new[0]) == (401, 200)

            asyncio.run(keys_everywhere())
            victim = workers_of(gateway)[0]
            os.kill(victim, signal.SIGKILL)
            wait_for(lambda: "starting it again" in gateway.log_text(), "restarted")
            wait_for(
                lambda: len(workers_of(gateway)) == 2 and victim not in workers_of(gateway),
                "two workers again",
            )
            asyncio.run(keys_everywhere())
            assert gateway.stop() == 0
            assert not any(Path(f"/proc/{p}").exists() for p in workers_of_safe(gateway))


def workers_of_safe(gateway: GatewayProcess) -> list[int]:
    try:
        return workers_of(gateway)
    except OSError:
        return []


def test_what_a_dead_worker_held_is_let_go(tmp_path: Path):
    """A worker killed while it serves a request: its share of the key's concurrency and of
    the backend's requests in flight goes with it (the master clears its column of the
    shared tables and its live gauges), so the key is not refused for ever."""
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    with run_double("--instance", MODEL) as double:
        config = gateway_config(
            port=free_port(),
            keys_file=keys,
            static_backends=[double.url],
            workers=2,
            key_policies={"alice": {"concurrency": 1}},
            public_paths=["/health", "/metrics"],
        )
        with run_gateway(config) as gateway:
            wait_for(lambda: "2 worker processes listening" in gateway.log_text(), "listening")
            double.set_fault("hang", paths=["/v1/chat/completions"])
            held = socket.create_connection(("127.0.0.1", gateway.port))
            request = json.dumps(say(3, stream=False)).encode()
            held.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
                + f"Authorization: Bearer {KEY_A}\r\nContent-Type: application/json\r\n".encode()
                + f"Content-Length: {len(request)}\r\n\r\n".encode()
                + request
            )

            def inflight() -> float:
                samples = asyncio.run(metrics(gateway.url))
                return sum(
                    float(s.value)
                    for s in samples["exo_gateway_backend_inflight"]
                    if s.labels.get("backend") == double.url
                )

            try:
                wait_for(lambda: inflight() == 1, "the request in flight")
                # the key's one request at a time holds across the workers
                for _ in range(4):
                    status, _ = asyncio.run(fresh("GET", gateway.url + "/v1/models", headers=AUTH))
                    assert status == 429
                (holder,) = [p for p in workers_of(gateway) if accepted_by(p, gateway.port)]
                os.kill(holder, signal.SIGKILL)
                wait_for(lambda: "starting it again" in gateway.log_text(), "restarted")
                wait_for(lambda: len(workers_of(gateway)) == 2, "two workers again")
            finally:
                held.close()
            assert inflight() == 0
            for _ in range(4):  # every worker's /health says so too
                status, raw = asyncio.run(fresh("GET", gateway.url + "/health"))
                assert [n["inflight"] for n in json.loads(raw)["nodes"]] == [0], raw
            double.set_fault("ok")
            for _ in range(4):  # whichever worker takes it
                status, raw = asyncio.run(fresh("GET", gateway.url + "/v1/models", headers=AUTH))
                assert status == 200, raw


def test_systemd_hears_ready_only_once_every_worker_listens_or_has_reloaded(
    monkeypatch: pytest.MonkeyPatch,
):
    """The master's side of the workers' reports (a byte of kind and one of index through a
    pipe): READY=1 when the last worker listens, and after a reload when the last one has
    read its files, whatever the order they report in."""
    from exo_nixos.config import parse_config
    from exo_nixos.gateway.workers import Master

    class Recorder(Notifier):
        def __init__(self) -> None:
            super().__init__(None)
            self.sent: list[str] = []

        def send(self, *fields: str) -> bool:
            self.sent.append("\n".join(fields))
            return True

    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "")  # the master sets it; restored after
    config = parse_config({"schemaVersion": 1})
    master = Master(config, 3, None)
    notifier = master.notifier = Recorder()
    try:
        master.pids = {101: 0, 102: 1, 103: 2}
        for report, ready in [(b"R\x02", []), (b"R\x00R\x02", []), (b"R\x01", ["READY=1"])]:
            os.write(master._report_end, report)
            master._read_reports()
            assert notifier.sent == ready
        notifier.sent.clear()
        master._read_reports()  # nothing more to read: nothing said
        master.reloading = True
        for report, ready in [(b"H\x01", []), (b"H\x00", []), (b"H\x02", ["READY=1"])]:
            os.write(master._report_end, report)
            master._read_reports()
            assert notifier.sent == ready
        assert not master.reloading
    finally:
        os.close(master._reports)
        os.close(master._report_end)
        shutil.rmtree(master.metrics_dir)
