"""``exo-nixos health`` and ``status`` against the EXO test double running as a process."""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.cli import main
from exo_nixos.exoapi import ExoApiError, probe_sync, write_master_hint
from exo_nixos.monitoring.facts import SupervisorFacts, write_facts
from tests.asuser import as_nobody, open_tmp
from tests.exo_double.fixture import free_port, run_double

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def run_cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def write_config(path: Path, **fields: Any) -> Path:
    path.write_text(json.dumps({"schemaVersion": 1, **fields}))
    return path


def test_health_healthy(capsys):
    with run_double(node_id="aa11") as double:
        code, out, _ = run_cli(capsys, "health", "--url", double.url)
    assert code == 0
    assert out == f"healthy: node aa11 at {double.url}\n"


def test_health_degraded_when_models_fail(capsys):
    with run_double(node_id="aa12") as double:
        double.set_fault("error500", paths=["/models"])
        code, out, _ = run_cli(capsys, "health", "--url", double.url)
    assert code == 1
    assert out.splitlines() == [f"degraded: node aa12 at {double.url}", "  HTTP 500 from /models"]


def test_health_degraded_without_master(capsys):
    with run_double("--no-master") as double:
        code, out, _ = run_cli(capsys, "health", "--url", double.url)
    assert code == 1
    assert "no master reached yet" in out


