"""The NixOS modules, evaluated with nixpkgs' lib: options, units, users, the config contract."""

from __future__ import annotations

import pytest

from exo_nixos.config import Mode, parse_config
from tests.nixeval import NixEvalError, evaluate, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

USER_SCHEMA_EXAMPLE = """
{
  services.exo = {
    enable = true;
    mode = "auto";
    networking = {
      bondInterface = "bond0";
      rdmaEnabled = true;
      discoveryPort = 52413;
    };
    apiPort = 52415;
    hardware = {
      autoDetect = true;
      preferredAccelerator = null;
      memoryLimit = "80%";
    };
    k3s = {
      integration = true;
      namespace = "exo-system";
      serviceAccount = "exo";
      kubeconfigFile = "/etc/rancher/k3s/k3s.yaml";
    };
    security = {
      user = "exo";
      group = "exo";
      dataDir = "/var/lib/exo";
      configDir = "/etc/exo";
    };
  };
}
"""


def test_disabled_module_adds_nothing():
    result = evaluate("{ }")
    assert result["services"] == {}
    assert result["targets"] == {}
    assert "exo/config.json" not in result["etc"]


def test_user_schema_example_evaluates_and_contract_holds():
    result = evaluate(USER_SCHEMA_EXAMPLE)
    assert result["assertions"] == []
    config = parse_config(result["etc"]["exo/config.json"])
    assert config.mode is Mode.AUTO
    assert config.networking.bond_interface == "bond0"
    assert config.hardware.memory_limit == "80%"
    assert config.k3s.integration is True


@pytest.mark.parametrize(
    ("mode", "unit", "role"),
    [
        ("master", "exo-master", "master"),
        ("worker", "exo-worker", "worker"),
        ("auto", "exo-worker", "worker"),
    ],
)
def test_mode_selects_node_unit(mode, unit, role):
    result = evaluate({"services": {"exo": {"enable": True, "mode": mode}}})
    assert result["exo"]["nodeUnit"] == unit
    service = result["services"][unit]
    assert f"--role {role}" in service["serviceConfig"]["ExecStart"]
    assert "exo.target" in service["partOf"]
    assert f"{unit}.service" in result["targets"]["exo"]["wants"]
    other = "exo-worker" if unit == "exo-master" else "exo-master"
    assert other not in result["services"]


def test_system_user_and_group_created():
    result = evaluate({"services": {"exo": {"enable": True}}})
    assert result["users"]["users"]["exo"]["isSystemUser"] is True
    assert result["users"]["groups"]["exo"] is not None


def test_no_worker_outside_master_fails_with_fix():
    result = evaluate({"services": {"exo": {"enable": True, "mode": "worker", "noWorker": True}}})
    assert any('set services.exo.mode = "master"' in m for m in result["assertions"])


def test_type_errors_are_reported():
    with pytest.raises(NixEvalError, match="apiPort"):
        evaluate({"services": {"exo": {"enable": True, "apiPort": 70000}}})
    with pytest.raises(NixEvalError, match="preferredAccelerator"):
        evaluate(
            {"services": {"exo": {"enable": True, "hardware": {"preferredAccelerator": "tpu"}}}}
        )


def test_rendered_unit_text():
    result = evaluate({"services": {"exo": {"enable": True, "mode": "master"}}})
    text = render_unit(result["services"]["exo-master"])
    assert text.startswith("[Unit]\n")
    assert "PartOf=exo.target" in text
    assert "Type=notify" in text
    assert "[Install]\nWantedBy=exo.target" in text
