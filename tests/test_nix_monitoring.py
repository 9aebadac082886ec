"""services.exo.exporter and services.exo.resources: units, options, hardening."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import parse_config
from tests.nixeval import NixBuildError, NixEvalError, evaluate, exposure, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]


def exo(**settings: Any) -> dict[str, Any]:
    return {"services": {"exo": {"enable": True, **settings}}}


def test_exporter_is_off_by_default():
    result = evaluate(exo())
    assert "exo-exporter" not in result["services"]
    assert "exporter" not in result["exo"]["configDocument"]


def test_exporter_unit_config_and_firewall():
    result = evaluate(exo(mode="master", exporter={"enable": True}))
    assert result["assertions"] == []
    unit = result["services"]["exo-exporter"]
    service = unit["serviceConfig"]
    assert "/bin/exo-nixos exporter --config /nix/store/" in service["ExecStart"]
    assert service["Type"] == "notify"
    assert (service["User"], service["Group"]) == ("exo", "exo")
    assert "exo-master.service" in unit["after"]
    assert "requires" not in unit or unit["requires"] == []  # reports the node down, too
    assert "exo-exporter.service" in result["targets"]["exo"]["wants"]
    assert 52418 not in result["firewall"]["allowedTCPPorts"]
    document = result["exo"]["configDocument"]
    assert document["exporter"] == {"enable": True, "listenAddress": "127.0.0.1", "port": 52418}
    assert parse_config(document).exporter.port == 52418
    opened = evaluate(exo(exporter={"enable": True, "openFirewall": True, "port": 9400}))
    assert 9400 in opened["firewall"]["allowedTCPPorts"]
    assert any("listens on 127.0.0.1 only" in w for w in opened["warnings"])
    # judged by the config model while config.json is built
    with pytest.raises(NixBuildError, match=r"exporter\.listenAddress: '999\.1\.1\.1'"):
        evaluate(exo(exporter={"enable": True, "listenAddress": "999.1.1.1"}))


def test_exporter_unit_is_as_tight_as_the_gateway(tmp_path: Path):
    services = evaluate(exo(exporter={"enable": True}))["services"]
    mine = exposure(services["exo-exporter"], "exo-exporter.service", tmp_path)
    gateway = exposure(services["exo-api"], "exo-api.service", tmp_path)
    assert mine <= gateway
    assert mine < 2.0


def node(result: dict[str, Any], name: str = "exo-worker") -> dict[str, Any]:
    service: dict[str, Any] = result["services"][name]["serviceConfig"]
    return service


def test_resources_and_oom_recording_on_the_node_unit():
    plain = node(evaluate(exo()))
    for key in ("CPUWeight", "IOWeight", "Nice", "MemoryHigh"):
        assert key not in plain
    assert plain["OOMPolicy"] == "stop"
    assert "/bin/exo-nixos record-stop --config /nix/store/" in plain["ExecStopPost"]
    tuned = node(evaluate(exo(resources={"cpuWeight": 200, "ioWeight": 50, "nice": 5})))
    assert (tuned["CPUWeight"], tuned["IOWeight"], tuned["Nice"]) == (200, 50, 5)
    with pytest.raises(NixEvalError, match="nice"):
        evaluate(exo(resources={"nice": 20}))


@pytest.mark.parametrize(
    ("limit", "share", "high"),
    [
        ("80%", 90, "72%"),
        ("64GiB", 90, str(int(64 * (1 << 30) * 0.9))),
        ("1.5T", 75, str(int(1.5 * (1 << 40) * 0.75))),
        ("512m", 90, str(int(512 * (1 << 20) * 0.9))),
    ],
)
def test_memory_high_sits_below_memory_max(limit: str, share: int, high: str):
    result = evaluate(exo(hardware={"memoryLimit": limit}, resources={"memoryHighPercent": share}))
    service = node(result)
    assert service["MemoryHigh"] == high
    assert "MemoryMax" in service


def test_memory_high_off_at_100_percent():
    service = node(
        evaluate(exo(hardware={"memoryLimit": "80%"}, resources={"memoryHighPercent": 100}))
    )
    assert "MemoryHigh" not in service
    assert service["MemoryMax"] == "80%"
