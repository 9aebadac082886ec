"""The network inventory and the cluster interface choice, from sysfs/procfs trees."""

from __future__ import annotations

import shutil
from pathlib import Path

from exo_nixos.config import Config, default_config, parse_config
from exo_nixos.network import choose_cluster_interface, inspect
from exo_nixos.network.sysfs import read_if_inet6

FIXTURES = Path(__file__).parent / "fixtures" / "network"


def config(**networking: object) -> Config:
    return parse_config({"schemaVersion": 1, "networking": networking})


def test_active_backup_bond_healthy() -> None:
    inv = inspect(FIXTURES / "bond-active-backup")
    bond = inv.bond("bond0")
    assert bond is not None
    assert bond.mode == "active-backup"
    assert bond.active_slave == "enp1s0f0"
    assert [s.name for s in bond.slaves] == ["enp1s0f0", "enp1s0f1"]
    assert [s.state for s in bond.slaves] == ["active", "backup"]
    assert all(s.up and s.speed_mbps == 10000 for s in bond.slaves)
    assert not bond.degraded
    iface = inv.interface("bond0")
    assert iface is not None
    assert iface.kind == "bond"
    assert iface.link_up and iface.multicast
    assert iface.link_local == ["fe80::3efd:feff:fea1:b201"]
    assert inv.interface("enp1s0f0") is not None
    assert inv.interface("enp1s0f0").master == "bond0"  # type: ignore[union-attr]
    assert inv.interface("docker0").kind == "bridge"  # type: ignore[union-attr]
    assert inv.default_route_interfaces == ("bond0",)


def test_active_backup_bond_degraded() -> None:
    inv = inspect(FIXTURES / "bond-active-backup-degraded")
    bond = inv.bond("bond0")
    assert bond is not None and bond.degraded
    assert bond.slaves_up == ["enp1s0f0"]
    down = bond.slaves[1]
    assert (down.mii_status, down.link_failure_count, down.speed_mbps) == ("down", 3, None)
    assert bond.problems == ["bond bond0 is degraded: slave(s) enp1s0f1 down (1 of 2 up)"]
    choice = choose_cluster_interface(config(bondInterface="bond0", rdmaEnabled=False), inv)
    assert choice.name == "bond0" and choice.configured
    assert choice.ok, "a degraded bond still carries traffic"
    assert any("degraded" in w for w in choice.warnings)


def test_8023ad_bond_reads_lacp_state() -> None:
    inv = inspect(FIXTURES / "bond-8023ad")
    bond = inv.bond("bond0")
    assert bond is not None
    assert bond.mode == "802.3ad"
    assert bond.active_aggregator == 1
    assert bond.partner_mac == "00:1c:73:ab:cd:ef"
    assert [s.aggregator_id for s in bond.slaves] == [1, 1]
    assert not bond.degraded
    assert inv.interface("bond0").speed_mbps == 50000  # type: ignore[union-attr]


def test_8023ad_without_partner_and_split_aggregators(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "bond-8023ad", root, symlinks=True)
    bonding = root / "sys/class/net/bond0/bonding"
    (bonding / "ad_partner_mac").write_text("00:00:00:00:00:00\n")
    (root / "sys/class/net/ens1f1np1/bonding_slave/ad_aggregator_id").write_text("2\n")
    bond = inspect(root).bond("bond0")
    assert bond is not None and bond.degraded
    assert any("no LACP partner" in p for p in bond.problems)
    assert any("ens1f1np1 are not in the active aggregator" in p for p in bond.problems)


def test_bond_read_from_proc_when_sysfs_bonding_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "bond-8023ad", root, symlinks=True)
    shutil.rmtree(root / "sys/class/net/bond0/bonding")
    for slave in ("ens1f0np0", "ens1f1np1"):
        shutil.rmtree(root / "sys/class/net" / slave / "bonding_slave")
    bond = inspect(root).bond("bond0")
    assert bond is not None
    assert bond.mode == "802.3ad"
    assert [s.name for s in bond.slaves] == ["ens1f0np0", "ens1f1np1"]
    assert [s.aggregator_id for s in bond.slaves] == [1, 1]
    assert bond.partner_mac == "00:1c:73:ab:cd:ef"
    assert not bond.degraded


