"""The README's worked multi-node example evaluates, and each node's config.json validates."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import Mode, parse_config
from tests.nixeval import evaluate, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

README = Path(__file__).resolve().parent.parent / "README.md"


def example_files() -> dict[str, str]:
    text = README.read_text()
    section = text.split("### A worked multi-node example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```nix\n(.*?)```", section, re.DOTALL)
    files = {}
    for block in blocks:
        name = re.match(r"# (\S+?)(?:\.nix)?[: ,]", block)
        assert name, block
        files[name.group(1)] = block
    return files


def evaluate_node(tmp_path: Path, node: str) -> dict[str, Any]:
    for name, block in example_files().items():
        (tmp_path / f"{name}.nix").write_text(block)
    fake_inputs = """
    { lib, ... }: {
      _module.args.inputs.exo-nixos.packages.x86_64-linux = {
        exo-cuda = {
          type = "derivation";
          name = "exo-cuda";
          outPath = "/nix/store/00000000000000000000000000000000-exo-cuda";
        };
      };
    }
    """
    (tmp_path / "inputs.nix").write_text(fake_inputs)
    return evaluate(f"{{ imports = [ {tmp_path}/{node}.nix {tmp_path}/inputs.nix ]; }}")


def test_example_has_every_node():
    assert set(example_files()) == {"common", "node1", "node2", "node3"}


@pytest.mark.parametrize(
    ("node", "mode", "accelerators"),
    [
        ("node1", Mode.MASTER, {"cpu"}),
        ("node2", Mode.AUTO, {"cpu", "cuda"}),
        ("node3", Mode.AUTO, {"cpu"}),
    ],
)
def test_node_evaluates_and_contract_holds(tmp_path, node, mode, accelerators):
    result = evaluate_node(tmp_path, node)
    assert result["assertions"] == []
    assert result["warnings"] == []
    config = parse_config(result["etc"]["exo/config.json"])
    assert config.mode is mode
    assert config.cluster_namespace == "lab"
    assert config.networking.bond_interface == "bond0"
    assert {str(a) for a in config.hardware.packages} == accelerators
    assert "bond0" in result["firewall"]["interfaces"]
