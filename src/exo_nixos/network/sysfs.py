"""Read interfaces, bonds, Thunderbolt links and RDMA devices from sysfs and procfs.

Everything is read below a root directory (``/`` on a host), so a tree captured from another
machine (``tests/fixtures/network/...``) is read exactly like the live system. Missing or
garbled files never raise: the value is reported as unknown.
"""

from __future__ import annotations

import ipaddress
import os
from contextvars import ContextVar
from dataclasses import dataclass, field
from pathlib import Path

from exo_nixos.fsutil import read_bounded

# include/uapi/linux/if.h
IFF_UP = 0x1
IFF_LOOPBACK = 0x8
IFF_RUNNING = 0x40
IFF_MULTICAST = 0x1000
# include/uapi/linux/if_addr.h
IFA_F_DADFAILED = 0x08
IFA_F_TENTATIVE = 0x40
# include/uapi/linux/if_arp.h
ARPHRD_ETHER = 1
ARPHRD_INFINIBAND = 32
ARPHRD_LOOPBACK = 772

SCOPE_LINK = 0x20
SCOPE_HOST = 0x10

THUNDERBOLT_NET_DRIVER = "thunderbolt-net"


@dataclass(frozen=True)
class IPv6Address:
    address: str
    prefix_len: int
    scope: str  # "link", "global", "host", "site"
    tentative: bool
    dad_failed: bool

    @property
    def usable(self) -> bool:
        return not (self.tentative or self.dad_failed)


@dataclass(frozen=True)
class Interface:
    name: str
    kind: str  # loopback, ethernet, bond, bridge, vlan, thunderbolt, infiniband, wireless, virtual
    ifindex: int | None
    operstate: str  # up, down, lowerlayerdown, unknown, dormant, notpresent, testing
    admin_up: bool
    carrier: bool | None
    mtu: int | None
    speed_mbps: int | None
    mac: str | None
    driver: str | None
    multicast: bool
    ipv6_disabled: bool
    ipv6: tuple[IPv6Address, ...] = ()
    master: str | None = None

    @property
    def link_up(self) -> bool:
        """Administratively up with a carrier: traffic can flow."""
        if not self.admin_up:
            return False
        if self.carrier is not None:
            return self.carrier and self.operstate in {"up", "unknown"}
        return self.operstate == "up"

    @property
    def link_local(self) -> list[str]:
        return [a.address for a in self.ipv6 if a.scope == "link" and a.usable]

    @property
    def ipv6_ready(self) -> bool:
        """What EXO's discovery needs: a usable non-loopback IPv6 address."""
        return not self.ipv6_disabled and any(a.usable and a.scope != "host" for a in self.ipv6)


@dataclass(frozen=True)
class BondSlave:
    name: str
    mii_status: str | None  # "up" / "down"
    state: str | None  # "active" / "backup"
    speed_mbps: int | None
    mtu: int | None
    link_failure_count: int | None
    aggregator_id: int | None = None

    @property
    def up(self) -> bool:
        return self.mii_status == "up"


@dataclass(frozen=True)
class Bond:
    name: str
    mode: str | None  # balance-rr, active-backup, balance-xor, broadcast, 802.3ad, ...
    mii_status: str | None
    miimon_ms: int | None
    slaves: tuple[BondSlave, ...]
    active_slave: str | None
    active_aggregator: int | None = None
    partner_mac: str | None = None

    @property
    def slaves_up(self) -> list[str]:
        return [s.name for s in self.slaves if s.up]

    @property
    def problems(self) -> list[str]:
        """Why this bond runs with less redundancy or bandwidth than configured."""
        found: list[str] = []
        if not self.slaves:
            found.append(f"bond {self.name} has no slaves")
        down = [s.name for s in self.slaves if not s.up]
        if down:
            found.append(
                f"bond {self.name} is degraded: slave(s) {', '.join(down)} down "
                f"({len(self.slaves_up)} of {len(self.slaves)} up)"
            )
        if self.mode == "active-backup" and self.slaves_up and not self.active_slave:
            found.append(f"bond {self.name} (active-backup) has no active slave")
        if self.mode == "802.3ad":
            if self.partner_mac is not None and _zero_mac(self.partner_mac) and self.slaves_up:
                found.append(
                    f"bond {self.name} (802.3ad): no LACP partner; check the switch's "
                    "port-channel/LACP configuration"
                )
            aggregators = {s.aggregator_id for s in self.slaves if s.up and s.aggregator_id}
            if self.active_aggregator is not None and len(aggregators) > 1:
                outside = [
                    s.name
                    for s in self.slaves
                    if s.up and s.aggregator_id not in (None, self.active_aggregator)
                ]
                found.append(
                    f"bond {self.name} (802.3ad): slave(s) {', '.join(outside)} are not in "
                    "the active aggregator and carry no traffic"
                )
        mtus = {s.mtu for s in self.slaves if s.mtu is not None}
        if len(mtus) > 1:
            listing = ", ".join(f"{s.name}={s.mtu}" for s in self.slaves)
            found.append(f"bond {self.name}: slaves have different MTUs ({listing})")
        return found

    @property
    def degraded(self) -> bool:
        return bool(self.problems)


