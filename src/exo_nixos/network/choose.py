"""Choose the cluster interface and say what on this host would break EXO's networking.

EXO itself uses every interface that has an IPv6 address (discovery joins its multicast group on
each of them) and has no interface selection. The *cluster interface* is this project's notion:
the link whose health the supervisor watches, the firewall opens EXO's ports on, and the units
are restricted to. It is the configured ``networking.bondInterface``, or else the best candidate
found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from exo_nixos.basetypes import EXO_DISCOVERY_PORT
from exo_nixos.network.model import Interface, NetInventory

if TYPE_CHECKING:
    from exo_nixos.config import Config

DISCOVERY_GROUP = "ff12::e0a1:de89"

# Interfaces that belong to containers, VMs, VPNs or overlays: never a cluster link by default.
_NOT_CLUSTER_PREFIXES = (
    "docker",
    "veth",
    "virbr",
    "br-",
    "cni",
    "flannel",
    "cali",
    "vxlan",
    "tailscale",
    "wg",
    "tun",
    "tap",
    "lxc",
    "lxd",
    "podman",
    "kube-",
    "zt",
    "vnet",
    "ifb",
    "dummy",
    "nlmon",
)

_KIND_RANK = {"bond": 4, "ethernet": 3, "thunderbolt": 3, "infiniband": 3, "bridge": 2, "vlan": 2}


@dataclass(frozen=True)
class InterfaceChoice:
    """The cluster interface (None when there is none) and why.

    ``problems``: EXO cannot work over this link (missing, down, no usable IPv6 link-local).
    ``warnings``: it works, with less than was asked for or at risk (degraded bond, MULTICAST
    flag off, RDMA absent, ...).
    ``notes``: plain facts worth knowing (e.g. RDMA present but unused by EXO on Linux).
    """

    name: str | None
    reasons: list[str]
    problems: list[str]
    warnings: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    configured: bool = False
    candidates: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.name is not None and not self.problems


def _candidate(iface: Interface) -> bool:
    if iface.kind == "loopback" or iface.master is not None:
        return False
    return not iface.name.startswith(_NOT_CLUSTER_PREFIXES)


def _score(iface: Interface, inv: NetInventory) -> tuple[int, int, int, int, int, int]:
    return (
        int(iface.link_up),
        int(iface.ipv6_ready and iface.multicast),
        int(iface.kind not in {"virtual", "wireless"}),
        _KIND_RANK.get(iface.kind, 0),
        iface.speed_mbps or 0,
        int(iface.name in inv.default_route_interfaces),
    )


def describe(iface: Interface, inv: NetInventory) -> str:
    """One line: kind, link, speed, IPv6 and multicast of an interface."""
    parts = [iface.kind]
    bond = inv.bond(iface.name)
    if bond is not None:
        parts.append(
            f"{bond.mode or 'unknown mode'}, {len(bond.slaves_up)} of {len(bond.slaves)} slaves up"
        )
    parts.append("link up" if iface.link_up else f"link down ({iface.operstate})")
    if iface.speed_mbps:
        parts.append(f"{iface.speed_mbps} Mb/s")
    if iface.mtu:
        parts.append(f"MTU {iface.mtu}")
    parts.append(
        f"IPv6 link-local {iface.link_local[0]}" if iface.link_local else "no IPv6 link-local"
    )
    parts.append("multicast" if iface.multicast else "no multicast")
    if iface.name in inv.default_route_interfaces:
        parts.append("default route")
    return ", ".join(parts)


def _discovery_problems(iface: Interface, port: int, role: str) -> tuple[list[str], list[str]]:
    """What stops EXO's discovery on ``iface`` (problems) and what may (warnings)."""
    found: list[str] = []
    doubtful: list[str] = []
    what = f"EXO's discovery (UDP {port}, IPv6 multicast {DISCOVERY_GROUP})"
    if not iface.link_up:
        carrier = "" if iface.carrier is None else f", carrier {'on' if iface.carrier else 'off'}"
        state = "administratively down" if not iface.admin_up else f"state {iface.operstate}"
        found.append(
            f"{role} {iface.name} is down ({state}{carrier}): EXO has no link to its peers here"
        )
    if iface.ipv6_disabled:
        found.append(
            f"IPv6 is disabled on {role} {iface.name} (net.ipv6.conf.{iface.name}.disable_ipv6"
            f"=1): {what} will find no peers; enable IPv6 (networking.enableIPv6 = true)"
        )
    elif not iface.link_local:
        tentative = [a for a in iface.ipv6 if a.scope == "link" and a.tentative]
        failed = [a for a in iface.ipv6 if a.scope == "link" and a.dad_failed]
        if failed:
            why = f"duplicate address detection failed for {failed[0].address}"
        elif tentative:
            why = f"{tentative[0].address} is still tentative (duplicate address detection)"
        else:
            why = "none assigned (addrgenmode none, or IPv6 off for this link)"
        found.append(
            f"{role} {iface.name} has no usable IPv6 link-local address ({why}): "
            f"{what} will fail on it"
        )
    if not iface.multicast:
        doubtful.append(
            f"{role} {iface.name} has the MULTICAST flag off: {what} may not be received "
            "(the NIC's multicast filter is the driver's choice); turn it on "
            f"(ip link set {iface.name} multicast on, or the network config)"
        )
    return found, doubtful


