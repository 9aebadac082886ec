"""services.exo.networking evaluated with nixpkgs' lib: firewall, interface restriction, IPv6,
Thunderbolt/RDMA, socket buffers, network namespace, and the config contract."""

from __future__ import annotations

from typing import Any

import pytest

from exo_nixos.config import parse_config
from tests.nixeval import evaluate, exposure, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

EXO_PORTS_TCP = [52414, 52415]
RING = [{"from": 49153, "to": 65535}]


def exo(networking: dict[str, Any] | None = None, **service: Any) -> dict[str, Any]:
    options: dict[str, Any] = {"enable": True, **service}
    if networking is not None:
        options["networking"] = networking
    return evaluate({"services": {"exo": options}})


def node(result: dict[str, Any]) -> dict[str, Any]:
    unit: dict[str, Any] = result["services"][result["exo"]["nodeUnit"]]
    return unit


def test_nothing_opened_unless_asked() -> None:
    fw = exo({"bondInterface": "bond0"})["firewall"]
    assert fw["allowedTCPPorts"] == fw["allowedUDPPorts"] == fw["allowedTCPPortRanges"] == []
    assert fw["interfaces"] == {}


def test_firewall_global_without_a_cluster_interface() -> None:
    fw = exo({"openFirewall": True})["firewall"]
    assert fw["allowedUDPPorts"] == [52413]
    assert fw["allowedTCPPorts"] == EXO_PORTS_TCP
    assert fw["allowedTCPPortRanges"] == RING
    assert fw["interfaces"] == {}


def test_firewall_only_on_cluster_interfaces() -> None:
    result = exo(
        {
            "openFirewall": True,
            "bondInterface": "bond0",
            "extraInterfaces": ["thunderbolt0"],
            "backupInterface": "eno1",
            "discoveryPort": 6001,
            "zenohPort": 6002,
            "ringPorts": {"from": 50000, "to": 50100},
        },
        apiPort=6003,
    )
    fw = result["firewall"]
    assert fw["allowedTCPPorts"] == fw["allowedUDPPorts"] == fw["allowedTCPPortRanges"] == []
    assert sorted(fw["interfaces"]) == ["bond0", "eno1", "thunderbolt0"]
    for rules in fw["interfaces"].values():
        assert rules["allowedUDPPorts"] == [6001]
        assert rules["allowedTCPPorts"] == [6002, 6003]
        assert rules["allowedTCPPortRanges"] == [{"from": 50000, "to": 50100}]


def test_coordinator_opens_no_ring_ports() -> None:
    fw = exo({"openFirewall": True, "bondInterface": "bond0"}, mode="master", noWorker=True)[
        "firewall"
    ]
    assert fw["interfaces"]["bond0"]["allowedTCPPortRanges"] == []
    assert fw["interfaces"]["bond0"]["allowedTCPPorts"] == EXO_PORTS_TCP


def test_units_restricted_to_cluster_interfaces_and_loopback() -> None:
    result = exo(
        {"bondInterface": "br-lan", "extraInterfaces": ["tb0"], "backupInterface": "eth2"},
        mode="master",
    )
    unit = node(result)
    assert result["exo"]["nodeUnit"] == "exo-master"
    assert unit["serviceConfig"]["RestrictNetworkInterfaces"] == ["lo", "br-lan", "tb0", "eth2"]
    device = "sys-subsystem-net-devices-br\\x2dlan.device"
    assert device in unit["after"] and device in unit["wants"]
    text = render_unit(unit)
    assert "RestrictNetworkInterfaces=lo\nRestrictNetworkInterfaces=br-lan\n" in text
    assert f"After=network-online.target {device}" in text


@pytest.mark.parametrize(
    ("interface", "device"),
    [
        ("bond+0", "sys-subsystem-net-devices-bond\\x2b0.device"),
        ("br@lan", "sys-subsystem-net-devices-br\\x40lan.device"),
        ("eth0.100", "sys-subsystem-net-devices-eth0.100.device"),
    ],
)
def test_device_units_are_named_as_systemd_escapes_them(interface, device) -> None:
    # `systemd-escape --path --suffix=device /sys/subsystem/net/devices/<interface>`
    unit = node(exo({"bondInterface": interface}))
    assert device in unit["after"] and device in unit["wants"]


def test_no_restriction_without_a_cluster_interface_or_when_disabled() -> None:
    assert "RestrictNetworkInterfaces" not in node(exo())["serviceConfig"]
    unit = node(exo({"bondInterface": "bond0", "restrictInterfaces": False}))
    assert "RestrictNetworkInterfaces" not in unit["serviceConfig"]
    assert "sys-subsystem-net-devices-bond0.device" in unit["after"]


