"""Read interfaces, bonds, Thunderbolt links and RDMA devices from sysfs and procfs.

Everything is read through :class:`exo_nixos.hosttree.Tree`, below a root directory (``/`` on
a host), so a tree captured from another machine (``tests/fixtures/network/...``) is read
exactly like the live system. Missing or garbled files never raise: the value is reported as
unknown.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

from exo_nixos.hosttree import Tree
from exo_nixos.network import model
from exo_nixos.network.model import Interface, IPv6Address

# include/uapi/linux/if.h
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_MULTICAST = 0x1000
# include/uapi/linux/if_addr.h
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
# include/uapi/linux/if_arp.h
ARPHRD_INFINIBAND = 32
ARPHRD_LOOPBACK = 772

SCOPE_LINK = 0x20
SCOPE_HOST = 0x10

THUNDERBOLT_NET_DRIVER = "thunderbolt-net"
NET = "/sys/class/net"


def _uevent(tree: Tree, absolute: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in (tree.line(absolute) or "").splitlines())
    return {key: value for key, sep, value in pairs if sep}


def read_if_inet6(root: Path | Tree) -> dict[str, list[IPv6Address]]:
    """Parse ``/proc/net/if_inet6``: one line per address, per interface."""
    tree = root if isinstance(root, Tree) else Tree(root)
    found: dict[str, list[IPv6Address]] = {}
    for line in (tree.line("/proc/net/if_inet6") or "").splitlines():
        fields = line.split()
        if len(fields) != 6 or len(fields[0]) != 32:
            continue
        try:
            address = ipaddress.IPv6Address(bytes.fromhex(fields[0]))
            prefix, scope, flags = (int(f, 16) for f in fields[2:5])
        except ValueError:
            continue
        scope_name = {0: "global", SCOPE_LINK: "link", SCOPE_HOST: "host", 0x40: "site"}.get(
            scope, f"scope-{scope:#x}"
        )
        found.setdefault(fields[5], []).append(
            IPv6Address(
                address=str(address),
                prefix_len=prefix,
                scope=scope_name,
                tentative=bool(flags & IFA_F_TENTATIVE),
                dad_failed=bool(flags & IFA_F_DADFAILED),
            )
        )
    return found


def _default_routes(tree: Tree) -> list[str]:
    names: list[str] = []
    for line in (tree.line("/proc/net/route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            names.append(fields[0])
    for line in (tree.line("/proc/net/ipv6_route") or "").splitlines():
        fields = line.split()
        default = len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00"
        if default and fields[9] != "lo" and fields[4] != "0" * 32:
            names.append(fields[9])
    return list(dict.fromkeys(names))


def _kind(tree: Tree, netdir: str, type_: int | None, flags: int, driver: str | None) -> str:
    devtype = _uevent(tree, f"{netdir}/uevent").get("DEVTYPE")
    if type_ == ARPHRD_LOOPBACK or flags & IFF_LOOPBACK:
        return "loopback"
    if tree.is_dir(f"{netdir}/bonding") or devtype == "bond":
        return "bond"
    if tree.is_dir(f"{netdir}/bridge") or devtype == "bridge":
        return "bridge"
    if driver == THUNDERBOLT_NET_DRIVER:
        return "thunderbolt"
    if type_ == ARPHRD_INFINIBAND:
        return "infiniband"
    wireless = tree.exists(f"{netdir}/wireless") or tree.exists(f"{netdir}/phy80211")
    if wireless or devtype == "wlan":
        return "wireless"
    if devtype == "vlan":
        return "vlan"
    if not tree.exists(f"{netdir}/device"):
        return "virtual"
    return "ethernet"


def _driver(tree: Tree, netdir: str) -> str | None:
    driver = tree.link_name(f"{netdir}/device/driver")
    if driver:
        return driver
    return _uevent(tree, f"{netdir}/device/uevent").get("DRIVER")


def _interface(tree: Tree, name: str, ipv6: dict[str, list[IPv6Address]]) -> Interface:
    netdir = f"{NET}/{name}"
    flags = tree.integer(f"{netdir}/flags", base=16) or 0
    type_ = tree.integer(f"{netdir}/type")
    driver = _driver(tree, netdir)
    carrier_value = tree.integer(f"{netdir}/carrier")
    speed = tree.integer(f"{netdir}/speed")
    disable = tree.integer(f"/proc/sys/net/ipv6/conf/{name}/disable_ipv6")
    return Interface(
        name=name,
        kind=_kind(tree, netdir, type_, flags, driver),
        ifindex=tree.integer(f"{netdir}/ifindex"),
        operstate=(tree.line(f"{netdir}/operstate") or "unknown").lower(),
        admin_up=bool(flags & IFF_UP),
        carrier=None if carrier_value is None else carrier_value == 1,
        mtu=tree.integer(f"{netdir}/mtu"),
        speed_mbps=speed if speed is not None and speed > 0 else None,
        mac=tree.line(f"{netdir}/address") or None,
        driver=driver,
        multicast=bool(flags & IFF_MULTICAST),
        ipv6_disabled=disable == 1,
        ipv6=tuple(ipv6.get(name, [])),
        master=tree.link_name(f"{netdir}/master"),
    )


def _proc_bonding(text: str) -> tuple[dict[str, dict[str, str]], dict[str, str]]:
    """Split /proc/net/bonding/<bond> into the bond's keys and per-slave keys."""
    bond: dict[str, str] = {}
    slaves: dict[str, dict[str, str]] = {}
    current: dict[str, str] = bond
    for raw in text.splitlines():
        key, sep, value = raw.strip().partition(":")
        if not sep:
            continue
        key, value = key.strip(), value.strip()
        if key == "Slave Interface":
            current = slaves.setdefault(value, {})
            continue
        current.setdefault(key, value)
    return slaves, bond


