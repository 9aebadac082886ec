"""Render the network inventory and the cluster interface choice as text or JSON."""

from __future__ import annotations

import dataclasses
from typing import Any

from exo_nixos.network.choose import InterfaceChoice
from exo_nixos.network.model import Interface, NetInventory


def _interface_json(iface: Interface) -> dict[str, Any]:
    data = dataclasses.asdict(iface)
    data["link_up"] = iface.link_up
    data["link_local"] = iface.link_local
    data["ipv6_ready"] = iface.ipv6_ready
    return data


def to_json(inv: NetInventory, choice: InterfaceChoice) -> dict[str, Any]:
    bonds = []
    for bond in inv.bonds:
        data = dataclasses.asdict(bond)
        data["degraded"] = bond.degraded
        data["problems"] = bond.problems
        bonds.append(data)
    rdma = []
    for dev in inv.rdma:
        data = dataclasses.asdict(dev)
        data["active"] = dev.active
        rdma.append(data)
    choice_data = dataclasses.asdict(choice)
    choice_data["ok"] = choice.ok
    return {
        "root": inv.root,
        "interfaces": [_interface_json(i) for i in inv.interfaces],
        "bonds": bonds,
        "thunderbolt": dataclasses.asdict(inv.thunderbolt),
        "rdma": rdma,
        "default_route_interfaces": list(inv.default_route_interfaces),
        "cluster": choice_data,
    }


def _table(rows: list[list[str]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return [
        "  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    ]


def to_text(inv: NetInventory, choice: InterfaceChoice) -> str:
    lines = ["Interfaces"]
    rows = [["NAME", "KIND", "LINK", "MTU", "SPEED", "IPV6 LINK-LOCAL", "MULTICAST", "MASTER"]]
    for i in inv.interfaces:
        rows.append(
            [
                i.name,
                i.kind,
                "up" if i.link_up else i.operstate if i.admin_up else "admin-down",
                str(i.mtu or "?"),
                f"{i.speed_mbps}Mb/s" if i.speed_mbps else "-",
                "disabled" if i.ipv6_disabled else (", ".join(i.link_local) or "none"),
                "yes" if i.multicast else "no",
                i.master or "-",
            ]
        )
    lines += _table(rows)
    if inv.bonds:
        lines.append("Bonds")
        for bond in inv.bonds:
            verdict = "DEGRADED" if bond.degraded else "ok"
            active = f", active slave {bond.active_slave}" if bond.active_slave else ""
            lines.append(
                f"  {bond.name}: {bond.mode or 'unknown mode'}, {len(bond.slaves_up)} of "
                f"{len(bond.slaves)} slaves up{active}: {verdict}"
            )
            for s in bond.slaves:
                speed = f"{s.speed_mbps}Mb/s" if s.speed_mbps else "speed unknown"
                extra = f", aggregator {s.aggregator_id}" if s.aggregator_id else ""
                fails = f", {s.link_failure_count} link failures" if s.link_failure_count else ""
                lines.append(
                    f"    {s.name}: link {s.mii_status or 'unknown'}, {speed}, "
                    f"{s.state or 'state unknown'}, MTU {s.mtu or '?'}{extra}{fails}"
                )
    tb = inv.thunderbolt
    lines.append("Thunderbolt")
    if not tb.bus_present:
        lines.append("  no Thunderbolt bus")
    else:
        loaded = "loaded" if tb.net_driver_loaded else "NOT loaded"
        lines.append(f"  thunderbolt-net driver {loaded}")
        lines += [f"  device {device}" for device in tb.devices]
        lines.append(f"  network interfaces: {', '.join(tb.interfaces) or 'none'}")
    lines.append("RDMA")
    if not inv.rdma:
        lines.append("  no RDMA devices")
    for dev in inv.rdma:
        verbs = f", verbs /dev/infiniband/{dev.uverbs}" if dev.uverbs else ", no verbs node"
        lines.append(f"  {dev.name} ({dev.node_type or 'unknown type'}{verbs})")
        for p in dev.ports:
            netdev = f", netdev {p.netdev}" if p.netdev else ""
            lines.append(
                f"    port {p.number}: {p.state or 'unknown'} ({p.phys_state or '?'}), "
                f"{p.link_layer or '?'}, {p.rate or 'rate unknown'}{netdev}"
            )
    how = "configured" if choice.configured else "chosen"
    lines.append(
        f"Cluster interface: {choice.name or 'none'}" + (f" ({how})" if choice.name else "")
    )
    lines += [f"  {r}" for r in choice.reasons]
    for title, items, mark in (
        ("Problems", choice.problems, "x"),
        ("Warnings", choice.warnings, "!"),
        ("Notes", choice.notes, "-"),
    ):
        if items:
            lines.append(title)
            lines += [f"  {mark} {item}" for item in items]
    return "\n".join(lines) + "\n"
