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


def test_runs_on_this_host_without_config(tmp_path):
    result = run_doctor("--config", str(tmp_path / "none.json"))
    assert result.returncode in (0, 1), result.stderr
    assert "Traceback" not in result.stderr
    out = result.stdout
    assert "not installed as a service here" in out
    assert "Accelerator: " in out
    assert "Cluster interface: " in out
    assert "Pre-flight: " in out
    assert "EXO node: down" in out
    assert "directory /var/lib/exo" not in out


def test_gpu_tree_picks_cuda(tmp_path, capsys):
    root = FIXTURES / "hardware" / "nvidia-dgx-h100"
    rc = main(["doctor", "--config", str(tmp_path / "none.json"), "--root", str(root), "--json"])
    report = json.loads(capsys.readouterr().out)
    accelerator = next(s for s in report["sections"] if s["title"] == "Accelerator")
    assert accelerator["summary"] == "cuda"
    network = next(s for s in report["sections"] if s["title"] == "Cluster interface")
    assert network["problems"], "a tree without network interfaces has no cluster link"
    assert rc == 1


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


def test_bad_config_is_one_line(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "mode": "boss"}')
    result = run_doctor("--config", str(config))
    assert result.returncode == 2
    assert len(result.stderr.splitlines()) == 1
    assert "mode" in result.stderr
