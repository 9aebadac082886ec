"""``exo-nixos health`` and ``status`` against the EXO test double running as a process."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.cli import main
from exo_nixos.exoapi import write_master_hint
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


def test_status_text_with_peers_instances_and_unknown_master(capsys):
    args = ("--peer", "cc33=10.0.0.3", "--instance", MODEL)
    with run_double(*args, node_id="dd44") as double:
        code, out, _ = run_cli(capsys, "status", "--url", double.url)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == f"status     healthy ({double.url})"
    assert "node       dd44" in lines
    assert "master     unknown (exo's API does not name the master)" in lines
    assert "peers      1" in lines
    assert f"  cc33 double-cc33 (http://10.0.0.3:{double.port})" in lines
    assert "instances  1" in lines
    assert f"  {MODEL} on dd44, cc33 [RunnerReady]" in lines


@pytest.mark.parametrize(("master", "expected"), [("ee55", "yes (this node)"), ("ff66", None)])
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
    assert f"master     {expected or 'no (master is ff66)'}" in out.splitlines()
    node = json.loads(js)["node"]
    assert node["masterId"] == master
    assert node["isMaster"] is (master == "ee55")


def test_status_degraded_and_down(capsys):
    with run_double() as double:
        double.set_fault("error500", paths=["/state"])
        code, out, _ = run_cli(capsys, "status", "--url", double.url)
    assert code == 1
    assert "peers      unknown (/state did not answer)" in out
    assert "problem    HTTP 500 from /state" in out
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
            done = as_nobody("-m", "exo_nixos", "status", "--config", str(config))
    assert "Traceback" not in done.stderr, done.stderr
    assert "cannot read" in done.stdout, done.stdout
    assert "run as root or the service user" in done.stdout