def test_ipv6_required() -> None:
    result = evaluate({"services": {"exo": {"enable": True}}, "networking": {"enableIPv6": False}})
    assert any("networking.enableIPv6 = true" in m for m in result["assertions"])
    result = exo({"bondInterface": "eth0.100"})
    assert result["sysctl"]["net/ipv6/conf/eth0.100/disable_ipv6"] == 0


def test_networkd_link_local_off_on_the_bond_is_refused() -> None:
    def with_network(link_local: Any, name: Any = "bond0") -> list[str]:
        assertions: list[str] = evaluate(
            {
                "services": {"exo": {"enable": True, "networking": {"bondInterface": "bond0"}}},
                "systemd": {
                    "network": {
                        "enable": True,
                        "networks": {
                            "40-bond0": {
                                "matchConfig": {"Name": name},
                                "networkConfig": {"LinkLocalAddressing": link_local},
                            }
                        },
                    }
                },
            }
        )["assertions"]
        return assertions

    refused = with_network("no")
    assert any("systemd.network.networks.40-bond0" in m and '"ipv6"' in m for m in refused)
    assert any("40-bond0" in m for m in with_network("ipv4", "eth9 bond0"))
    assert with_network("ipv6") == []
    assert with_network("no", "eth9") == []
    # every spelling systemd accepts for "off", and IPv4-only addressing
    for off in ["false", "0", "off", "OFF", False, "fallback", "ipv4-fallback"]:
        assert any("40-bond0" in m for m in with_network(off)), off
    for on in ["yes", "true", "1", True, "ipv6"]:
        assert with_network(on) == [], on
    # [Match] Name= globs and an inverted list
    assert any("40-bond0" in m for m in with_network("no", "bond*"))
    assert any("40-bond0" in m for m in with_network("no", "eth? bon[dx]0"))
    assert any("40-bond0" in m for m in with_network("no", "!eth*"))
    assert with_network("no", "!bond*") == []
    assert with_network("no", "bond1*") == []
    assert with_network("no", ["eth0", "bond0.1"]) == []


def test_thunderbolt_and_rdma_userspace() -> None:
    result = exo({"rdmaEnabled": True})
    assert {"thunderbolt", "thunderbolt_net", "ib_uverbs", "rdma_ucm"} <= set(
        result["kernelModules"]
    )
    assert "rdma-core" in result["systemPackages"]
    assert "DeviceAllow" not in node(result)["serviceConfig"], "EXO uses no verbs on Linux"
    off = exo({"rdmaEnabled": False, "rdmaDeviceAccess": True})
    assert not {"thunderbolt_net", "ib_uverbs"} & set(off["kernelModules"])
    assert "rdma-core" not in off["systemPackages"]
    assert "DeviceAllow" not in node(off)["serviceConfig"]


def test_rdma_device_access_on_request() -> None:
    service = node(exo({"rdmaDeviceAccess": True}))["serviceConfig"]
    assert service["DeviceAllow"] == ["char-infiniband_verbs rw", "/dev/infiniband/rdma_cm rw"]
    assert service["PrivateDevices"] is False
    assert service["LimitMEMLOCK"] == "infinity"
    pinned = evaluate(
        {
            "services": {"exo": {"enable": True, "networking": {"rdmaDeviceAccess": True}}},
            "systemd": {"services": {"exo-worker": {"serviceConfig": {"PrivateDevices": True}}}},
        }
    )
    assert node(pinned)["serviceConfig"]["PrivateDevices"] is True, "the host's setting wins"


def test_socket_buffers() -> None:
    sysctl = exo()["sysctl"]
    assert sysctl["net.core.rmem_max"] == sysctl["net.core.wmem_max"] == 67108864
    assert sysctl["net.ipv4.tcp_rmem"] == "4096 131072 67108864"
    assert "net.core.rmem_max" not in exo({"socketBufferSize": None})["sysctl"]
    user = evaluate(
        {
            "services": {"exo": {"enable": True}},
            "boot": {"kernel": {"sysctl": {"net.core.rmem_max": 1 << 20}}},
        }
    )
    assert user["sysctl"]["net.core.rmem_max"] == 1 << 20, "the host's own value wins"


def test_network_namespace() -> None:
    result = exo({"networkNamespace": "exo", "openFirewall": True})
    unit = node(result)
    assert unit["serviceConfig"]["NetworkNamespacePath"] == "/run/netns/exo"
    assert "exo-netns.service" in unit["requires"] and "exo-netns.service" in unit["after"]
    netns = result["services"]["exo-netns"]
    add, lo_up = netns["serviceConfig"]["ExecStart"]
    # tolerates a namespace that exists, and brings its loopback up in every case
    assert add.startswith("-") and add.endswith("/bin/ip netns add exo")
    assert lo_up.endswith("/bin/ip -n exo link set lo up")
    assert "ConditionPathExists" not in netns.get("unitConfig", {})
    # a switch that changes the unit neither restarts it nor deletes the namespace
    assert netns["restartIfChanged"] is False
    assert "ExecStop" not in netns["serviceConfig"]
    assert any('the network namespace "exo"' in w for w in result["warnings"])
    assert "exo-netns" not in exo()["services"]
    inside = node(exo({"networkNamespace": "exo", "bondInterface": "macvlan0"}))
    assert inside["serviceConfig"]["RestrictNetworkInterfaces"] == ["lo", "macvlan0"]
    assert not any(u.startswith("sys-subsystem-net-devices") for u in inside["after"])