@dataclass(frozen=True)
class RdmaPort:
    number: int
    state: str | None  # ACTIVE, DOWN, INIT, ARMED
    phys_state: str | None  # LinkUp, Disabled, Polling, ...
    link_layer: str | None  # InfiniBand, Ethernet
    rate: str | None
    netdev: str | None

    @property
    def active(self) -> bool:
        return self.state == "ACTIVE"


@dataclass(frozen=True)
class RdmaDevice:
    name: str
    node_type: str | None
    ports: tuple[RdmaPort, ...]
    netdevs: tuple[str, ...]
    uverbs: str | None  # the /dev/infiniband/uverbsN node userspace needs

    @property
    def active(self) -> bool:
        return any(p.active for p in self.ports)


@dataclass(frozen=True)
class Thunderbolt:
    """The host's Thunderbolt bus as far as networking is concerned."""

    bus_present: bool
    net_driver_loaded: bool
    devices: tuple[str, ...]  # connected devices' names ("host" peers show up here)
    interfaces: tuple[str, ...]  # thunderbolt-net network interfaces


@dataclass(frozen=True)
class NetInventory:
    root: str
    interfaces: tuple[Interface, ...]
    bonds: tuple[Bond, ...]
    thunderbolt: Thunderbolt
    rdma: tuple[RdmaDevice, ...]
    default_route_interfaces: tuple[str, ...] = ()
    notes: tuple[str, ...] = field(default=())

    def interface(self, name: str) -> Interface | None:
        return next((i for i in self.interfaces if i.name == name), None)

    def bond(self, name: str) -> Bond | None:
        return next((b for b in self.bonds if b.name == name), None)


def _zero_mac(mac: str) -> bool:
    return all(part in {"0", "00"} for part in mac.split(":"))


# While ``capture`` runs ``inspect``, every path read is noted here with how it was used
# ("file", "link" or "exists"), so the capture holds exactly what ``inspect`` reads.
_RECORD: ContextVar[dict[Path, str] | None] = ContextVar("exo_nixos_net_record", default=None)


def _note(path: Path, kind: str) -> None:
    record = _RECORD.get()
    if record is not None:
        record.setdefault(path, kind)


def _read(path: Path) -> str | None:
    _note(path, "file")
    try:
        return read_bounded(path).decode("utf-8", errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path, base: int = 10) -> int | None:
    text = _read(path)
    if text is None:
        return None
    try:
        return int(text, base)
    except ValueError:
        return None


def _uevent(path: Path) -> dict[str, str]:
    text = _read(path) or ""
    pairs = (line.partition("=") for line in text.splitlines())
    return {key: value for key, sep, value in pairs if sep}


def _link_name(path: Path) -> str | None:
    _note(path, "link")
    try:
        return os.path.basename(os.readlink(path))
    except OSError:
        return None


def _present(path: Path) -> bool:
    """The entry exists, even as a link whose target a captured tree does not hold."""
    _note(path, "exists")
    return os.path.lexists(path)


def _is_dir(path: Path) -> bool:
    _note(path, "exists")
    return path.is_dir()


def _list_dir(path: Path) -> list[str]:
    _note(path, "exists")
    try:
        # sysfs and procfs have no dot entries; a captured tree may (".keep", see capture)
        names = sorted(p.name for p in path.iterdir() if not p.name.startswith("."))
    except OSError:
        return []
    for name in names:
        _note(path / name, "exists")
    return names


def read_if_inet6(root: Path) -> dict[str, list[IPv6Address]]:
    """Parse ``/proc/net/if_inet6``: one line per address, per interface."""
    text = _read(root / "proc/net/if_inet6") or ""
    found: dict[str, list[IPv6Address]] = {}
    for line in text.splitlines():
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


def _default_routes(root: Path) -> list[str]:
    names: list[str] = []
    for line in (_read(root / "proc/net/route") or "").splitlines()[1:]:
        fields = line.split()
        if len(fields) > 7 and fields[1] == "00000000" and fields[7] == "00000000":
            names.append(fields[0])
    for line in (_read(root / "proc/net/ipv6_route") or "").splitlines():
        fields = line.split()
        default = len(fields) == 10 and fields[0] == "0" * 32 and fields[1] == "00"
        if default and fields[9] != "lo" and fields[4] != "0" * 32:
            names.append(fields[9])
    return list(dict.fromkeys(names))