def _bond(tree: Tree, name: str, interfaces: dict[str, Interface]) -> model.Bond:
    bonding = f"{NET}/{name}/bonding"
    proc_slaves, proc_bond = _proc_bonding(tree.line(f"/proc/net/bonding/{name}") or "")
    mode_text = tree.line(f"{bonding}/mode") or proc_bond.get("Bonding Mode", "")
    mode = _mode_name(mode_text)
    names = (tree.line(f"{bonding}/slaves") or "").split() or list(proc_slaves)
    slaves: list[model.BondSlave] = []
    for slave in names:
        sdir = f"{NET}/{slave}/bonding_slave"
        proc = proc_slaves.get(slave, {})
        iface = interfaces.get(slave)
        speed = iface.speed_mbps if iface else None
        if speed is None:
            speed = _parse_speed(proc.get("Speed"))
        slaves.append(
            model.BondSlave(
                name=slave,
                mii_status=tree.line(f"{sdir}/mii_status") or proc.get("MII Status"),
                state=tree.line(f"{sdir}/state") or proc.get("State") or None,
                speed_mbps=speed,
                mtu=iface.mtu if iface else None,
                link_failure_count=tree.integer(f"{sdir}/link_failure_count")
                or _int(proc.get("Link Failure Count")),
                aggregator_id=tree.integer(f"{sdir}/ad_aggregator_id")
                or _int(proc.get("Aggregator ID")),
            )
        )
    active = tree.line(f"{bonding}/active_slave") or proc_bond.get("Currently Active Slave")
    if active in {"None", ""}:
        active = None
    return model.Bond(
        name=name,
        mode=mode,
        mii_status=tree.line(f"{bonding}/mii_status") or proc_bond.get("MII Status"),
        miimon_ms=tree.integer(f"{bonding}/miimon")
        or _int(proc_bond.get("MII Polling Interval (ms)")),
        slaves=tuple(slaves),
        active_slave=active,
        active_aggregator=tree.integer(f"{bonding}/ad_aggregator")
        or _int(proc_bond.get("Aggregator ID")),
        partner_mac=tree.line(f"{bonding}/ad_partner_mac") or proc_bond.get("Partner Mac Address"),
    )


_PROC_MODES = {
    "load balancing (round-robin)": "balance-rr",
    "fault-tolerance (active-backup)": "active-backup",
    "load balancing (xor)": "balance-xor",
    "fault-tolerance (broadcast)": "broadcast",
    "ieee 802.3ad dynamic link aggregation": "802.3ad",
    "transmit load balancing": "balance-tlb",
    "adaptive load balancing": "balance-alb",
}


