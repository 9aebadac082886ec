"""services.exo.gateway: exo-api.service, its hardening, firewall, assertions, config."""

from __future__ import annotations

import shutil
import subprocess
from typing import Any

import pytest

from exo_nixos.config import parse_config
from tests.nixeval import NixBuildError, NixEvalError, evaluate, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]


def exo(**settings: Any) -> dict[str, Any]:
    return {"services": {"exo": {"enable": True, **settings}}}


def test_default_gateway_unit_follows_the_node_unit():
    result = evaluate(exo(mode="master"))
    assert result["assertions"] == []
    unit = result["services"]["exo-api"]
    assert "exo-master.service" in unit["after"]
    assert "exo-master.service" in unit["requires"]
    assert unit["partOf"] == ["exo.target"]
    assert "exo-api.service" in result["targets"]["exo"]["wants"]
    service = unit["serviceConfig"]
    assert "/bin/exo-nixos gateway --config /nix/store/" in service["ExecStart"]
    check, signal = service["ExecReload"]
    assert "/bin/exo-nixos gateway --check --config /nix/store/" in check
    assert signal.endswith("/bin/kill -HUP $MAINPID")
    assert service["Type"] == "notify"
    assert "LoadCredential" not in service
    # Loopback by default: nothing opened.
    assert 52417 not in result["firewall"]["allowedTCPPorts"]

    worker = evaluate(exo(mode="worker"))["services"]["exo-api"]
    assert worker["requires"] == ["exo-worker.service"]


