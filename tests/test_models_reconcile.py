"""``exo-nixos models reconcile`` against the EXO double, both as real processes."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.exoapi import run_coroutine, write_master_hint
from tests.exo_double.fixture import DoubleProcess, http_json, run_double
from tests.models_cache import make_model, truncate

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"
QWEN = "mlx-community/Qwen3-0.6B-4bit"
FAST = ("--download-seconds", "0.6", "--place-delay", "0.3")


def call(method: str, url: str, body: Any = None) -> tuple[int, Any]:
    return run_coroutine(http_json(method, url, body))


def _of_model(doc: dict[str, Any], model: str) -> list[str]:
    return [
        i
        for i, tagged in doc.items()
        if tagged["MlxRingInstance"]["shardAssignments"]["modelId"] == model
    ]


def instances(node: DoubleProcess, model: str = LLAMA) -> list[str]:
    _, doc = call("GET", f"{node.url}/state/instances")
    return _of_model(doc, model)


def ready(node: DoubleProcess, model: str = LLAMA) -> bool:
    # instances and runners from one answer: a second request could see another placement
    _, state = call("GET", f"{node.url}/state")
    ids = _of_model(state["instances"], model)
    if not ids:
        return False
    runners = state["instances"][ids[0]]["MlxRingInstance"]["shardAssignments"]["nodeToRunner"]
    return all("RunnerReady" in state["runners"].get(r, {}) for r in runners.values())


def wait_until(check: Callable[[], bool], timeout: float = 20.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")


def write_config(tmp: Path, name: str, models: dict[str, Any], **reconciler: Any) -> Path:
    run = tmp / name / "run"
    data = tmp / name / "data"
    run.mkdir(parents=True)
    data.mkdir(parents=True)
    doc = {
        "schemaVersion": 1,
        "security": {"runtimeDir": str(run), "dataDir": str(data)},
        "models": models,
        "modelReconciler": {"intervalSec": 0.5, **reconciler},
    }
    path = tmp / name / "config.json"
    path.write_text(json.dumps(doc))
    return path


@contextlib.contextmanager
def reconciler(config: Path, url: str) -> Iterator[Path]:
    """Run the reconciler until the block ends; yields its log file."""
    log = config.parent / "reconcile.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "exo_nixos",
                "models",
                "reconcile",
                "--config",
                str(config),
                "--url",
                url,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        yield log
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            assert process.wait(10) == 0, log.read_text()
        except subprocess.TimeoutExpired:
            process.kill()
            raise


def master_hint(config: Path, node_id: str, master: str) -> None:
    write_master_hint(config.parent / "run", node_id, master)


def test_converges_from_empty_and_again_after_teardown(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        config = write_config(tmp_path, "a", {LLAMA: {}})
        master_hint(config, node.node_id, node.node_id)
        with reconciler(config, node.url) as log:
            wait_until(lambda: ready(node), what="the declared model running")
            first = instances(node)
            # EXO tears instances down when the master changes
            call("POST", f"{node.url}/__double__/teardown")
            wait_until(lambda: ready(node), what="the model running again after teardown")
            assert instances(node) != first
            wait_until(lambda: "1/1 declared models in place" in log.read_text(), what="STATUS")
        text = log.read_text()
        assert f"place {LLAMA}: declared running, no instance" in text


def test_two_reconcilers_on_one_host_never_place_twice(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        config = write_config(tmp_path, "a", {LLAMA: {}})
        master_hint(config, node.node_id, node.node_id)
        seen: list[int] = []
        with reconciler(config, node.url), reconciler(config, node.url):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and not ready(node):
                seen.append(len(instances(node)))
                time.sleep(0.05)
            for _ in range(20):  # a while longer once converged
                seen.append(len(instances(node)))
                time.sleep(0.05)
        assert max(seen) == 1, seen
        assert ready(node)


def test_only_the_elected_master_reconciles(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        on_master = write_config(tmp_path, "master", {LLAMA: {}})
        on_other = write_config(tmp_path, "other", {LLAMA: {}})
        master_hint(on_master, node.node_id, node.node_id)
        master_hint(on_other, node.node_id, "f" * 32)  # this node says another one is master
        seen: list[int] = []
        with reconciler(on_other, node.url) as other_log:
            time.sleep(2.0)
            assert instances(node) == []  # the standby did nothing
            with reconciler(on_master, node.url):
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline and not ready(node):
                    seen.append(len(instances(node)))
                    time.sleep(0.05)
        assert ready(node)
        assert max(seen) == 1, seen
        assert "standby: ffffffffffff… is master and reconciles" in other_log.read_text()


def test_two_masters_at_once_end_with_one_instance(tmp_path: Path) -> None:
    """During an election two nodes may both believe they are master (no shared lock): the
    duplicate placement is deleted, and both agree which instance stays."""
    with run_double(*FAST) as node:
        one = write_config(tmp_path, "one", {LLAMA: {}})
        two = write_config(tmp_path, "two", {LLAMA: {}})
        for config in (one, two):
            master_hint(config, node.node_id, node.node_id)
        with reconciler(one, node.url), reconciler(two, node.url):
            wait_until(lambda: ready(node) and len(instances(node)) == 1, what="one instance")
            time.sleep(1.5)
            assert len(instances(node)) == 1


def test_a_refused_placement_is_retried_with_its_reason(tmp_path: Path) -> None:
    with run_double(*FAST, "--too-big", QWEN) as node:
        config = write_config(tmp_path, "a", {QWEN: {}, LLAMA: {}})
        master_hint(config, node.node_id, node.node_id)
        with reconciler(config, node.url) as log:
            wait_until(lambda: ready(node, LLAMA), what="the model that fits")
            time.sleep(1.0)
            text = log.read_text()
        assert "No cycles found with sufficient memory" in text
        assert instances(node, QWEN) == []
        assert text.count(f"cannot place {QWEN}") >= 2  # retried, not dropped


def test_an_instance_that_never_becomes_ready_is_replaced(tmp_path: Path) -> None:
    with run_double(*FAST, "--never-ready", LLAMA) as node:
        config = write_config(tmp_path, "a", {LLAMA: {}}, placeTimeoutSec=2.0)
        master_hint(config, node.node_id, node.node_id)
        with reconciler(config, node.url) as log:
            wait_until(lambda: bool(instances(node)), what="a first instance")
            first = instances(node)
            wait_until(
                lambda: bool(instances(node)) and instances(node) != first,
                timeout=15,
                what="the instance replaced",
            )
        assert "not ready after" in log.read_text()


def test_models_declared_downloaded_only_are_downloaded(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        config = write_config(tmp_path, "a", {QWEN: {"running": False}})
        master_hint(config, node.node_id, node.node_id)

        def downloaded() -> bool:
            _, doc = call("GET", f"{node.url}/models?status=downloaded")
            return [m["id"] for m in doc["data"]] == [QWEN]

        with reconciler(config, node.url):
            wait_until(downloaded, what="the model downloaded")
        assert instances(node, QWEN) == []


def test_a_custom_model_card_is_added_first(tmp_path: Path) -> None:
    custom = "acme/Custom-1B"
    with run_double(*FAST, "--hub-model", custom) as node:
        config = write_config(tmp_path, "a", {custom: {"custom": True}})
        master_hint(config, node.node_id, node.node_id)
        with reconciler(config, node.url) as log:
            wait_until(lambda: ready(node, custom), what="the custom model running")
        assert f"add-card {custom}" in log.read_text()


def test_the_cache_is_repaired_before_placing(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        config = write_config(tmp_path, "a", {LLAMA: {}})
        master_hint(config, node.node_id, node.node_id)
        models = config.parent / "data" / "models"
        model = make_model(models, name=LLAMA.replace("/", "--"), shards=1)
        truncate(model / "model-00001-of-00001.safetensors")
        with reconciler(config, node.url) as log:
            wait_until(lambda: ready(node), what="placed")
        assert not (model / "model-00001-of-00001.safetensors").exists()
        moved = list(
            (config.parent / "data" / "quarantine").glob("*/*/model-00001-of-00001.safetensors")
        )
        assert len(moved) == 1
        assert "truncated" in log.read_text()


def test_a_node_that_does_not_answer_is_waited_for(tmp_path: Path) -> None:
    config = write_config(tmp_path, "a", {LLAMA: {}})
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_nixos",
            "models",
            "reconcile",
            "--once",
            "--config",
            str(config),
            "--url",
            "http://127.0.0.1:1",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 1
    assert "waiting for the node API: connection refused" in done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize("declared", [{}])
def test_nothing_declared_exits_at_once(tmp_path: Path, declared: dict[str, Any]) -> None:
    config = write_config(tmp_path, "a", declared)
    done = subprocess.run(
        [sys.executable, "-m", "exo_nixos", "models", "reconcile", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 0
    assert "no models declared" in done.stderr


def test_concurrent_passes_on_one_host_take_turns(tmp_path: Path) -> None:
    """Two passes at the same instant (same lock file): one places, the other stands back."""
    import asyncio

    import aiohttp

    from exo_nixos.config import DeclaredModel
    from exo_nixos.models.api import ModelsApi
    from exo_nixos.models.reconcile import Reconciler

    declared = {LLAMA: DeclaredModel.model_validate({})}

    async def race(url: str) -> list[str]:
        async with aiohttp.ClientSession() as session:
            passes = [
                Reconciler(
                    ModelsApi(session, url),
                    declared,
                    hint_dir=None,
                    lock_path=tmp_path / "models.lock",
                    place_timeout_s=60,
                )
                for _ in range(2)
            ]
            results = await asyncio.gather(*(p.run_pass() for p in passes))
            return [r.status for r in results]

    with run_double(*FAST) as node:
        statuses = run_coroutine(race(node.url))
        assert "another reconciler on this host holds the lock" in statuses
        time.sleep(0.5)
        assert len(instances(node)) == 1


def test_a_custom_card_the_hub_lacks_blocks_only_that_model(tmp_path: Path) -> None:
    with run_double(*FAST) as node:
        config = write_config(tmp_path, "a", {"acme/Missing": {"custom": True}, LLAMA: {}})
        master_hint(config, node.node_id, node.node_id)
        with reconciler(config, node.url) as log:
            wait_until(lambda: ready(node, LLAMA), what="the other model running")
            wait_until(
                lambda: (
                    "1/2 declared models in place; acme/Missing: cannot add its card"
                    in log.read_text()
                ),
                what="the reason in the status",
            )
        text = log.read_text()
        assert "HTTP 400 from /models/add: Failed to fetch model" in text
        assert instances(node, "acme/Missing") == []


def test_repair_failures_are_logged_and_placing_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from exo_nixos.config import parse_config
    from exo_nixos.models.reconcile import repair_function

    data = tmp_path / "data"
    model = make_model(data / "models", name=LLAMA.replace("/", "--"), shards=1)
    truncate(model / "model-00001-of-00001.safetensors")
    (data / "quarantine").write_text("a file where the quarantine directory should be")
    config = parse_config({"schemaVersion": 1, "security": {"dataDir": str(data)}})
    with caplog.at_level("WARNING"):
        repair_function(config)(LLAMA)  # does not raise
    assert "cannot quarantine damaged files" in caplog.text
    assert (model / "model-00001-of-00001.safetensors").exists()