def _kind(netdir: Path, type_: int | None, flags: int, driver: str | None) -> str:
    devtype = _uevent(netdir / "uevent").get("DEVTYPE")
    if type_ == ARPHRD_LOOPBACK or flags & IFF_LOOPBACK:
        return "loopback"
    if _is_dir(netdir / "bonding") or devtype == "bond":
        return "bond"
    if _is_dir(netdir / "bridge") or devtype == "bridge":
        return "bridge"
    if driver == THUNDERBOLT_NET_DRIVER:
        return "thunderbolt"
    if type_ == ARPHRD_INFINIBAND:
        return "infiniband"
    if _present(netdir / "wireless") or _present(netdir / "phy80211") or devtype == "wlan":
        return "wireless"
    if devtype == "vlan":
        return "vlan"
    if not _present(netdir / "device"):
        return "virtual"
    return "ethernet"


def _driver(netdir: Path) -> str | None:
    driver = _link_name(netdir / "device" / "driver")
    if driver:
        return driver
    return _uevent(netdir / "device" / "uevent").get("DRIVER")


def _interface(root: Path, name: str, ipv6: dict[str, list[IPv6Address]]) -> Interface:
    netdir = root / "sys/class/net" / name
    flags = _read_int(netdir / "flags", 16) or 0
    type_ = _read_int(netdir / "type")
    driver = _driver(netdir)
    carrier_value = _read_int(netdir / "carrier")
    speed = _read_int(netdir / "speed")
    disable = _read_int(root / "proc/sys/net/ipv6/conf" / name / "disable_ipv6")
    return Interface(
        name=name,
        kind=_kind(netdir, type_, flags, driver),
        ifindex=_read_int(netdir / "ifindex"),
        operstate=(_read(netdir / "operstate") or "unknown").lower(),
        admin_up=bool(flags & IFF_UP),
        carrier=None if carrier_value is None else carrier_value == 1,
        mtu=_read_int(netdir / "mtu"),
        speed_mbps=speed if speed is not None and speed > 0 else None,
        mac=_read(netdir / "address") or None,
        driver=driver,
        multicast=bool(flags & IFF_MULTICAST),
        ipv6_disabled=disable == 1,
        ipv6=tuple(ipv6.get(name, [])),
        master=_link_name(netdir / "master"),
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


def _bond(root: Path, name: str, interfaces: dict[str, Interface]) -> Bond:
    bonding = root / "sys/class/net" / name / "bonding"
    proc_slaves, proc_bond = _proc_bonding(_read(root / "proc/net/bonding" / name) or "")
    mode_text = _read(bonding / "mode") or proc_bond.get("Bonding Mode", "")
    mode = _mode_name(mode_text)
    names = (_read(bonding / "slaves") or "").split() or list(proc_slaves)
    slaves: list[BondSlave] = []
    for slave in names:
        sdir = root / "sys/class/net" / slave / "bonding_slave"
        proc = proc_slaves.get(slave, {})
        iface = interfaces.get(slave)
        speed = iface.speed_mbps if iface else None
        if speed is None:
            speed = _parse_speed(proc.get("Speed"))
        slaves.append(
            BondSlave(
                name=slave,
                mii_status=_read(sdir / "mii_status") or proc.get("MII Status"),
                state=_read(sdir / "state") or proc.get("State") or None,
                speed_mbps=speed,
                mtu=iface.mtu if iface else None,
                link_failure_count=_read_int(sdir / "link_failure_count")
                or _int(proc.get("Link Failure Count")),
                aggregator_id=_read_int(sdir / "ad_aggregator_id")
                or _int(proc.get("Aggregator ID")),
            )
        )
    active = _read(bonding / "active_slave") or proc_bond.get("Currently Active Slave")
    if active in {"None", ""}:
        active = None
    return Bond(
        name=name,
        mode=mode,
        mii_status=_read(bonding / "mii_status") or proc_bond.get("MII Status"),
        miimon_ms=_read_int(bonding / "miimon") or _int(proc_bond.get("MII Polling Interval (ms)")),
        slaves=tuple(slaves),
        active_slave=active,
        active_aggregator=_read_int(bonding / "ad_aggregator")
        or _int(proc_bond.get("Aggregator ID")),
        partner_mac=_read(bonding / "ad_partner_mac") or proc_bond.get("Partner Mac Address"),
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


def _rdma(root: Path) -> list[RdmaDevice]:
    base = root / "sys/class/infiniband"
    uverbs = {}
    for node in _list_dir(root / "sys/class/infiniband_verbs"):
        ibdev = _read(root / "sys/class/infiniband_verbs" / node / "ibdev")
        if ibdev:
            uverbs[ibdev] = node
    devices: list[RdmaDevice] = []
    for name in _list_dir(base):
        ports: list[RdmaPort] = []
        netdevs: list[str] = list(_list_dir(base / name / "device" / "net"))
        for port in _list_dir(base / name / "ports"):
            if not port.isdigit():
                continue
            pdir = base / name / "ports" / port
            netdev = _read(pdir / "gid_attrs/ndevs/0") or None
            if netdev and netdev not in netdevs:
                netdevs.append(netdev)
            ports.append(
                RdmaPort(
                    number=int(port),
                    state=_state_word(_read(pdir / "state")),
                    phys_state=_state_word(_read(pdir / "phys_state")),
                    link_layer=_read(pdir / "link_layer"),
                    rate=_read(pdir / "rate"),
                    netdev=netdev,
                )
            )
        node_type = _state_word(_read(base / name / "node_type"))
        devices.append(
            RdmaDevice(
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


def _thunderbolt(root: Path, interfaces: list[Interface]) -> Thunderbolt:
    bus = root / "sys/bus/thunderbolt"
    devices = []
    for dev in _list_dir(bus / "devices"):
        dname = _read(bus / "devices" / dev / "device_name")
        if dname:
            vendor = _read(bus / "devices" / dev / "vendor_name")
            devices.append(f"{dev}: {vendor + ' ' if vendor else ''}{dname}")
    return Thunderbolt(
        bus_present=_is_dir(bus),
        net_driver_loaded=_is_dir(bus / "drivers" / THUNDERBOLT_NET_DRIVER),
        devices=tuple(devices),
        interfaces=tuple(i.name for i in interfaces if i.kind == "thunderbolt"),
    )


def inspect(root: Path = Path("/")) -> NetInventory:
    """Everything EXO's networking depends on, read below ``root``."""
    root = Path(root)
    ipv6 = read_if_inet6(root)
    names = _list_dir(root / "sys/class/net")
    names = [n for n in names if _is_dir(root / "sys/class/net" / n)]
    interfaces = [_interface(root, n, ipv6) for n in names]
    by_name = {i.name: i for i in interfaces}
    bond_names = [i.name for i in interfaces if i.kind == "bond"]
    masters = (_read(root / "sys/class/net/bonding_masters") or "").split()
    bond_names += [b for b in masters if b not in bond_names and b in by_name]
    notes: list[str] = []
    if not names:
        notes.append(f"no network interfaces under {root / 'sys/class/net'}")
    if not _present(root / "proc/net/if_inet6"):
        notes.append("IPv6 is not available (no /proc/net/if_inet6): EXO's discovery needs it")
    return NetInventory(
        root=str(root),
        interfaces=tuple(interfaces),
        bonds=tuple(_bond(root, b, by_name) for b in bond_names),
        thunderbolt=_thunderbolt(root, interfaces),
        rdma=tuple(_rdma(root)),
        default_route_interfaces=tuple(_default_routes(root)),
        notes=tuple(notes),
    )


def capture(dest: Path, root: Path = Path("/")) -> tuple[NetInventory, int]:
    """Copy what ``inspect(root)`` reads into ``dest``, so ``inspect(dest)`` sees the same.

    Links keep their targets (which need not resolve in the copy); directories a link leads
    into become real directories; unreadable attributes (``speed`` of a link that is down)
    are left out, as ``inspect`` treats both alike; empty directories get a ``.keep`` file so
    the tree survives a git commit. Returns the inventory and the number of entries written.
    """
    root = Path(root)
    record: dict[Path, str] = {}
    token = _RECORD.set(record)
    try:
        inventory = inspect(root)
    finally:
        _RECORD.reset(token)
    relative = {
        path: path.relative_to(root)
        for path in record
        if path.is_relative_to(root) and os.path.lexists(path)
    }
    containers = {parent for rel in relative.values() for parent in rel.parents}
    written = 0
    for path, rel in sorted(relative.items(), key=lambda item: item[1]):
        target = dest / rel
        if rel in containers:
            target.mkdir(parents=True, exist_ok=True)
            continue
        if os.path.islink(path) and record[path] != "file":
            target.parent.mkdir(parents=True, exist_ok=True)
            if not os.path.lexists(target):
                os.symlink(os.readlink(path), target)
                written += 1
        elif path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        elif path.is_file():
            try:
                data = read_bounded(path)
            except OSError:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(data)
            written += 1
    # git keeps no empty directory; a marker keeps e.g. drivers/thunderbolt-net in a commit
    for folder, subdirs, files in os.walk(dest):
        if not subdirs and not files:
            (Path(folder) / ".keep").touch()
    return inventory, written