def _rdma_findings(config: Config, inv: NetInventory) -> tuple[list[str], list[str]]:
    warnings: list[str] = []
    notes: list[str] = []
    tcp = "upstream EXO uses TCP on Linux in any case (its RDMA/JACCL path is macOS-only)"
    if not config.networking.rdma_enabled:
        return warnings, notes
    tb = inv.thunderbolt
    if not inv.rdma and not tb.interfaces:
        # a warning only when asked for: the default (on) is no reason to warn about hardware
        explicit = "rdma_enabled" in config.networking.model_fields_set
        (warnings if explicit else notes).append(
            f"networking.rdmaEnabled is {'set' if explicit else 'on (the default)'} but this "
            "host has no RDMA device and no Thunderbolt network link: EXO falls back to TCP "
            f"over Ethernet; {tcp}"
        )
    if tb.bus_present and not tb.net_driver_loaded:
        warnings.append(
            "a Thunderbolt bus is present but the thunderbolt-net driver is not loaded: "
            "no Thunderbolt network link can come up (the module loads it when rdmaEnabled)"
        )
    for dev in inv.rdma:
        if not dev.active:
            states = ", ".join(f"port {p.number} {p.state or 'unknown'}" for p in dev.ports)
            warnings.append(f"RDMA device {dev.name} has no active port ({states or 'no ports'})")
        if dev.uverbs is None:
            warnings.append(
                f"RDMA device {dev.name} has no userspace verbs node (/dev/infiniband/uverbs*): "
                "ib_uverbs is not loaded"
            )
    if inv.rdma:
        names = ", ".join(
            f"{d.name} ({'active' if d.active else 'inactive'}"
            + (f", netdev {', '.join(d.netdevs)}" if d.netdevs else "")
            + ")"
            for d in inv.rdma
        )
        notes.append(
            f"RDMA devices: {names}; {tcp}, so EXO's traffic goes over TCP/IP on their "
            "network interfaces (IPoIB/RoCE), not over verbs"
        )
    if tb.interfaces:
        notes.append(
            f"Thunderbolt network links: {', '.join(tb.interfaces)}; EXO uses them as plain "
            "IPv6/TCP links (add them to networking.extraInterfaces to open the firewall there)"
        )
    return warnings, notes


def _missing(configured: str, inv: NetInventory, candidates: list[Interface]) -> InterfaceChoice:
    known = ", ".join(i.name for i in inv.interfaces) or "none"
    return InterfaceChoice(
        name=configured,
        reasons=[f"{configured} is set as networking.bondInterface"],
        problems=[
            f"the configured cluster interface {configured} (networking.bondInterface) "
            f"does not exist on this host (interfaces: {known}); create it or fix the option"
        ],
        configured=True,
        candidates=[c.name for c in candidates],
    )


def _none_qualifies(notes: list[str]) -> InterfaceChoice:
    return InterfaceChoice(
        name=None,
        reasons=[
            "no interface qualifies (loopback, bond slaves and container, VPN or "
            "virtual bridge interfaces are never chosen)"
        ],
        problems=["no network interface for EXO's cluster traffic: EXO would only see itself"],
        notes=notes,
    )