def _mode_name(text: str) -> str | None:
    text = text.strip()
    if not text:
        return None
    return _PROC_MODES.get(text.lower(), text.split()[0])


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return None


def _parse_speed(text: str | None) -> int | None:
    if not text or not text.split()[0].isdigit():
        return None
    value = int(text.split()[0])
    return value if value > 0 else None


def _rdma(tree: Tree) -> list[model.RdmaDevice]:
    base = "/sys/class/infiniband"
    uverbs = {}
    for node in tree.listdir("/sys/class/infiniband_verbs"):
        ibdev = tree.line(f"/sys/class/infiniband_verbs/{node}/ibdev")
        if ibdev:
            uverbs[ibdev] = node
    devices: list[model.RdmaDevice] = []
    for name in tree.listdir(base):
        ports: list[model.RdmaPort] = []
        netdevs: list[str] = list(tree.listdir(f"{base}/{name}/device/net"))
        for port in tree.listdir(f"{base}/{name}/ports"):
            if not port.isdigit():
                continue
            pdir = f"{base}/{name}/ports/{port}"
            netdev = tree.line(f"{pdir}/gid_attrs/ndevs/0") or None
            if netdev and netdev not in netdevs:
                netdevs.append(netdev)
            ports.append(
                model.RdmaPort(
                    number=int(port),
                    state=_state_word(tree.line(f"{pdir}/state")),
                    phys_state=_state_word(tree.line(f"{pdir}/phys_state")),
                    link_layer=tree.line(f"{pdir}/link_layer"),
                    rate=tree.line(f"{pdir}/rate"),
                    netdev=netdev,
                )
            )
        node_type = _state_word(tree.line(f"{base}/{name}/node_type"))
        devices.append(
            model.RdmaDevice(
                name=name,
                node_type=node_type,
                ports=tuple(sorted(ports, key=lambda p: p.number)),
                netdevs=tuple(netdevs),
                uverbs=uverbs.get(name),
            )
        )
    return devices


def _state_word(text: str | None) -> str | None:
    """'4: ACTIVE' -> 'ACTIVE'; '1: CA' -> 'CA'."""
    if not text:
        return None
    return text.partition(":")[2].strip() or text.strip()


def _thunderbolt(tree: Tree, interfaces: list[Interface]) -> model.Thunderbolt:
    bus = "/sys/bus/thunderbolt"
    devices = []
    for dev in tree.listdir(f"{bus}/devices"):
        dname = tree.line(f"{bus}/devices/{dev}/device_name")
        if dname:
            vendor = tree.line(f"{bus}/devices/{dev}/vendor_name")
            devices.append(f"{dev}: {vendor + ' ' if vendor else ''}{dname}")
    return model.Thunderbolt(
        bus_present=tree.is_dir(bus),
        net_driver_loaded=tree.is_dir(f"{bus}/drivers/{THUNDERBOLT_NET_DRIVER}"),
        devices=tuple(devices),
        interfaces=tuple(i.name for i in interfaces if i.kind == "thunderbolt"),
    )


def inspect(root: Path = Path("/")) -> model.NetInventory:
    """Everything EXO's networking depends on, read below ``root``."""
    tree = Tree(root)
    ipv6 = read_if_inet6(tree)
    names = [n for n in tree.listdir(NET) if tree.is_dir(f"{NET}/{n}")]
    interfaces = [_interface(tree, n, ipv6) for n in names]
    by_name = {i.name: i for i in interfaces}
    bond_names = [i.name for i in interfaces if i.kind == "bond"]
    masters = (tree.line(f"{NET}/bonding_masters") or "").split()
    bond_names += [b for b in masters if b not in bond_names and b in by_name]
    notes: list[str] = []
    if not names:
        notes.append(f"no network interfaces under {tree.path(NET)}")
    if not tree.exists("/proc/net/if_inet6"):
        notes.append("IPv6 is not available (no /proc/net/if_inet6): EXO's discovery needs it")
    return model.NetInventory(
        root=str(root),
        interfaces=tuple(interfaces),
        bonds=tuple(_bond(tree, b, by_name) for b in bond_names),
        thunderbolt=_thunderbolt(tree, interfaces),
        rdma=tuple(_rdma(tree)),
        default_route_interfaces=tuple(_default_routes(tree)),
        notes=tuple(notes),
    )