def test_gateway_has_no_device_access_and_no_capabilities():
    service = evaluate(exo())["services"]["exo-api"]["serviceConfig"]
    assert service["PrivateDevices"] is True
    assert service["DevicePolicy"] == "closed"
    assert "DeviceAllow" not in service
    assert service["CapabilityBoundingSet"] == ""
    assert service["AmbientCapabilities"] == ""
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["MemoryDenyWriteExecute"] is True
    assert service["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "~@privileged" in service["SystemCallFilter"]
    text = render_unit(evaluate(exo())["services"]["exo-api"])
    assert "PrivateDevices=true" in text
    assert "DevicePolicy=closed" in text
    assert "PartOf=exo.target" in text


def test_exposed_gateway_with_keys_tls_and_firewall():
    result = evaluate(
        exo(
            gateway={
                "listenAddress": "0.0.0.0",
                "port": 8443,
                "apiKeysFile": "/run/secrets/exo-keys",
                "tlsCertificateFile": "/var/lib/acme/exo/fullchain.pem",
                "tlsKeyFile": "/var/lib/acme/exo/key.pem",
                "publicPaths": ["/health", "/metrics"],
                "staticBackends": ["http://10.0.0.12:52415"],
                "openFirewall": True,
            }
        )
    )
    assert result["assertions"] == []
    assert result["warnings"] == []
    assert 8443 in result["firewall"]["allowedTCPPorts"]
    # EXO's raw API port is not opened by the gateway module.
    assert 52415 not in result["firewall"]["allowedTCPPorts"]
    service = result["services"]["exo-api"]["serviceConfig"]
    assert service["LoadCredential"] == [
        "tls-certificate:/var/lib/acme/exo/fullchain.pem",
        "tls-key:/var/lib/acme/exo/key.pem",
    ]
    # The config document carries the options under the names the Python model reads.
    config = parse_config(result["etc"]["exo/config.json"])
    assert config.gateway.port == 8443
    assert config.gateway.api_keys_file == "/run/secrets/exo-keys"
    assert config.gateway.public_paths == ["/health", "/metrics"]
    assert config.gateway.static_backends == ["http://10.0.0.12:52415"]
    assert config.gateway.local_backend is True


def test_connection_timeouts_and_limit_reach_the_config_document():
    defaults = parse_config(evaluate(exo())["etc"]["exo/config.json"]).gateway
    model = parse_config({"schemaVersion": 1}).gateway
    for name in (
        "header_read_timeout_sec",
        "keep_alive_timeout_sec",
        "stream_idle_timeout_sec",
        "max_connections_per_address",
    ):
        # the module's defaults are the model's
        assert getattr(defaults, name) == getattr(model, name), name
    settings = {
        "headerReadTimeoutSec": 2.5,
        "keepAliveTimeoutSec": 7,
        "streamIdleTimeoutSec": 600,
        "maxConnectionsPerAddress": 32,
    }
    gateway = parse_config(evaluate(exo(gateway=settings))["etc"]["exo/config.json"]).gateway
    assert gateway.header_read_timeout_sec == 2.5
    assert gateway.keep_alive_timeout_sec == 7
    assert gateway.stream_idle_timeout_sec == 600
    assert gateway.max_connections_per_address == 32
    for bad in ({"keepAliveTimeoutSec": 0}, {"maxConnectionsPerAddress": 0}):
        with pytest.raises(NixEvalError, match=next(iter(bad))):
            evaluate(exo(gateway=bad))
    # the bounds are the model's alone, judged when config.json is built
    for bad, message in (
        ({"keepAliveTimeoutSec": 3601}, "keepAliveTimeoutSec: 3601: Input should be less"),
        ({"maxConnectionsPerAddress": 65536}, "maxConnectionsPerAddress: 65536: Input should"),
    ):
        with pytest.raises(NixBuildError, match=message):
            evaluate(exo(gateway=bad))


def test_a_key_file_in_the_store_fails_evaluation_with_the_fix():
    result = evaluate(exo(gateway={"apiKeysFile": "/nix/store/abc-keys"}))
    assert any("must not be in the Nix store" in m for m in result["assertions"])


@pytest.mark.parametrize(
    ("gateway", "fragment"),
    [
        ({"listenAddress": "0.0.0.0"}, "set apiKeysFile or listen on 127.0.0.1"),
        ({"listenAddress": "999.1.1.1"}, "listenAddress: '999.1.1.1': must be an IPv4 or IPv6"),
        ({"tlsKeyFile": "/run/secrets/key.pem"}, "must be set together"),
        ({"port": 52415}, "gateway.port and apiPort are both TCP port 52415; give each"),
        ({"localBackend": False}, "set localBackend to true or list staticBackends"),
    ],
)
def test_impossible_settings_fail_the_config_check_with_the_fix(gateway, fragment):
    """The config model judges config.json when it is built; evaluation itself passes."""
    with pytest.raises(NixBuildError, match=r"exo-config\.json") as refused:
        evaluate(exo(gateway=gateway))
    assert "exo-nixos: error: services.exo: " in str(refused.value)
    assert fragment in str(refused.value)


def test_open_firewall_on_loopback_warns():
    result = evaluate(exo(gateway={"openFirewall": True}))
    assert any("listens on 127.0.0.1 only" in w for w in result["warnings"])


def test_disabled_gateway_adds_no_unit():
    result = evaluate(exo(gateway={"enable": False, "openFirewall": True}))
    assert "exo-api" not in result["services"]
    assert "exo-api.service" not in result["targets"]["exo"]["wants"]
    assert 52417 not in result["firewall"]["allowedTCPPorts"]


def test_bad_types_are_refused():
    with pytest.raises(NixEvalError, match="staticBackends"):
        evaluate(exo(gateway={"staticBackends": ["10.0.0.1:52415"]}))
    with pytest.raises(NixEvalError, match="publicPaths"):
        evaluate(exo(gateway={"publicPaths": ["health"]}))
    # a proxied route without a key would open EXO's API to everyone
    with pytest.raises(NixEvalError, match="publicPaths"):
        evaluate(exo(gateway={"publicPaths": ["/v1/chat/completions"]}))
    with pytest.raises(NixBuildError, match="maxBodyBytes: 2199023255552: Input should be less"):
        evaluate(exo(gateway={"maxBodyBytes": 2 << 40}))


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_rendered_unit_passes_systemd_security_analysis(tmp_path):
    unit = tmp_path / "exo-api.service"
    unit.write_text(render_unit(evaluate(exo())["services"]["exo-api"]))
    result = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=15", str(unit)],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Overall exposure level for exo-api.service: 1." in result.stdout


def test_gateway_joins_exos_network_namespace():
    plain = evaluate(exo())["services"]["exo-api"]["serviceConfig"]
    assert "NetworkNamespacePath" not in plain
    result = evaluate(exo(networking={"networkNamespace": "exo"}))
    assert result["services"]["exo-api"]["serviceConfig"]["NetworkNamespacePath"] == (
        "/run/netns/exo"
    )


def test_key_policies_reach_the_config_document_and_python_judges_them():
    policies = {
        "alice": {"requestsPerMinute": 60, "concurrency": 4, "models": ["m1"]},
        "*": {"tokensPerMinute": 100000},
    }
    settings = {
        "apiKeysFile": "/run/secrets/exo-api-keys",
        "keyPolicies": policies,
        "policyFile": "/run/secrets/exo-api-policy.json",
    }
    document = evaluate(exo(gateway=settings))["etc"]["exo/config.json"]
    gateway = parse_config(document).gateway
    assert gateway.key_policies["alice"].requests_per_minute == 60
    assert gateway.key_policies["*"].tokens_per_minute == 100000
    assert gateway.policy_file == "/run/secrets/exo-api-policy.json"
    # the module takes any JSON there; the config model, run while config.json is built, is
    # the one judge of its rules
    bad = {**settings, "keyPolicies": {"alice": {"requestsPerMinute": 0}}}
    with pytest.raises(NixBuildError, match=r"keyPolicies\.alice\.requestsPerMinute: 0"):
        evaluate(exo(gateway=bad))


def test_workers_reach_the_config_document():
    default = parse_config(evaluate(exo())["etc"]["exo/config.json"]).gateway
    assert default.workers is None  # one per core, decided on the host
    gateway = parse_config(evaluate(exo(gateway={"workers": 4}))["etc"]["exo/config.json"])
    assert gateway.gateway.workers == 4
    with pytest.raises(NixEvalError, match="workers"):
        evaluate(exo(gateway={"workers": 0}))