def _best(candidates: list[Interface], inv: NetInventory) -> list[str]:
    """Why the first candidate and not the others."""
    chosen, *others = candidates
    return [
        f"{chosen.name} is the best candidate: {describe(chosen, inv)}",
        *(f"not {other.name}: {describe(other, inv)}" for other in others),
        "nothing is configured: set services.exo.networking.bondInterface to pin the choice",
    ]


def _link_findings(chosen: Interface, inv: NetInventory, port: int) -> tuple[list[str], list[str]]:
    """What stops (problems) or risks (warnings) EXO's traffic on the cluster interface."""
    problems, warnings = _discovery_problems(chosen, port, "cluster interface")
    bond = inv.bond(chosen.name)
    if bond is not None and chosen.link_up:
        warnings.extend(bond.problems)
    elif bond is not None:
        warnings.extend(p for p in bond.problems if "MTU" in p)
    if chosen.master is not None:
        problems.append(
            f"{chosen.name} is enslaved to {chosen.master}: use {chosen.master} as the cluster "
            "interface"
        )
    return problems, warnings


def _other_links(
    config: Config, chosen: Interface, inv: NetInventory, port: int
) -> tuple[list[str], list[str]]:
    """Warnings and notes about the extra and backup interfaces and RDMA/Thunderbolt."""
    net = config.networking
    warnings: list[str] = []
    notes: list[str] = []
    for extra in net.extra_interfaces:
        if extra == chosen.name:
            continue
        iface = inv.interface(extra)
        if iface is None:
            warnings.append(
                f"extra cluster interface {extra} (networking.extraInterfaces) does not exist"
            )
            continue
        found, doubtful = _discovery_problems(iface, port, "extra cluster interface")
        warnings.extend(found + doubtful)
        xbond = inv.bond(extra)
        if xbond is not None:
            warnings.extend(xbond.problems)
    if net.backup_interface is not None:
        backup = inv.interface(net.backup_interface)
        if backup is None:
            warnings.append(
                f"backup interface {net.backup_interface} (networking.backupInterface) "
                "does not exist: no failover possible"
            )
        elif not backup.link_up:
            warnings.append(
                f"backup interface {backup.name} is down: no failover possible right now"
            )
        else:
            notes.append(f"backup interface {backup.name}: {describe(backup, inv)}")
    rdma_warnings, rdma_notes = _rdma_findings(config, inv)
    return warnings + rdma_warnings, notes + rdma_notes


def choose_cluster_interface(config: Config | None, inv: NetInventory) -> InterfaceChoice:
    """The cluster interface for this host: the configured one, or the best candidate."""
    port = config.networking.discovery_port if config else EXO_DISCOVERY_PORT
    notes: list[str] = list(inv.notes)
    configured = config.networking.bond_interface if config else None
    by_name = sorted((i for i in inv.interfaces if _candidate(i)), key=lambda i: i.name)
    # best score first; among equals the first name (the sort is stable)
    candidates = sorted(by_name, key=lambda i: _score(i, inv), reverse=True)
    if configured is not None:
        chosen = inv.interface(configured)
        if chosen is None:
            return _missing(configured, inv, candidates)
        reasons = [f"{configured} is set as networking.bondInterface: {describe(chosen, inv)}"]
    elif candidates:
        chosen = candidates[0]
        reasons = _best(candidates, inv)
    else:
        return _none_qualifies(notes)
    reasons.append(
        "EXO itself uses every interface with an IPv6 address; the cluster interface is where "
        "exo-nixos opens the firewall, restricts the units and watches the link"
    )
    problems, warnings = _link_findings(chosen, inv, port)
    if config is not None:
        more_warnings, more_notes = _other_links(config, chosen, inv, port)
        warnings += more_warnings
        notes += more_notes
    return InterfaceChoice(
        name=chosen.name,
        reasons=reasons,
        problems=problems,
        warnings=warnings,
        notes=notes,
        configured=configured is not None,
        candidates=[c.name for c in candidates],
    )
