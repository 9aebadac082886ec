"""nix/modules/exo-k3s.nix evaluated with nixpkgs' lib: manifests, registrar unit, warnings."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from exo_nixos.config import parse_config
from tests.nixeval import NixBuildError, evaluate, exposure, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

GATEWAY = 'gateway = { listenAddress = "0.0.0.0"; apiKeysFile = "/run/secrets/exo-keys"; };'


def module(k3s: str, role: str | None = "server", extra: str = GATEWAY) -> str:
    kube = f'services.k3s = {{ enable = true; role = "{role}"; }};' if role else ""
    return f"{{ services.exo = {{ enable = true; k3s = {{ {k3s} }}; {extra} }}; {kube} }}"


TOKEN = (
    'integration = true; tokenFile = "/run/secrets/exo-k3s-token"; '
    'apiServer = "https://10.0.0.1:6443"; caFile = "/etc/k3s-ca.crt";'
)


def registrar(result: dict[str, Any]) -> dict[str, Any]:
    unit: dict[str, Any] = result["services"]["exo-k3s-registrar"]
    return unit


def test_server_node_gets_manifests_rendered_by_the_tool() -> None:
    result = evaluate(module(TOKEN))
    assert result["assertions"] == []
    manifest = result["k3sManifests"]["exo-system"]
    assert manifest["enable"] is True
    assert manifest["source"] == "exo-k3s-manifests.yaml"
    assert manifest["content"] is None


def test_manifest_derivation_runs_render_on_the_config_file(tmp_path: Path) -> None:
    """The derivation's command line, run with this checkout's tool, renders valid YAML."""
    probe = (
        "{ config, ... }: { imports = [ ("
        + module(TOKEN + ' allowedNamespaces = [ "ai" ];')
        + ") ];"
        ' environment.etc."k3s-render-command".text ='
        " config.services.k3s.manifests.exo-system.source.command; }"
    )
    result = evaluate(probe)
    command = result["etc"]["k3s-render-command"].split()
    # the build platform's tool, from nativeBuildInputs
    assert command[0] == "exo-nixos"
    assert command[1:4] == ["k3s", "render", "--config"]
    assert command[4].startswith("/nix/store/") and command[4].endswith("exo-config.json")
    assert command[5:] == ["--output", "$out"]
    config = tmp_path / "config.json"
    config.write_text(json.dumps(result["etc"]["exo/config.json"]))
    out = tmp_path / "out.yaml"
    tool = Path(sys.executable).with_name("exo-nixos")
    subprocess.run([str(tool), *command[1:4], str(config), "--output", str(out)], check=True)
    kinds = [doc["kind"] for doc in yaml.safe_load_all(out.read_text())]
    assert kinds[-1] == "NetworkPolicy" and "Service" in kinds


def test_agent_node_gets_no_manifests_but_the_registrar() -> None:
    result = evaluate(module(TOKEN, role="agent"))
    assert result["k3sManifests"] == {}
    unit = registrar(result)
    assert "k3s.service" in unit["after"]
    assert result["warnings"] == []


def test_registrar_unit_ordering_credentials_and_hardening() -> None:
    result = evaluate(module(TOKEN))
    unit = registrar(result)
    assert unit["after"] == ["network-online.target", "exo-worker.service", "k3s.service"]
    assert unit["partOf"] == ["exo.target"]
    assert unit["wantedBy"] == ["exo.target"]
    service = unit["serviceConfig"]
    assert service["LoadCredential"] == [
        "k3s-token:/run/secrets/exo-k3s-token",
        "k3s-ca:/etc/k3s-ca.crt",
    ]
    assert " k3s register --config /nix/store/" in service["ExecStart"]
    assert service["DynamicUser"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["CapabilityBoundingSet"] == ""
    text = render_unit(unit)
    assert "LoadCredential=k3s-token:/run/secrets/exo-k3s-token\n" in text
    assert "TimeoutStopSec=20\n" in text


def test_master_node_orders_after_the_master_unit() -> None:
    result = evaluate(module(TOKEN, extra=GATEWAY + ' mode = "master";'))
    assert "exo-master.service" in registrar(result)["after"]


def test_node_without_k3s_uses_its_credentials_and_no_k3s_ordering() -> None:
    result = evaluate(module(TOKEN, role=None))
    assert result["k3sManifests"] == {}
    assert "k3s.service" not in registrar(result)["after"]


def test_agent_without_credentials_warns_and_runs_no_registrar() -> None:
    result = evaluate(module("integration = true;", role="agent"))
    assert "exo-k3s-registrar" not in result["services"]
    assert len(result["warnings"]) == 1
    warning = result["warnings"][0]
    assert "K3s agent node has no credentials" in warning
    assert "services.exo.k3s.tokenFile" in warning


def test_server_without_credentials_still_renders_manifests_and_warns() -> None:
    result = evaluate(module("integration = true;"))
    assert "exo-system" in result["k3sManifests"]
    assert "exo-k3s-registrar" not in result["services"]
    assert any("no credentials" in w for w in result["warnings"])


def test_service_discovery_off_means_static_objects_only() -> None:
    result = evaluate(module(TOKEN + " serviceDiscovery = false;"))
    assert "exo-system" in result["k3sManifests"]
    assert "exo-k3s-registrar" not in result["services"]
    assert result["warnings"] == []


def test_integration_off_adds_nothing() -> None:
    result = evaluate(module('tokenFile = "/t"; apiServer = "https://a:6443";'))
    assert result["k3sManifests"] == {}
    assert "exo-k3s-registrar" not in result["services"]


def test_loopback_gateway_warns_that_the_service_is_unauthenticated() -> None:
    result = evaluate(module(TOKEN, extra=""))
    assert any("no authentication" in w and "listenAddress" in w for w in result["warnings"])


def test_token_without_api_server_fails_the_config_check_with_the_fix() -> None:
    with pytest.raises(NixBuildError, match=r"k3s.tokenFile needs k3s.apiServer.*https://"):
        evaluate(module('integration = true; tokenFile = "/run/secrets/t";'))


def test_both_credentials_fail_the_config_check() -> None:
    with pytest.raises(NixBuildError, match=r"set k3s\.kubeconfigFile or k3s\.tokenFile, not both"):
        evaluate(module(TOKEN + ' kubeconfigFile = "/etc/rancher/k3s/k3s.yaml";'))


def test_config_document_carries_the_k3s_section() -> None:
    result = evaluate(
        module(TOKEN + ' allowedNamespaces = [ "ai-apps" ]; nodeAddress = "10.0.0.21";')
    )
    config = parse_config(result["etc"]["exo/config.json"])
    assert config.k3s.integration is True
    assert config.k3s.token_file == "/run/secrets/exo-k3s-token"
    assert config.k3s.allowed_namespaces == ["ai-apps"]
    assert config.k3s.node_address == "10.0.0.21"


def test_registrar_unit_security_exposure_is_low(tmp_path: Path) -> None:
    unit = registrar(evaluate(module(TOKEN)))
    assert exposure(unit, "exo-k3s-registrar.service", tmp_path) <= 2.0
