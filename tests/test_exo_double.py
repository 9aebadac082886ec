"""The EXO test double behaves like upstream exo where this project depends on it."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from typing import Any

import aiohttp
import pytest

from exo_nixos.exoapi import run_coroutine
from tests.exo_double.fixture import (
    double_env,
    free_port,
    http_json,
    make_fake_exo_package,
    run_double,
)

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"

# Every top-level key of upstream's State model (src/exo/shared/types/state.py), camelCase.
STATE_KEYS = {
    "instances",
    "runners",
    "downloads",
    "tasks",
    "lastSeen",
    "topology",
    "lastEventAppliedIdx",
    "nodeIdentities",
    "nodeMemory",
    "nodeDisk",
    "nodeSystem",
    "nodeNetwork",
    "nodeThunderbolt",
    "nodeThunderboltBridge",
    "nodeRdmaCtl",
    "nodeBackends",
    "thunderboltBridgeCycles",
    "instanceLinks",
    "prefillServerPorts",
    "customModelCards",
}


def get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    return run_coroutine(http_json("GET", url, within=timeout))


def post(url: str, body: Any, timeout: float = 5.0) -> tuple[int, Any]:
    return run_coroutine(http_json("POST", url, body, within=timeout))


async def _raw_post(url: str, body: Any) -> tuple[int, dict[str, str], str]:
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(url, json=body) as response,
    ):
        return response.status, dict(response.headers), await response.text()


def wait_exit(process: subprocess.Popen[bytes], timeout: float = 10.0) -> int:
    return process.wait(timeout)


def test_node_id_is_a_bare_json_string():
    with run_double(node_id="5f1c0ffee") as double:
        assert get(f"{double.url}/node_id") == (200, "5f1c0ffee")


def test_state_has_upstream_shape_with_peers_and_instances():
    peer = "a7e2b1"
    args = ("--peer", f"{peer}=10.0.0.2", "--peer", f"{peer}=fd00::2", "--instance", MODEL)
    with run_double(*args) as double:
        status, state = get(f"{double.url}/state")
    assert status == 200
    assert set(state) == STATE_KEYS
    assert state["topology"]["nodes"] == [double.node_id, peer]
    # As upstream's worker: edges carry this node's own API port, and only to addresses
    # whose probe answers: upstream's API listens on IPv4 only, so no IPv6 edge.
    (edge,) = state["topology"]["connections"][double.node_id][peer]
    assert edge["sinkMultiaddr"] == {
        "address": f"/ip4/10.0.0.2/tcp/{double.port}",
        "address_type": "ip4",
        "ip_address": "10.0.0.2",
        "port": double.port,
    }
    # every address of the peer is in its interfaces, IPv6 too
    interfaces = state["nodeNetwork"][peer]["interfaces"]
    assert [i["ipAddress"] for i in interfaces] == ["10.0.0.2", "fd00::2"]
    assert state["lastEventAppliedIdx"] >= 0
    ((instance_id, tagged),) = state["instances"].items()
    ring = tagged["MlxRingInstance"]
    assert ring["instanceId"] == instance_id
    assignments = ring["shardAssignments"]
    assert assignments["modelId"] == MODEL
    assert set(assignments["nodeToRunner"]) == {double.node_id, peer}
    assert set(assignments["runnerToShard"]) == set(assignments["nodeToRunner"].values())
    assert set(state["nodeMemory"][peer]["ramTotal"]) == {"inBytes"}


def test_no_edges_until_a_probe_passes():
    with run_double("--peer", "b0b=10.0.0.2", "--no-edges") as double:
        status, state = get(f"{double.url}/state")
    assert status == 200
    assert state["topology"] == {"nodes": [double.node_id, "b0b"], "connections": {}}
    assert state["nodeNetwork"]["b0b"]["interfaces"][0]["ipAddress"] == "10.0.0.2"


def _connects(host: str, port: int) -> bool:
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(1.0)
            return sock.connect_ex((host, port)) == 0
    except OSError:
        return False


def test_binds_every_ipv4_address_and_no_ipv6_like_upstream():
    # upstream's API.run_api: hypercorn bind ["0.0.0.0:PORT"]
    with run_double() as double:
        assert _connects("127.0.0.1", double.port)
        assert _connects("127.0.0.2", double.port)  # any IPv4 address of the host
        assert not _connects("::1", double.port)
    result = subprocess.run(
        [*_python_m(), "--bind", "::"],
        env=double_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"never listens on IPv6" in result.stderr


def test_created_is_the_time_of_the_answer():
    with run_double("--instance", MODEL) as double:
        time.sleep(1.2)  # the node started over a second ago
        before = int(time.time())
        _, models = get(f"{double.url}/models")
        _, completion = post(
            f"{double.url}/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
        after = int(time.time())
    assert all(before <= m["created"] <= after for m in models["data"])
    assert before <= completion["created"] <= after


def test_state_path_and_missing_path():
    with run_double() as double:
        assert get(f"{double.url}/state/topology/nodes") == (200, [double.node_id])
        status, body = get(f"{double.url}/state/nope")
    assert status == 404
    assert body["error"]["message"] == "unable to find path 'nope' in state json"


def test_no_master_yet_gives_empty_state():
    with run_double("--no-master") as double:
        status, state = get(f"{double.url}/state")
        log = double.log_text()
    assert status == 200
    assert state["lastEventAppliedIdx"] == -1
    assert state["topology"] == {"nodes": [], "connections": {}}
    assert "elected" not in log


@pytest.mark.parametrize("route", ["/models", "/v1/models"])
def test_models_lists_cards(route):
    with run_double("--instance", "org/custom-model") as double:
        status, body = get(double.url + route)
    assert status == 200
    assert body["object"] == "list"
    ids = [m["id"] for m in body["data"]]
    assert MODEL in ids
    assert "org/custom-model" in ids
    assert all(m["object"] == "model" and m["owned_by"] == "exo" for m in body["data"])


def test_chat_completion_json_and_stream_agree():
    request = {"model": MODEL, "messages": [{"role": "user", "content": "ping pong"}]}
    with run_double("--instance", MODEL) as double:
        url = f"{double.url}/v1/chat/completions"
        status, headers, text = run_coroutine(_raw_post(url, request))
        s_status, s_headers, stream = run_coroutine(_raw_post(url, {**request, "stream": True}))
    assert status == 200
    assert headers["Content-Type"].startswith("application/json")
    # upstream streams even the non-streamed answer: chunked, no Content-Length
    assert headers.get("Transfer-Encoding") == "chunked"
    assert "Content-Length" not in headers
    body = json.loads(text)
    assert body["object"] == "chat.completion"
    assert body["model"] == MODEL
    (choice,) = body["choices"]
    assert choice["message"]["role"] == "assistant"
    assert choice["message"]["content"].endswith("heard: ping pong")
    assert choice["finish_reason"] == "stop"
    assert body["usage"]["total_tokens"] == (
        body["usage"]["prompt_tokens"] + body["usage"]["completion_tokens"]
    )

    assert s_status == 200
    assert s_headers["Content-Type"].startswith("text/event-stream")
    events = [e for e in stream.split("\n\n") if e]
    assert events[0] == ": keep-alive"
    assert events[-1] == "data: [DONE]"
    chunks = [json.loads(e.removeprefix("data: ")) for e in events[1:-1]]
    assert all(e.startswith("data: ") for e in events[1:])
    content = "".join(c["choices"][0]["delta"]["content"] for c in chunks)
    assert content == choice["message"]["content"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
    assert "usage" in chunks[-1]
    assert all("finish_reason" not in c["choices"][0] for c in chunks[:-1])


def test_chat_completion_limits_tokens():
    request = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": "x"}]}
    with run_double("--instance", MODEL) as double:
        status, body = post(f"{double.url}/v1/chat/completions", request)
    assert status == 200
    assert body["choices"][0]["finish_reason"] == "length"
    assert body["usage"]["completion_tokens"] == 2


def test_chat_completion_errors_like_upstream():
    with run_double() as double:
        url = f"{double.url}/v1/chat/completions"
        no_instance = post(url, {"model": MODEL, "messages": []})
        invalid = post(url, {"messages": []})
    assert no_instance[0] == 404
    assert no_instance[1]["error"] == {
        "message": f"No instance found for model {MODEL}",
        "type": "Not Found",
        "param": None,
        "code": 404,
    }
    assert invalid[0] == 422
    assert invalid[1]["detail"][0]["loc"] == ["body", "model"]


def test_small_routes():
    with run_double() as double:
        assert get(f"{double.url}/ollama/api/version") == (200, {"version": "1.0.0"})
        status, page = get(f"{double.url}/")
        assert status == 200
        assert "<title>EXO</title>" in page
        status, events = get(f"{double.url}/events")
        assert status == 200
        assert [next(iter(e)) for e in events] == ["NodeGatheredInfo"]


def test_fault_error500_then_ok_and_limited_to_paths():
    with run_double() as double:
        double.set_fault("error500")
        assert get(f"{double.url}/node_id")[0] == 500
        double.set_fault("ok")
        assert get(f"{double.url}/node_id")[0] == 200
        double.set_fault("error500", paths=["/models"])
        assert get(f"{double.url}/models")[0] == 500
        assert get(f"{double.url}/node_id")[0] == 200
        assert get(f"{double.url}/__double__/fault")[1]["paths"] == ["/models"]


def test_fault_hang_accepts_but_never_answers():
    with run_double() as double:
        double.set_fault("hang")
        with pytest.raises(TimeoutError):
            get(f"{double.url}/node_id", timeout=0.5)
        double.set_fault("ok")
        assert get(f"{double.url}/node_id")[0] == 200


def test_fault_crash_exits_with_code():
    with run_double() as double:
        double.set_fault("crash", exit_code=7)
        assert wait_exit(double.process) == 7
        assert "EXO terminated" in double.log_text()


async def _completion(url: str, *, stream: bool) -> tuple[int, dict[str, str], bytes, str]:
    """Status, headers, the bytes that arrived, and how the body ended."""
    request = {"model": MODEL, "messages": [{"role": "user", "content": "x"}], "stream": stream}
    got = b""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
        session.post(f"{url}/v1/chat/completions", json=request) as response,
    ):
        try:
            async for chunk in response.content.iter_any():
                got += chunk
        except aiohttp.ClientPayloadError:
            return response.status, dict(response.headers), got, "cut off"
        return response.status, dict(response.headers), got, "complete"


def test_fault_cutoff_is_a_200_whose_body_never_ends():
    with run_double("--instance", MODEL) as double:
        double.set_fault("cutoff")
        assert get(f"{double.url}/models")[0] == 200  # only completions fail
        status, headers, body, end = run_coroutine(_completion(double.url, stream=False))
        assert (status, end, body) == (200, "cut off", b"")
        assert headers["Content-Type"].startswith("application/json")
        status, _, body, end = run_coroutine(_completion(double.url, stream=True))
        assert (status, end, body) == (200, "cut off", b": keep-alive\n\n")


def test_fault_sse_error_sends_upstreams_error_event():
    with run_double("--instance", MODEL) as double:
        double.set_fault("sse_error", paths=["/v1/chat/completions"])
        status, headers, body, end = run_coroutine(_completion(double.url, stream=True))
        assert (status, end) == (200, "complete")
        assert headers["Content-Type"].startswith("text/event-stream")
        events = [e for e in body.decode().split("\n\n") if e]
        assert events[0] == ": keep-alive"
        assert events[-1] == "data: [DONE]"
        error = json.loads(events[1].removeprefix("data: "))["error"]
        assert set(error) == {"message", "type", "code"}
        assert (error["type"], error["code"]) == ("InternalServerError", 500)
        # not streamed, the same runner error is upstream's cut-off 200
        status, _, body, end = run_coroutine(_completion(double.url, stream=False))
        assert (status, end, body) == (200, "cut off", b"")


def test_unknown_fault_refused():
    with run_double() as double:
        status, body = post(f"{double.url}/__double__/fault", {"mode": "explode"})
    assert status == 400
    assert "mode must be one of" in body["error"]


def test_crash_after_uses_exit_code():
    with run_double("--crash-after", "0.3", "--exit-code", "3", wait=False) as double:
        assert wait_exit(double.process) == 3
        assert "EXO terminated" in double.log_text()


def test_hang_after_stops_answering():
    # not wait=True: on a loaded machine the double may start hanging before a first answer
    with run_double("--hang-after", "0.5", wait=False) as double:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                get(f"{double.url}/node_id", timeout=0.3)
            except TimeoutError:
                break  # accepted, never answered: hanging
            except aiohttp.ClientConnectionError:
                pass  # not bound yet
            time.sleep(0.05)
        else:
            pytest.fail("the double kept answering after --hang-after")
        assert double.process.poll() is None


def test_slow_start_binds_late():
    with run_double("--slow-start", "1.5", wait=False) as double:
        with pytest.raises(aiohttp.ClientConnectionError):
            get(f"{double.url}/node_id", timeout=0.5)
        double.wait_until_answering()


def test_sigterm_exits_zero_even_while_hanging():
    with run_double() as double:
        double.set_fault("hang")
        with pytest.raises(TimeoutError):
            get(f"{double.url}/state", timeout=0.3)
        double.process.send_signal(signal.SIGTERM)
        assert wait_exit(double.process, timeout=5) == 0
        assert "EXO Shutdown complete" in double.log_text()


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["--force-master"], "Node elected Master - maintaining self"),
        (["--peer", "b0b=10.0.0.9"], "Node b0b elected master - demoting self"),
        (
            ["--peer", "b0b=10.0.0.9", "--master-id", "c4t"],
            "Node c4t elected master - demoting self",
        ),
        ([], "Node elected Master - maintaining self"),
    ],
)
def test_election_log_lines(args, line):
    with run_double(*args) as double:
        log = double.log_text()
    assert line in log
    assert "\x1b[1mINFO" in log  # upstream's loguru sink forces colour on


def test_every_exo_flag_is_accepted(tmp_path):
    dump = tmp_path / "env.json"
    flags = [
        "-v",
        "--force-master",
        "--no-worker",
        "--namespace",
        "ns1",
        "--zenoh-port",
        "1",
        "--discovery-port",
        "2",
        "--offline",
        "--no-downloads",
        "--no-batch",
        "--no-fast-synch",
        "--stream-delay",
        "0.01",
        "--env-dump",
        str(dump),
    ]
    with run_double(*flags, env={"EXO_HOME_MARKER": "yes"}) as double:
        assert get(f"{double.url}/node_id")[0] == 200
        log = double.log_text()
    doc = json.loads(dump.read_text())
    assert doc["argv"][1 : 1 + len(flags)] == flags
    assert doc["env"]["EXO_HOME_MARKER"] == "yes"
    assert "FAST_SYNCH forced OFF" in log
    assert "API request: GET /node_id" in log  # -v selects the DEBUG sink


def test_bootstrap_peers_rejected_like_upstream():
    result = subprocess.run(
        [*_python_m(), "--bootstrap-peers", "/ip4/1.2.3.4/tcp/1", "--api-port", "1"],
        env=double_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 1
    assert b"temporarily removed" in result.stderr


def test_one_node_per_cache_dir(tmp_path):
    env = {"XDG_CACHE_HOME": str(tmp_path)}
    with run_double(env=env):
        result = subprocess.run(
            [*_python_m(), "--api-port", str(free_port())],
            env=double_env(env),
            capture_output=True,
            timeout=30,
            check=False,
        )
    assert result.returncode == 1
    assert b"already running" in result.stderr


def test_fake_exo_package_runs_the_double(tmp_path):
    package = make_fake_exo_package(tmp_path / "pkg", "--node-id", "fa4e")
    exe = package / "bin" / "exo"
    assert os.access(exe, os.X_OK)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    process = subprocess.Popen(
        [str(exe), "--api-port", str(port), "--force-master"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    try:
        deadline = time.monotonic() + 20
        answer: tuple[int, Any] | None = None
        while time.monotonic() < deadline and answer is None:
            try:
                answer = get(f"http://127.0.0.1:{port}/node_id", timeout=1)
            except aiohttp.ClientConnectionError:
                time.sleep(0.1)
        assert answer == (200, "fa4e")
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(10) == 0


def _python_m() -> list[str]:
    return [sys.executable, "-m", "tests.exo_double"]


def test_peer_flag_validated():
    result = subprocess.run(
        [*_python_m(), "--peer", "nohost"],
        env=double_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"expected ID=ADDRESS" in result.stderr


def test_download_flag_validated():
    result = subprocess.run(
        [*_python_m(), "--download", "some/model=150"],
        env=double_env(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert b"expected MODEL=PERCENT" in result.stderr


def test_state_serves_runner_states_downloads_backends_and_memory():
    args = ["--instance", MODEL, "--runner-status", "RunnerLoading", "--backend", "MlxCuda"]
    args += ["--download", "mlx-community/Qwen3-0.6B-4bit=50", "--download", "other/m=0"]
    with run_double(*args, "--ram-total-gib", "8", env={"OVERRIDE_MEMORY_MB": "512"}) as double:
        status, state = get(f"{double.url}/state")
    assert status == 200
    (runner,) = state["runners"].values()
    assert runner == {"RunnerLoading": {"layersLoaded": 8, "totalLayers": 16}}
    assert state["nodeBackends"][double.node_id] == ["MlxCuda"]
    memory = state["nodeMemory"][double.node_id]
    assert memory["ramTotal"] == {"inBytes": 8 << 30}
    assert memory["ramAvailable"] == {"inBytes": 512 << 20}
    kinds = [next(iter(d)) for d in state["downloads"][double.node_id]]
    assert kinds == ["DownloadCompleted", "DownloadOngoing", "DownloadPending"]
    ongoing = state["downloads"][double.node_id][1]["DownloadOngoing"]
    assert set(ongoing) == {"nodeId", "shardMetadata", "modelDirectory", "downloadProgress"}
    assert set(ongoing["downloadProgress"]) == {
        "total",
        "downloaded",
        "downloadedThisSession",
        "completedFiles",
        "totalFiles",
        "speed",
        "etaMs",
        "files",
    }
    assert "PipelineShardMetadata" in ongoing["shardMetadata"]


async def _cors(url: str) -> tuple[dict[str, str], dict[str, str]]:
    origin = {"Origin": "https://evil.example"}
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{url}/node_id", headers=origin) as simple:
            simple_headers = dict(simple.headers)
        preflight_headers = {
            **origin,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization",
        }
        async with session.options(
            f"{url}/v1/chat/completions", headers=preflight_headers
        ) as preflight:
            assert preflight.status == 200
            return simple_headers, dict(preflight.headers)


def test_cors_is_wide_open_like_upstream():
    with run_double() as double:
        simple, preflight = run_coroutine(_cors(double.url))
    assert simple["Access-Control-Allow-Origin"] == "https://evil.example"
    assert simple["Access-Control-Allow-Credentials"] == "true"
    assert preflight["Access-Control-Allow-Origin"] == "https://evil.example"
    assert preflight["Access-Control-Allow-Headers"] == "authorization"
    assert "POST" in preflight["Access-Control-Allow-Methods"]


def test_no_api_serves_nothing_but_runs_until_sigterm():
    with run_double("--no-api", wait=False) as double:
        deadline = time.monotonic() + 10
        while "Starting node" not in double.log_text() and time.monotonic() < deadline:
            time.sleep(0.05)
        with pytest.raises(aiohttp.ClientConnectionError):
            get(f"{double.url}/node_id", timeout=0.5)
        assert double.process.poll() is None
        assert double.stop() == 0
