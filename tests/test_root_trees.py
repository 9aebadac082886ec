"""Commands given --root judge the captured tree, never the live host behind it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from exo_nixos.cli import main
from exo_nixos.config import Accelerator, default_config
from exo_nixos.hardware import detect
from exo_nixos.hosttree import Tree
from exo_nixos.preflight import run_checks
from tests.exo_double.fixture import run_double

FIXTURES = Path(__file__).parent / "fixtures"
TREE = FIXTURES / "network" / "bond-active-backup"


def test_detect_on_an_empty_directory_says_it_is_no_tree(tmp_path, capsys):
    inventory = detect(tmp_path, use_nvml=False)
    assert any("does not look like a captured tree" in w for w in inventory.warnings)
    main(["detect", "--root", str(tmp_path)])
    assert "does not look like a captured tree" in capsys.readouterr().out


def test_detect_on_a_real_tree_does_not_say_so():
    inventory = detect(FIXTURES / "hardware" / "nvidia-dgx-h100", use_nvml=False)
    assert not any("captured tree" in w for w in inventory.warnings)


def test_preflight_on_a_tree_checks_no_live_port_and_addresses_fixes_to_the_tree(tmp_path):
    config = default_config()
    results = run_checks(config, Tree(TREE), detect(TREE, use_nvml=False), Accelerator.CPU)
    ports = next(r for r in results if r.check == "ports")
    assert ports.reason.startswith("not checked") and str(TREE) in ports.reason
    fixes = [r.fix for r in results if r.fix]
    assert fixes, results
    assert all(f.endswith(f"(on the machine {TREE} was captured from)") for f in fixes)


def test_doctor_on_a_tree_does_not_probe_the_live_node(tmp_path, capsys, monkeypatch):
    with run_double() as node:  # a live node on this host that must not be reported
        config = tmp_path / "config.json"
        config.write_text(json.dumps({"schemaVersion": 1, "apiPort": node.port}))
        main(["doctor", "--config", str(config), "--root", str(TREE), "--json"])
    report = json.loads(capsys.readouterr().out)
    section = next(s for s in report["sections"] if s["title"] == "EXO node")
    assert section["summary"].startswith("not probed")
    assert not any(node.node_id in line for line in section["details"])


def test_net_watch_refuses_a_tree(capsys):
    assert main(["net", "--watch", "--root", str(TREE)]) == 2
    err = capsys.readouterr().err
    assert "cannot watch the tree" in err and err.count("\n") == 1


@pytest.mark.parametrize("root", ["/", "/."])
def test_live_root_is_live(root):
    assert Tree(Path(root)).is_live