def test_health_down_when_nothing_listens(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run_cli(capsys, "health", "--url", url)
    assert code == 2
    assert out == f"down: connection refused at {url}: is exo running?\n"


def test_health_down_on_hang_with_timeout(capsys):
    with run_double() as double:
        double.set_fault("hang")
        code, out, _ = run_cli(capsys, "health", "--url", double.url, "--timeout", "0.5")
    assert code == 2
    assert out == f"down: timed out after 0.5s waiting for {double.url}/node_id\n"


def test_health_down_on_500(capsys):
    with run_double() as double:
        double.set_fault("error500")
        code, out, _ = run_cli(capsys, "health", "--url", double.url, "--json")
    assert code == 2
    doc = json.loads(out)
    assert doc["status"] == "down"
    assert doc["problems"] == ["HTTP 500 from /node_id"]
    assert doc["node"] is None


def test_health_json_healthy(capsys):
    with run_double("--instance", MODEL, node_id="bb22") as double:
        code, out, _ = run_cli(capsys, "health", "--url", double.url, "--json")
    assert code == 0
    doc = json.loads(out)
    assert doc["status"] == "healthy"
    assert doc["nodeId"] == "bb22"
    assert doc["problems"] == []
    assert doc["node"]["instances"][0]["modelId"] == MODEL


def test_health_url_and_timeout_from_config(capsys, tmp_path):
    with run_double() as double:
        config = write_config(
            tmp_path / "c.json", apiPort=double.port, healthCheck={"timeoutSec": 0.5}
        )
        assert run_cli(capsys, "health", "--config", str(config))[0] == 0
        double.set_fault("hang")
        code, out, _ = run_cli(capsys, "health", "--config", str(config))
    assert code == 2
    assert "timed out after 0.5s" in out


def test_health_bad_config_and_bad_url_are_user_errors(capsys, tmp_path):
    code, _, err = run_cli(capsys, "health", "--config", str(tmp_path / "missing.json"))
    assert code == 2
    assert "no such config file" in err
    code, _, err = run_cli(capsys, "health", "--url", "ftp://x:1")
    assert code == 2
    assert err == "exo-nixos: error: invalid URL 'ftp://x:1': expected http://HOST:PORT\n"


def test_health_as_a_real_command():
    url = f"http://127.0.0.1:{free_port()}"
    result = subprocess.run(
        [sys.executable, "-m", "exo_nixos", "health", "--url", url, "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2
    assert json.loads(result.stdout)["status"] == "down"


@contextlib.contextmanager
def two_nodes(port: int, *args: str, second: str = "cc33") -> Iterator[None]:
    """dd44 on 127.0.0.1 naming cc33 at 127.0.0.2; ``second`` answers on 127.0.0.2 (same
    port, as two hosts would)."""
    common = ("--api-port", str(port), *args)
    with (
        run_double(*common, "--bind", "127.0.0.1", "--peer", "cc33=127.0.0.2", node_id="dd44"),
        run_double(
            *common, "--bind", "127.0.0.2", "--peer", "dd44=127.0.0.1", node_id=second, wait=False
        ) as other,
    ):
        deadline = time.monotonic() + 20
        while True:
            try:
                probe_sync(f"http://127.0.0.2:{port}", 1.0)
                break
            except ExoApiError:
                assert time.monotonic() < deadline, other.log_text()
                time.sleep(0.1)
        yield


def status_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, dict[str, Any]]:
    code, out, _ = run_cli(capsys, "status", "--json", *argv)
    return code, json.loads(out)


def test_status_table_of_a_healthy_two_node_cluster(capsys, monkeypatch):
    """Two doubles on one port (127.0.0.1 and .2), each naming the other: both checked."""
    monkeypatch.setenv("COLUMNS", "200")
    port = free_port()
    with two_nodes(port, "--instance", MODEL):
        url = f"http://127.0.0.1:{port}"
        code, out, _ = run_cli(capsys, "status", "--url", url)
        json_code, doc = status_json(capsys, "--url", url)
    assert (code, json_code) == (0, 0), out
    assert out.splitlines()[0].startswith(f"cluster healthy via {url} (node dd44")
    lines = out.splitlines()
    table = lines[lines.index("Nodes") : lines.index("Instances")]
    rows = {line.split()[1]: line for line in table if line.startswith("│ ")}
    assert "yes" in rows["cc33"].split("│")[-2]
    assert "127.0.0.2" in rows["cc33"]
    assert "0.0 / 64.0 GiB" not in rows["cc33"] and "16.0 / 64.0 GiB" in rows["cc33"]
    nodes = {n["nodeId"]: n for n in doc["cluster"]["nodes"]}
    assert nodes["cc33"]["reachable"] is True
    assert nodes["cc33"]["reachDetail"] == f"http://127.0.0.2:{port}"
    assert nodes["dd44"]["target"] is True
    assert nodes["cc33"]["backends"] == ["MlxCpu"]
    assert nodes["cc33"]["memoryTotalBytes"] == 64 << 30
    assert nodes["cc33"]["instances"] == [MODEL]
    (instance,) = doc["cluster"]["instances"]
    assert instance["state"] == "Ready"
    assert instance["sharding"] == "Pipeline"
    assert instance["nodeIds"] == ["dd44", "cc33"]
    assert doc["problems"] == []


def test_status_split_cluster_names_the_node_it_cannot_reach(capsys):
    """The state lists a peer whose API does not answer here: degraded, and why."""
    with run_double("--bind", "127.0.0.1", "--peer", "cc33=127.0.0.3", node_id="dd44") as double:
        code, doc = status_json(capsys, "--url", double.url, "--timeout", "1")
    assert code == 1
    assert doc["status"] == "degraded"
    nodes = {n["nodeId"]: n for n in doc["cluster"]["nodes"]}
    assert nodes["cc33"]["reachable"] is False
    assert f"connection refused at http://127.0.0.3:{double.port}" in nodes["cc33"]["reachDetail"]
    (problem,) = doc["problems"]
    assert problem.startswith("node cc33 (double-cc33) not reachable from here: ")


def test_status_peer_answering_as_another_node_is_not_reachable(capsys):
    port = free_port()
    with two_nodes(port, second="other"):
        code, doc = status_json(capsys, "--url", f"http://127.0.0.1:{port}")
    assert code == 1
    nodes = {n["nodeId"]: n for n in doc["cluster"]["nodes"]}
    assert "answers as node 'other', not as this one" in nodes["cc33"]["reachDetail"]


def test_status_degraded_by_a_failed_runner_shows_downloads(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "200")
    args = ["--instance", MODEL, "--runner-status", "RunnerFailed"]
    args += ["--download", "mlx-community/Qwen3-0.6B-4bit=40"]
    with run_double(*args, node_id="ee55") as double:
        code, out, _ = run_cli(capsys, "status", "--url", double.url)
        _, doc = status_json(capsys, "--url", double.url)
    assert code == 1
    assert "problem: instance of mlx-community/Llama-3.2-1B-Instruct-4bit failed: runner " in out
    assert "40% at 50 MiB/s" in out
    ongoing = [d for d in doc["cluster"]["downloads"] if d["status"] == "Ongoing"]
    assert ongoing[0]["progress"] == pytest.approx(0.4, abs=0.001)
    assert doc["cluster"]["instances"][0]["state"] == "Failed"


@pytest.mark.parametrize(("master", "expected"), [("ee55", "the master"), ("ff66", "master ff66")])
def test_status_master_from_the_supervisors_hint(capsys, tmp_path, master, expected):
    runtime = tmp_path / "run"
    runtime.mkdir()
    with run_double(node_id="ee55") as double:
        config = write_config(
            tmp_path / "c.json", apiPort=double.port, security={"runtimeDir": str(runtime)}
        )
        write_master_hint(runtime, "ee55", master)
        code, out, _ = run_cli(capsys, "status", "--config", str(config))
        _, js, _ = run_cli(capsys, "status", "--config", str(config), "--json")
    assert code == 0
    assert f"(node ee55, {expected})" in out.splitlines()[0]
    node = json.loads(js)["node"]
    assert node["masterId"] == master
    assert node["isMaster"] is (master == "ee55")


def test_status_degraded_and_down(capsys):
    with run_double() as double:
        double.set_fault("error500", paths=["/state"])
        code, out, _ = run_cli(capsys, "status", "--url", double.url)
    assert code == 1
    assert "problem: HTTP 500 from /state" in out
    assert "not seen: nodes, instances and downloads unknown: /state gave no usable answer" in out
    url = f"http://127.0.0.1:{free_port()}"
    code, out, _ = run_cli(capsys, "status", "--url", url, "--json")
    assert code == 2
    assert json.loads(out)["status"] == "down"


@pytest.mark.parametrize("value", ["0", "-1", "nan", "inf", "soon"])
def test_timeout_must_be_positive_seconds(capsys, value):
    with pytest.raises(SystemExit) as info:
        main(["health", "--timeout", value])
    assert info.value.code == 2
    assert "is not a positive number of seconds" in capsys.readouterr().err


def test_status_as_an_admin_says_the_hint_is_unreadable_not_just_unknown():
    """Run by a user who cannot read the runtime dir: it says so, and what to do."""
    with open_tmp() as tmp:
        runtime = tmp / "run"
        runtime.mkdir(mode=0o750)
        with run_double(node_id="ee55") as double:
            config = write_config(
                tmp / "c.json", apiPort=double.port, security={"runtimeDir": str(runtime)}
            )
            config.chmod(0o644)
            write_master_hint(runtime, "ee55", "ee55")
            (runtime / "master.json").chmod(0o600)
            write_facts(runtime, SupervisorFacts("worker", "cpu"))
            done = as_nobody("-m", "exo_nixos", "status", "--config", str(config))
    assert "Traceback" not in done.stderr, done.stderr
    out = " ".join(done.stdout.split())  # the table may wrap long lines
    assert "not seen: master unknown: cannot read" in out, out
    assert "not seen: accelerator and memory offer unknown: cannot read" in out, out
    assert "run as root or the service user" in out