def test_balance_alb_mtu_mismatch_is_a_warning() -> None:
    inv = inspect(FIXTURES / "bond-balance-alb")
    bond = inv.bond("bond1")
    assert bond is not None and bond.mode == "balance-alb"
    assert bond.problems == ["bond bond1: slaves have different MTUs (eno1=9000, eno2=1500)"]
    choice = choose_cluster_interface(None, inv)
    assert choice.name == "bond1", "a bond beats the wireless link that has the default route"
    assert choice.ok
    assert any("different MTUs" in w for w in choice.warnings)
    assert inv.interface("wlp2s0").kind == "wireless"  # type: ignore[union-attr]


def test_thunderbolt_links() -> None:
    inv = inspect(FIXTURES / "thunderbolt")
    tb = inv.thunderbolt
    assert tb.bus_present and tb.net_driver_loaded
    assert tb.interfaces == ("thunderbolt0", "thunderbolt1")
    assert "0-1: Apple Inc. Mac Studio" in tb.devices
    tb0 = inv.interface("thunderbolt0")
    assert tb0 is not None and tb0.driver == "thunderbolt-net" and tb0.mtu == 65520
    tb1 = inv.interface("thunderbolt1")
    assert tb1 is not None and not tb1.link_up
    assert tb1.link_local == [], "a tentative address is not usable yet"
    choice = choose_cluster_interface(
        config(bondInterface="enp3s0", extraInterfaces=["thunderbolt0", "thunderbolt1"]), inv
    )
    assert choice.ok
    assert any("thunderbolt1 is down" in w for w in choice.warnings)
    assert any("still tentative" in w for w in choice.warnings)
    assert not any("no RDMA device" in w for w in choice.warnings)
    assert any("Thunderbolt network links" in n for n in choice.notes)


def test_thunderbolt_bus_without_the_net_driver(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "thunderbolt", root, symlinks=True)
    shutil.rmtree(root / "sys/bus/thunderbolt/drivers/thunderbolt-net")
    choice = choose_cluster_interface(default_config(), inspect(root))
    assert any("thunderbolt-net driver is not loaded" in w for w in choice.warnings)


def test_rdma_devices_and_ports() -> None:
    inv = inspect(FIXTURES / "rdma")
    assert [d.name for d in inv.rdma] == ["mlx5_0", "mlx5_1"]
    mlx0, mlx1 = inv.rdma
    assert mlx0.active and mlx0.uverbs == "uverbs0" and mlx0.netdevs == ("enp65s0f0np0",)
    port = mlx0.ports[0]
    assert (port.state, port.phys_state, port.link_layer) == ("ACTIVE", "LinkUp", "Ethernet")
    assert not mlx1.active and mlx1.uverbs is None
    choice = choose_cluster_interface(default_config(), inv)
    assert choice.name == "enp65s0f0np0", "the 100G link beats the 1G default-route link"
    assert any("mlx5_1 has no active port" in w for w in choice.warnings)
    assert any("TCP" in n and "macOS-only" in n for n in choice.notes)


def test_rdma_requested_but_absent_says_tcp() -> None:
    inv = inspect(FIXTURES / "bond-active-backup")
    warned = choose_cluster_interface(config(rdmaEnabled=True), inv).warnings
    assert any("no RDMA device" in w and "falls back to TCP" in w for w in warned)
    quiet = choose_cluster_interface(config(rdmaEnabled=False), inv).warnings
    assert not any("RDMA" in w for w in quiet)


def test_rdma_by_default_is_a_note_not_a_warning() -> None:
    """The user never set rdmaEnabled (no config, or the module's default): nothing to warn."""
    choice = choose_cluster_interface(default_config(), inspect(FIXTURES / "bond-active-backup"))
    assert not any("RDMA" in w for w in choice.warnings)
    assert any("rdmaEnabled is on (the default)" in n for n in choice.notes)


def test_discovery_prerequisites_missing() -> None:
    inv = inspect(FIXTURES / "no-ipv6")
    eth0, eth1, eth2 = (inv.interface(n) for n in ("eth0", "eth1", "eth2"))
    assert eth0 is not None and eth0.ipv6_disabled and not eth0.ipv6_ready
    assert eth1 is not None and not eth1.multicast and eth1.link_local
    assert eth2 is not None and eth2.ipv6[0].dad_failed and not eth2.link_local
    for name, expected in (
        ("eth0", "IPv6 is disabled on cluster interface eth0"),
        ("eth2", "duplicate address detection failed"),
    ):
        choice = choose_cluster_interface(config(bondInterface=name, discoveryPort=6000), inv)
        assert not choice.ok
        assert any(expected in p for p in choice.problems), choice.problems
        assert all("UDP 6000" in p for p in choice.problems)
    flag_off = choose_cluster_interface(config(bondInterface="eth1"), inv)
    assert flag_off.ok, "the kernel still delivers IPv6 multicast with the flag off"
    assert any("MULTICAST flag off" in w for w in flag_off.warnings)


