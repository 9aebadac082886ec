"""The README's Nix examples parse and evaluate, and each node's config.json validates.

The worked multi-node example is evaluated through its own flake.nix: the flake's outputs are
called with stand-in inputs (``nixosSystem`` returns its arguments), and each node is
evaluated with the modules and specialArgs the flake gives it, so a node module that needs
``inputs`` fails here when the flake does not pass them.
"""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import Mode, parse_config
from exo_nixos.k3s.render import exposure
from tests.nixeval import NIX_ENV, evaluate, instantiate, nixpkgs_lib, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

README = Path(__file__).resolve().parent.parent / "README.md"
FAKE_STORE = "/nix/store/00000000000000000000000000000000"


def nix_blocks() -> list[str]:
    return re.findall(r"```nix\n(.*?)```", README.read_text(), re.DOTALL)


def named(block: str) -> str:
    name = re.match(r"# (\S+?)(?:\.nix)?[: ,]", block)
    assert name, block
    return name.group(1)


def example_files() -> dict[str, str]:
    text = README.read_text()
    section = text.split("### A worked multi-node example", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```nix\n(.*?)```", section, re.DOTALL)
    return {named(block): block for block in blocks}


def stand_in_inputs() -> str:
    """Nix text binding ``lib`` and stand-ins for the flake's ``nixpkgs`` and ``exo-nixos``."""
    return f"""
      lib = import {nixpkgs_lib()}/lib;
      exo-nixos = {{
        # eval.nix imports the repository's modules already
        nixosModules.default = {{ }};
        packages.x86_64-linux.exo-cuda = {{
          type = "derivation";
          name = "exo-cuda";
          outPath = "{FAKE_STORE}-exo-cuda";
        }};
      }};
      nixpkgs.lib = lib // {{ nixosSystem = args: args; }};
    """


def write_examples(tmp_path: Path) -> None:
    for name, block in example_files().items():
        (tmp_path / f"{name}.nix").write_text(block)


def evaluate_node(tmp_path: Path, node: str) -> dict[str, Any]:
    write_examples(tmp_path)
    return evaluate(f"""
      let
        {stand_in_inputs()}
        flake = import {tmp_path}/flake.nix;
        outputs = flake.outputs {{ self = outputs; inherit nixpkgs exo-nixos; }};
        system = outputs.nixosConfigurations.{node};
      in
      assert system.system == "x86_64-linux";
      {{ imports = system.modules; _module.args = system.specialArgs; }}
    """)


def test_every_nix_block_parses(tmp_path):
    blocks = nix_blocks()
    assert len(blocks) >= 7
    for number, block in enumerate(blocks):
        path = tmp_path / f"block{number}.nix"
        path.write_text(block)
        result = subprocess.run(
            ["nix-instantiate", "--parse", str(path)],
            capture_output=True,
            text=True,
            env=NIX_ENV,
            check=False,
        )
        assert result.returncode == 0, f"{block}\n{result.stderr}"


def test_example_has_every_node():
    assert set(example_files()) == {"flake", "common", "node1", "node2", "node3"}


def test_flake_defines_each_node_with_inputs(tmp_path):
    write_examples(tmp_path)
    result = instantiate(f"""
      let
        {stand_in_inputs()}
        flake = import {tmp_path}/flake.nix;
        outputs = flake.outputs {{ self = outputs; inherit nixpkgs exo-nixos; }};
      in
      builtins.mapAttrs (_: s: {{
        hasInputs = s.specialArgs.inputs ? exo-nixos;
        files = map toString (builtins.filter builtins.isPath s.modules);
      }}) outputs.nixosConfigurations
    """)
    assert result.returncode == 0, result.stderr
    systems = json.loads(result.stdout)
    assert set(systems) == {"node1", "node2", "node3"}
    for node, system in systems.items():
        assert system["hasInputs"], node
        assert [Path(f).name for f in system["files"]] == [f"{node}.nix"]


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


def test_nvidia_node_allows_only_the_driver_as_unfree(tmp_path):
    """nixpkgs' unfree check calls the predicate with the derivation's attributes."""
    write_examples(tmp_path)
    candidates = {
        "nvidia-x11": {"name": "nvidia-x11-580.95.05-6.12.41"},
        "nvidia-settings": {"pname": "nvidia-settings", "version": "580.95.05"},
        "nvidia-persistenced": {"pname": "nvidia-persistenced", "version": "580.95.05"},
        "hello": {"pname": "hello", "version": "2.12"},
    }
    result = instantiate(f"""
      let
        {stand_in_inputs()}
        node = import {tmp_path}/node2.nix {{
          inherit lib;
          config = {{ }};
          pkgs.stdenv.hostPlatform.system = "x86_64-linux";
          inputs = {{ inherit exo-nixos; }};
        }};
        allowed = node.nixpkgs.config.allowUnfreePredicate;
      in
      builtins.mapAttrs (_: allowed) (builtins.fromJSON {json.dumps(json.dumps(candidates))})
    """)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {
        "nvidia-x11": True,
        "nvidia-settings": True,
        "nvidia-persistenced": True,
        "hello": False,
    }


def k3s_example(tmp_path: Path) -> Path:
    (block,) = [b for b in nix_blocks() if named(b) == "k3s"]
    path = tmp_path / "k3s.nix"
    path.write_text(block)
    return path


def test_k3s_integration_alone_starts_no_registrar():
    """What the README says about `k3s.integration = true;` by itself."""
    result = evaluate({"services": {"exo": {"enable": True, "k3s": {"integration": True}}}})
    assert "exo-k3s-registrar" not in result["services"]
    assert any("no credentials" in w for w in result["warnings"])
    assert any("EXO's own API port 52415" in w for w in result["warnings"])
    config = parse_config(result["etc"]["exo/config.json"])
    assert exposure(config).port == 52415


def test_k3s_example_registers_behind_the_gateway(tmp_path):
    path = k3s_example(tmp_path)
    result = evaluate(f"{{ imports = [ {path} ]; services.exo.enable = true; }}")
    assert result["assertions"] == []
    assert result["warnings"] == []
    registrar = result["services"]["exo-k3s-registrar"]
    assert registrar["serviceConfig"]["LoadCredential"] == [
        "k3s-token:/run/secrets/exo-k3s-token",
        "k3s-ca:/var/lib/rancher/k3s/agent/server-ca.crt",
    ]
    config = parse_config(result["etc"]["exo/config.json"])
    assert exposure(config).via_gateway
    assert exposure(config).port == 52417
    assert 52417 in result["firewall"]["allowedTCPPorts"]
