"""The double's placement, instance, download and custom-model routes (upstream's shapes)."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp

from exo_nixos.exoapi import run_coroutine
from tests.exo_double.fixture import http_json, run_double

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    return run_coroutine(http_json(method, url, body))


def _downloads(url: str) -> list[dict[str, Any]]:
    _, state = call("GET", f"{url}/state")
    return [entry for entries in state["downloads"].values() for entry in entries]


def _sse(url: str) -> list[str]:
    async def read() -> list[str]:
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            assert response.headers["Content-Type"].startswith("text/event-stream")
            return (await response.text()).split("\n\n")

    return run_coroutine(read())


def test_place_instance_answers_at_once_and_places_later() -> None:
    with run_double("--download-seconds", "1", "--place-delay", "0.3") as node:
        status, body = call("POST", f"{node.url}/place_instance", {"model_id": LLAMA})
        assert status == 200
        assert body["message"] == "Command received."
        assert body["model_card"]["modelId"] == LLAMA  # camelCase inside, like upstream
        _, instances = call("GET", f"{node.url}/state/instances")
        assert instances == {}  # the master has not handled the command yet
        time.sleep(0.5)
        _, instances = call("GET", f"{node.url}/state/instances")
        [(instance_id, tagged)] = instances.items()
        assert tagged["MlxRingInstance"]["shardAssignments"]["modelId"] == LLAMA
        status, one = call("GET", f"{node.url}/instance/{instance_id}")
        assert status == 200 and one == tagged


def test_download_progress_advances_and_runners_become_ready() -> None:
    with run_double("--download-seconds", "1.5", "--place-delay", "0") as node:
        call("POST", f"{node.url}/place_instance", {"model_id": LLAMA})
        time.sleep(0.3)
        [first] = _downloads(node.url)
        ongoing = first["DownloadOngoing"]["downloadProgress"]
        assert 0 < ongoing["downloaded"]["inBytes"] < ongoing["total"]["inBytes"]
        _, runners = call("GET", f"{node.url}/state/runners")
        assert all("RunnerIdle" in r for r in runners.values())
        time.sleep(0.5)
        later = _downloads(node.url)[0]["DownloadOngoing"]["downloadProgress"]
        assert later["downloaded"]["inBytes"] > ongoing["downloaded"]["inBytes"]
        time.sleep(1.2)
        assert "DownloadCompleted" in _downloads(node.url)[0]
        _, runners = call("GET", f"{node.url}/state/runners")
        assert all("RunnerReady" in r for r in runners.values())
        _, downloaded = call("GET", f"{node.url}/models?status=downloaded")
        assert [m["id"] for m in downloaded["data"]] == [LLAMA]


def test_await_instance_sends_snake_case_instance_or_timeout() -> None:
    with run_double("--place-delay", "0") as node:
        events = _sse(f"{node.url}/instance/await?model_id={LLAMA}&timeout_seconds=0.3")
        assert events[0] == ": keep-alive"
        timeout = json.loads(events[1].removeprefix("data: "))
        assert timeout == {"type": "timeout", "message": f"No instance found for model {LLAMA}"}
        call("POST", f"{node.url}/place_instance", {"model_id": LLAMA})
        events = _sse(f"{node.url}/instance/await?model_id={LLAMA}&timeout_seconds=5")
        ready = json.loads(events[1].removeprefix("data: "))
        assert ready["type"] == "ready"
        # model_dump_json() without by_alias: snake_case fields, class-name tags kept
        assert ready["instance"]["MlxRingInstance"]["shard_assignments"]["model_id"] == LLAMA
        status, _ = call("GET", f"{node.url}/instance/await?model_id={LLAMA}&timeout_seconds=301")
        assert status == 422


def test_delete_instance_and_unknown_ids() -> None:
    with run_double("--instance", LLAMA) as node:
        _, instances = call("GET", f"{node.url}/state/instances")
        [instance_id] = instances
        status, body = call("DELETE", f"{node.url}/instance/{instance_id}")
        assert status == 200
        assert body["instance_id"] == instance_id and body["message"] == "Command received."
        status, body = call("DELETE", f"{node.url}/instance/{instance_id}")
        assert status == 404
        assert body["error"]["message"] == "Instance not found"


def test_placement_preview_and_the_reasons_it_refuses() -> None:
    with run_double("--too-big", "mlx-community/Qwen3-0.6B-4bit") as node:
        status, preview = call("GET", f"{node.url}/instance/placement?model_id={LLAMA}")
        assert status == 200 and "MlxRingInstance" in preview
        status, body = call(
            "GET", f"{node.url}/instance/placement?model_id=mlx-community/Qwen3-0.6B-4bit"
        )
        assert status == 400
        assert body["error"] == {
            "message": "No cycles found with sufficient memory",
            "type": "Bad Request",
            "param": None,
            "code": 400,
        }
        status, text = call("POST", f"{node.url}/place_instance", {"model_id": "nobody/nothing"})
        assert (status, text) == (500, "Internal Server Error")


def test_download_start_and_failed_downloads() -> None:
    with run_double("--fail-download", LLAMA, "--download-seconds", "5") as node:
        _, preview = call("GET", f"{node.url}/instance/placement?model_id={LLAMA}")
        shard = next(iter(preview["MlxRingInstance"]["shardAssignments"]["runnerToShard"].values()))
        body = {"targetNodeId": node.node_id, "shardMetadata": shard}
        status, answer = call("POST", f"{node.url}/download/start", body)
        assert status == 200 and set(answer) == {"commandId"}
        [entry] = _downloads(node.url)
        assert "failed" in entry["DownloadFailed"]["errorMessage"]
        status, _ = call("POST", f"{node.url}/download/start", {"targetNodeId": node.node_id})
        assert status == 422


def test_never_ready_instances_stay_loading() -> None:
    args = ("--never-ready", LLAMA, "--download-seconds", "0.2", "--place-delay", "0")
    with run_double(*args) as node:
        call("POST", f"{node.url}/place_instance", {"model_id": LLAMA})
        time.sleep(0.8)
        _, runners = call("GET", f"{node.url}/state/runners")
        assert runners and all("RunnerLoading" in r for r in runners.values())


def test_custom_models_come_from_the_hub_or_fail_with_400() -> None:
    with run_double("--hub-model", "acme/Custom-1B") as node:
        status, entry = call("POST", f"{node.url}/models/add", {"model_id": "acme/Custom-1B"})
        assert status == 200 and entry["id"] == "acme/Custom-1B" and entry["is_custom"]
        _, models = call("GET", f"{node.url}/models")
        assert "acme/Custom-1B" in [m["id"] for m in models["data"]]
        _, cards = call("GET", f"{node.url}/state/customModelCards")
        assert list(cards) == ["acme/Custom-1B"]
        status, body = call("POST", f"{node.url}/models/add", {"model_id": "acme/Missing"})
        assert status == 400
        assert body["error"]["message"].startswith("Failed to fetch model: ")


def test_teardown_drops_every_instance() -> None:
    with run_double("--instance", LLAMA) as node:
        status, body = call("POST", f"{node.url}/__double__/teardown")
        assert status == 200 and len(body["removed"]) == 1
        _, instances = call("GET", f"{node.url}/state/instances")
        assert instances == {}
