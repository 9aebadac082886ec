"""``exo-nixos net`` as a user runs it: a real process, text and JSON, exit codes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "network"


def net(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "net", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def write_config(tmp_path: Path, **networking: object) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schemaVersion": 1, "networking": networking}))
    return path


def test_text_report_for_a_degraded_bond(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, bondInterface="bond0", rdmaEnabled=True)
    result = net("--root", FIXTURES / "bond-active-backup-degraded", "--config", cfg)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "bond0: active-backup, 1 of 2 slaves up, active slave enp1s0f0: DEGRADED" in out
    assert "enp1s0f1: link down" in out
    assert "Cluster interface: bond0 (configured)" in out
    assert "! bond bond0 is degraded" in out
    assert "falls back to TCP" in out


def test_json_report_and_exit_code_on_problems(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, bondInterface="eth0")
    result = net("--json", "--root", FIXTURES / "no-ipv6", "--config", cfg)
    assert result.returncode == 1
    data = json.loads(result.stdout)
    assert data["cluster"]["name"] == "eth0"
    assert data["cluster"]["ok"] is False
    assert any("IPv6 is disabled" in p for p in data["cluster"]["problems"])
    eth1 = next(i for i in data["interfaces"] if i["name"] == "eth1")
    assert eth1["multicast"] is False and eth1["link_local"] == ["fe80::5054:ff:fe12:3457"]


def test_json_lists_bonds_thunderbolt_and_rdma() -> None:
    bonds = json.loads(net("--json", "--root", FIXTURES / "bond-8023ad").stdout)["bonds"]
    assert bonds[0]["mode"] == "802.3ad" and bonds[0]["degraded"] is False
    tb = json.loads(net("--json", "--root", FIXTURES / "thunderbolt").stdout)["thunderbolt"]
    assert tb["interfaces"] == ["thunderbolt0", "thunderbolt1"]
    rdma = json.loads(net("--json", "--root", FIXTURES / "rdma").stdout)["rdma"]
    assert [(d["name"], d["active"]) for d in rdma] == [("mlx5_0", True), ("mlx5_1", False)]


def test_user_errors_are_one_line(tmp_path: Path) -> None:
    missing = net("--root", tmp_path / "nope")
    assert missing.returncode == 2
    assert (
        missing.stderr.startswith("exo-nixos: error: --root") and "Traceback" not in missing.stderr
    )
    bad = tmp_path / "bad.json"
    bad.write_text('{"schemaVersion": 1, "networking": {"bondInterface": "a b"}}')
    invalid = net("--root", FIXTURES / "bond-8023ad", "--config", bad)
    assert invalid.returncode == 2
    assert "networking.bondInterface" in invalid.stderr


def test_net_does_not_load_netlink_unless_watching() -> None:
    code = (
        "import sys; from exo_nixos.cli import main; "
        f"rc = main(['net', '--json', '--root', {str(FIXTURES / 'rdma')!r}]); "
        "print('pyroute2' in sys.modules, file=sys.stderr)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.stderr.strip().splitlines()[-1] == "False"
    assert json.loads(result.stdout)["cluster"]["name"] == "enp65s0f0np0"


def test_capture_round_trip_of_every_fixture(tmp_path: Path) -> None:
    for tree in sorted(p for p in FIXTURES.iterdir() if p.is_dir()):
        dest = tmp_path / tree.name
        result = net("--capture", dest, "--root", tree)
        assert result.returncode == 0, result.stderr
        assert f"read it with: exo-nixos net --root {dest}" in result.stdout
        original = json.loads(net("--json", "--root", tree).stdout)
        copied = json.loads(net("--json", "--root", dest).stdout)
        assert {**original, "root": ""} == {**copied, "root": ""}, tree.name
    kept = tmp_path / "thunderbolt/sys/bus/thunderbolt/drivers/thunderbolt-net/.keep"
    assert kept.is_file(), "empty directories carry a marker so git keeps them"


def test_capture_refuses_a_used_directory(tmp_path: Path) -> None:
    (tmp_path / "x").write_text("")
    result = net("--capture", tmp_path, "--root", FIXTURES / "rdma")
    assert result.returncode == 2 and "not an empty directory" in result.stderr
