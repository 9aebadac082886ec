"""``exo-nixos models list | pull | place | remove`` against the double, as people run them."""

from __future__ import annotations

import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import KEY_A, gateway_config, run_gateway, write_keys

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"
QWEN = "mlx-community/Qwen3-0.6B-4bit"
SLOW = ("--download-seconds", "2.5", "--place-delay", "0.2")


def models(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "models", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def test_place_prints_plain_progress_lines_when_not_a_terminal() -> None:
    with run_double(*SLOW) as node:
        done = models("place", "--url", node.url, LLAMA)
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        assert lines[0] == f"placing {LLAMA}"
        ongoing = [line for line in lines if ": ongoing " in line]
        assert len(ongoing) >= 2  # a line at least every 2 s while it downloads
        shares = [int(line.split(": ongoing ")[1].split("%")[0]) for line in ongoing]
        assert shares == sorted(shares) and shares[-1] > shares[0]
        assert any(": completed 100%" in line for line in lines)
        assert lines[-1].startswith(f"{LLAMA} is running")
        # placing again follows the existing instance instead of placing a second one
        again = models("place", "--url", node.url, LLAMA)
        assert again.returncode == 0
        assert "has an instance already" in again.stdout
        listing = json.loads(models("list", "--url", node.url, "--json").stdout)
        [row] = listing["models"]
        assert row["instances"] == 1 and row["ready"]


def test_pull_downloads_without_an_instance() -> None:
    with run_double(*SLOW) as node:
        done = models("pull", "--url", node.url, QWEN)
        assert done.returncode == 0, done.stderr
        assert done.stdout.splitlines()[-1] == f"{QWEN} downloaded on 1 node(s)"
        listing = models("list", "--url", node.url)
        assert f"{QWEN}  ?" in listing.stdout
        assert "downloaded" in listing.stdout


def test_failures_are_one_line_and_exit_1() -> None:
    with run_double(*SLOW, "--too-big", QWEN, "--fail-download", LLAMA) as node:
        refused = models("place", "--url", node.url, QWEN)
        assert refused.returncode == 1
        assert refused.stdout.strip() == (
            f"the cluster cannot place {QWEN}: No cycles found with sufficient memory"
        )
        failed = models("pull", "--url", node.url, LLAMA)
        assert failed.returncode == 1
        assert "download failed on" in failed.stdout
        unknown = models("place", "--url", node.url, "nobody/nothing")
        assert unknown.returncode == 2
        assert unknown.stderr.startswith("exo-nixos: error: EXO has no model card for")
        assert "Traceback" not in unknown.stderr + failed.stderr + refused.stderr


def test_a_model_that_never_becomes_ready_times_out() -> None:
    with run_double(*SLOW, "--never-ready", LLAMA, "--download-seconds", "0.2") as node:
        done = models("place", "--url", node.url, "--wait", "2", LLAMA)
        assert done.returncode == 1
        assert done.stdout.splitlines()[-1] == f"{LLAMA}: not ready after 2s"


def test_list_with_a_config_and_remove(tmp_path: Path) -> None:
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps({"schemaVersion": 1, "models": {LLAMA: {}, QWEN: {"running": False}}})
    )
    with run_double("--instance", LLAMA) as node:
        listing = json.loads(
            models("list", "--url", node.url, "--config", str(config), "--json").stdout
        )
        declared = {row["modelId"]: row["declared"] for row in listing["models"]}
        assert declared == {LLAMA: "running", QWEN: "downloaded"}
        removed = models("remove", "--url", node.url, "--config", str(config), LLAMA)
        assert removed.returncode == 0
        assert removed.stdout.startswith("deleted instance ")
        assert "the reconciler places it again" in removed.stdout
        again = models("remove", "--url", node.url, LLAMA)
        assert again.stdout == f"no instance of {LLAMA}\n"


def test_through_the_gateway_with_an_api_key(tmp_path: Path) -> None:
    keys = write_keys(tmp_path / "keys", f"alice:{KEY_A}\n")
    key_file = tmp_path / "my-key"
    key_file.write_text(KEY_A + "\n")
    with run_double("--instance", LLAMA) as node:
        config = gateway_config(port=free_port(), keys_file=keys, static_backends=[node.url])
        with run_gateway(config) as gateway:
            deadline = time.monotonic() + 15
            while True:
                done = models("list", "--url", gateway.url, "--api-key-file", str(key_file))
                if done.returncode == 0 or time.monotonic() > deadline:
                    break
                time.sleep(0.3)
            assert done.returncode == 0, done.stderr
            assert LLAMA in done.stdout
            without = models("list", "--url", gateway.url)
            assert without.returncode == 2
            assert "HTTP 401" in without.stderr
    missing = models(
        "list", "--url", "http://127.0.0.1:1", "--api-key-file", str(tmp_path / "none")
    )
    assert missing.returncode == 2
    assert "--api-key-file" in missing.stderr


def test_a_terminal_gets_progress_bars() -> None:
    with run_double(*SLOW) as node:
        leader, follower = pty.openpty()
        process = subprocess.Popen(
            [sys.executable, "-m", "exo_nixos", "models", "place", "--url", node.url, LLAMA],
            stdout=follower,
            stderr=follower,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "COLUMNS": "120", "TERM": "xterm"},
        )
        os.close(follower)
        output = b""
        while True:
            ready, _, _ = select.select([leader], [], [], 30)
            if not ready:
                break
            try:
                chunk = os.read(leader, 65536)
            except OSError:
                break
            if not chunk:
                break
            output += chunk
        assert process.wait(30) == 0
        os.close(leader)
        text = output.decode(errors="replace")
        assert "━" in text  # rich's bar
        assert "MiB" in text
        assert f"{LLAMA} is running" in text
