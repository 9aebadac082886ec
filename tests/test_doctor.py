"""``exo-nixos doctor`` on this host, on captured trees, and with a running node."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from exo_nixos.cli import main
from tests.exo_double.fixture import free_port, run_double

FIXTURES = Path(__file__).parent / "fixtures"


def run_doctor(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "doctor", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_runs_on_this_host_without_config(tmp_path, monkeypatch, capsys):
    # no config at the default path: what services.exo.enable would do
    monkeypatch.setattr("exo_nixos.commands.doctor.DEFAULT_CONFIG_PATH", tmp_path / "none.json")
    assert main(["doctor"]) in (0, 1)
    out = capsys.readouterr().out
    assert "not installed as a service here" in out
    assert "Accelerator: " in out
    assert "Cluster interface: " in out
    assert "Pre-flight: " in out
    assert "EXO node: " in out  # down here, or a node this machine runs: never probed elsewhere
    assert "directory /var/lib/exo" not in out


def test_gpu_tree_picks_cuda(tmp_path, monkeypatch, capsys):
    root = FIXTURES / "hardware" / "nvidia-dgx-h100"
    monkeypatch.setattr("exo_nixos.commands.doctor.DEFAULT_CONFIG_PATH", tmp_path / "none.json")
    rc = main(["doctor", "--root", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    accelerator = next(s for s in report["sections"] if s["title"] == "Accelerator")
    assert accelerator["summary"] == "cuda"
    network = next(s for s in report["sections"] if s["title"] == "Cluster interface")
    assert network["problems"], "a tree without network interfaces has no cluster link"
    assert rc == 1


def test_doctor_says_how_many_nodes_and_why(tmp_path, capsys):
    root = FIXTURES / "hardware" / "nvidia-dgx-h100"
    document = {
        "schemaVersion": 1,
        "networking": {"bondInterface": "bond0"},
        "hardware": {"nodePerGpu": {"enable": True, "groups": [[0], [1], [8]]}},
    }
    path = tmp_path / "config.json"
    path.write_text(json.dumps(document))
    main(["doctor", "--config", str(path), "--root", str(root)])
    out = capsys.readouterr().out
    assert "EXO nodes on this host: 3" in out
    assert "warning: gpu8: no NVIDIA GPU with device minor 8 here; that node stays down" in out


def test_bond_tree_and_configured_interface(tmp_path, capsys):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "schemaVersion": 1,
                "apiPort": free_port(),
                "networking": {"bondInterface": "bond0", "rdmaEnabled": False},
            }
        )
    )
    root = FIXTURES / "network" / "bond-active-backup-degraded"
    main(["doctor", "--config", str(config), "--root", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    network = next(s for s in report["sections"] if s["title"] == "Cluster interface")
    assert network["summary"] == "bond0"
    assert any("bond0" in w for w in network["warnings"])
    assert report["installed"] is True


def test_reports_a_running_node(tmp_path, capsys):
    with run_double() as node:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"schemaVersion": 1, "apiPort": node.port}))
        main(["doctor", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    section = next(s for s in report["sections"] if s["title"] == "EXO node")
    assert section["summary"].startswith("healthy")
    assert any(node.node_id in line for line in section["details"])


def test_a_named_config_that_is_missing_is_an_error(tmp_path):
    result = run_doctor("--config", str(tmp_path / "missing.json"))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"exo-nixos: error: {tmp_path / 'missing.json'}: no such config file; on NixOS set "
        "services.exo.enable, elsewhere pass --config FILE"
    ]
    assert result.stdout == ""


def test_a_running_node_holding_its_own_port_is_no_conflict(tmp_path, capsys):
    """The pre-flight port check in doctor: the port EXO itself listens on is fine."""
    with run_double() as node:
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"schemaVersion": 1, "apiPort": node.port}))
        code = main(["doctor", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    checks = next(s for s in report["sections"] if s["title"] == "Pre-flight")
    assert not any("ports" in line for line in checks["problems"]), checks
    assert not any(f"port {node.port}" in line for line in checks["problems"]), checks
    assert code == (1 if report["problems"] else 0)


def test_a_port_held_by_something_else_while_exo_is_down_is_a_conflict(tmp_path, capsys):
    import socket

    with socket.socket() as other:
        other.bind(("0.0.0.0", 0))
        other.listen()
        port = other.getsockname()[1]
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"schemaVersion": 1, "apiPort": port}))
        main(["doctor", "--config", str(config), "--json"])
    report = json.loads(capsys.readouterr().out)
    checks = next(s for s in report["sections"] if s["title"] == "Pre-flight")
    assert any(f"TCP port {port} (apiPort) is in use" in line for line in checks["problems"])


def test_bad_config_is_one_line(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "mode": "boss"}')
    result = run_doctor("--config", str(config))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "mode" in result.stderr