def test_configured_interface_missing() -> None:
    inv = inspect(FIXTURES / "bond-active-backup")
    choice = choose_cluster_interface(config(bondInterface="bond7"), inv)
    assert choice.name == "bond7" and not choice.ok
    assert "does not exist" in choice.problems[0] and "bond0" in choice.problems[0]


def test_backup_and_extra_interfaces_checked() -> None:
    inv = inspect(FIXTURES / "bond-active-backup-degraded")
    choice = choose_cluster_interface(
        config(bondInterface="bond0", backupInterface="eno9", extraInterfaces=["eno1", "tb9"]),
        inv,
    )
    assert any("backup interface eno9" in w for w in choice.warnings)
    assert any("extra cluster interface tb9" in w for w in choice.warnings)
    ok = choose_cluster_interface(config(bondInterface="bond0", backupInterface="eno1"), inv)
    assert any(n.startswith("backup interface eno1: ethernet, link up") for n in ok.notes)


def test_a_bond_slave_is_never_the_cluster_interface() -> None:
    inv = inspect(FIXTURES / "bond-active-backup")
    choice = choose_cluster_interface(config(bondInterface="enp1s0f0"), inv)
    assert any("enslaved to bond0" in p for p in choice.problems)
    assert "enp1s0f0" not in choose_cluster_interface(None, inv).candidates


def test_down_interface_is_a_problem(tmp_path: Path) -> None:
    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "bond-active-backup", root, symlinks=True)
    (root / "sys/class/net/bond0/carrier").write_text("0\n")
    (root / "sys/class/net/bond0/operstate").write_text("down\n")
    choice = choose_cluster_interface(config(bondInterface="bond0"), inspect(root))
    assert any("bond0 is down" in p and "carrier off" in p for p in choice.problems)


def test_nothing_to_choose(tmp_path: Path) -> None:
    (tmp_path / "sys/class/net/lo").mkdir(parents=True)
    (tmp_path / "sys/class/net/lo/type").write_text("772\n")
    choice = choose_cluster_interface(None, inspect(tmp_path))
    assert choice.name is None and not choice.ok
    assert any("IPv6 is not available" in n for n in choice.notes)


def test_empty_and_garbled_trees_do_not_raise(tmp_path: Path) -> None:
    assert inspect(tmp_path).interfaces == ()
    net = tmp_path / "sys/class/net/eth0"
    net.mkdir(parents=True)
    for name, text in {
        "flags": "zz",
        "mtu": "",
        "speed": "-1",
        "carrier": "\x00",
        "operstate": "",
        "ifindex": "x",
    }.items():
        (net / name).write_text(text)
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/if_inet6").write_text(
        "garbage\nfe80 01 40 20 80 eth0\n" + "z" * 32 + " 1 2 3 4 eth0\n"
    )
    (tmp_path / "proc/net/bonding").mkdir()
    (tmp_path / "sys/class/net/bonding_masters").write_text("eth0\n")
    inv = inspect(tmp_path)
    eth0 = inv.interface("eth0")
    assert eth0 is not None
    assert (eth0.mtu, eth0.speed_mbps, eth0.ifindex, eth0.ipv6) == (None, None, None, ())
    assert not eth0.link_up
    choose_cluster_interface(default_config(), inv)


def test_if_inet6_flags(tmp_path: Path) -> None:
    (tmp_path / "proc/net").mkdir(parents=True)
    (tmp_path / "proc/net/if_inet6").write_text(
        "fe800000000000000000000000000001 02 40 20 80 eth0\n"
        "fe800000000000000000000000000002 03 40 20 c0 eth1\n"
        "20010db8000000000000000000000001 02 40 00 00 eth0\n"
    )
    found = read_if_inet6(tmp_path)
    assert [(a.address, a.scope, a.usable) for a in found["eth0"]] == [
        ("fe80::1", "link", True),
        ("2001:db8::1", "global", True),
    ]
    assert found["eth1"][0].tentative and not found["eth1"][0].usable