def test_backup_that_is_a_cluster_interface_warns() -> None:
    result = exo({"bondInterface": "bond0", "backupInterface": "bond0"})
    assert any("failover to it changes nothing" in w for w in result["warnings"])


def test_config_document_carries_the_networking_options() -> None:
    result = exo(
        {
            "bondInterface": "bond0",
            "extraInterfaces": ["thunderbolt0"],
            "backupInterface": "eno1",
            "rdmaEnabled": False,
            "networkNamespace": "exo",
            "openFirewall": True,
        }
    )
    config = parse_config(result["etc"]["exo/config.json"])
    net = config.networking
    assert net.cluster_interfaces == ["bond0", "thunderbolt0"]
    assert (net.backup_interface, net.rdma_enabled, net.network_namespace) == ("eno1", False, "exo")


def test_bad_interface_names_are_type_errors() -> None:
    from tests.nixeval import NixEvalError

    with pytest.raises(NixEvalError, match="bondInterface"):
        exo({"bondInterface": "a/b"})
    with pytest.raises(NixEvalError, match="networkNamespace"):
        exo({"networkNamespace": "../etc"})


def test_network_namespace_unit_exposure(tmp_path) -> None:
    unit = exo({"networkNamespace": "exo"})["services"]["exo-netns"]
    assert exposure(unit, "exo-netns.service", tmp_path) <= 4.0


def _uplink(**networking):
    return {
        "services": {
            "exo": {"enable": True, "networking": {"bondInterface": "bond0", **networking}}
        },
        "networking": {"defaultGateway": {"address": "192.0.2.1", "interface": "eno1"}},
    }


def test_default_gateway_outside_the_allowed_interfaces_warns_with_the_option():
    result = evaluate(_uplink())
    (warning,) = [w for w in result["warnings"] if "model downloads" in w]
    assert "default route is on eno1" in warning and "allows only lo, bond0" in warning
    assert 'services.exo.networking.downloadInterfaces = [ "eno1" ]' in warning
    assert "services.exo.offline = true" in warning


def test_download_interfaces_widen_only_the_interface_restriction():
    result = evaluate(_uplink(downloadInterfaces=["eno1"], openFirewall=True))
    assert not any("model downloads" in w for w in result["warnings"])
    unit = result["services"]["exo-worker"]
    assert unit["serviceConfig"]["RestrictNetworkInterfaces"] == ["lo", "bond0", "eno1"]
    assert set(result["firewall"]["interfaces"]) == {"bond0"}  # no port opened on the uplink
    document = parse_config(result["etc"]["exo/config.json"])
    assert document.networking.download_interfaces == ["eno1"]
    assert document.networking.allowed_interfaces == ["lo", "bond0", "eno1"]


@pytest.mark.parametrize(
    "module",
    [
        {"services": {"exo": {"offline": True}}},
        {"services": {"exo": {"networking": {"restrictInterfaces": False}}}},
        {"networking": {"defaultGateway": {"address": "192.0.2.1", "interface": "bond0"}}},
        {"networking": {"defaultGateway": "192.0.2.1"}},  # no interface: the module cannot know
    ],
)
def test_no_download_warning_where_downloads_work_or_cannot_be_known(module):
    def merged(base: Any, extra: Any) -> Any:
        if not (isinstance(base, dict) and isinstance(extra, dict)):
            return extra
        return {k: merged(base[k], v) if k in base else v for k, v in extra.items()} | {
            k: v for k, v in base.items() if k not in extra
        }

    config = merged(_uplink(), module)
    assert config["services"]["exo"]["networking"]["bondInterface"] == "bond0"
    assert not any("model downloads" in w for w in evaluate(config)["warnings"])


def test_rdma_enabled_reaches_the_document_only_when_set():
    document = evaluate({"services": {"exo": {"enable": True}}})["etc"]["exo/config.json"]
    assert "rdmaEnabled" not in document["networking"]
    assert parse_config(document).networking.rdma_enabled is True  # same default as Nix
    for value in (True, False):
        module = {"services": {"exo": {"enable": True, "networking": {"rdmaEnabled": value}}}}
        assert evaluate(module)["etc"]["exo/config.json"]["networking"]["rdmaEnabled"] is value
