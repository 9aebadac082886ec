"""What the network readers find: interfaces, bonds, Thunderbolt links, RDMA devices.

Plain frozen dataclasses; :mod:`exo_nixos.network.sysfs` fills them from a host tree.
"""

from __future__ import annotations

from dataclasses import dataclass, field


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
