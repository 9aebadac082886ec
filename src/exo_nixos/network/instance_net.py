"""Each node of a host running a node per GPU gets its own address on the cluster link.

EXO binds its API on all addresses with one port, the same on every node (peers probe each
other's ``/node_id`` there), and finds peers by IPv6 multicast on the link. Several EXO nodes
on one host therefore each need an address of their own: each runs in its own network
namespace (``exo-<instance>``) with a macvlan in bridge mode on the cluster interface, named
like that interface inside the namespace, so the config's ``networking.bondInterface`` names
the node's link there too. Its IPv6 link-local address comes from its MAC address, which is
derived from ``/etc/machine-id`` and the instance name: the same address after every boot.

A macvlan child cannot talk to its parent interface: frames from the child to the parent's
own address never reach the parent. The host's own processes (the gateway) reach the nodes
through a macvlan of their own on the same parent (``exo-host``, also bridge mode), through
which the kernel switches frames between siblings.
"""

from __future__ import annotations

import hashlib
import ipaddress
import shutil
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.errors import UserError
from exo_nixos.fsutil import os_reason

if TYPE_CHECKING:
    from exo_nixos.config import Config

HOST_LINK = "exo-host"  # the host's own macvlan on the cluster interface
LINK_LOCAL_V4 = ipaddress.IPv4Network("169.254.0.0/16")
NAMESPACE_PREFIX = "exo-"
MACHINE_ID = Path("/etc/machine-id")


def namespace_for(instance: str) -> str:
    """``gpu0`` -> ``exo-gpu0``: the network namespace under /run/netns."""
    return NAMESPACE_PREFIX + instance


def stable_mac(machine_id: str, name: str) -> str:
    """A locally administered unicast MAC from the machine id and a name: stable per host."""
    digest = hashlib.sha256(f"{machine_id.strip()}\0{name}".encode()).digest()
    octets = [(digest[0] & 0xFC) | 0x02, *digest[1:6]]  # unicast, locally administered
    return ":".join(f"{octet:02x}" for octet in octets)


def link_local_v4(machine_id: str, name: str) -> str:
    """An IPv4 link-local address (RFC 3927: 169.254.1.0-169.254.254.255) from the machine id
    and a name, with its /16: EXO's API listens on IPv4 only, so each node needs one."""
    digest = hashlib.sha256(f"{machine_id.strip()}\0{name}\0ipv4".encode()).digest()
    return f"169.254.{1 + digest[0] % 254}.{digest[1]}/{LINK_LOCAL_V4.prefixlen}"


def read_machine_id(path: Path = MACHINE_ID) -> str | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return text or None


@dataclass(frozen=True)
class Ip:
    """iproute2, run as a child: one line naming the failed command on error."""

    executable: str = "ip"

    def __call__(self, *args: str, ok_if: Sequence[str] = ()) -> None:
        command = [shutil.which(self.executable) or self.executable, *args]
        try:
            done = subprocess.run(command, capture_output=True, text=True, check=False)
        except OSError as exc:
            raise UserError(f"cannot run {self.executable}: {os_reason(exc)}") from None
        error = done.stderr.strip()
        if done.returncode != 0 and not any(text in error for text in ok_if):
            reason = error.splitlines()[-1] if error else f"exit status {done.returncode}"
            raise UserError(f"ip {' '.join(args)}: {reason}")


def macvlan(ip: Ip, parent: str, name: str, mac: str | None, *namespace: str) -> None:
    address = ["address", mac] if mac else []
    ip("link", "add", "link", parent, "name", name, *namespace, *address,
       "type", "macvlan", "mode", "bridge")  # fmt: skip


def instance_up(
    parent: str,
    instance: str,
    *,
    address: str | None = None,
    machine_id: str | None = None,
    namespace: str | None = None,
    ip: Ip | None = None,
) -> str:
    """Make the instance's namespace and its link; return the namespace's name.

    The link gets ``address`` (IPv4 with prefix), else a link-local one from the machine id,
    and IPv6 link-local from its MAC. Idempotent: an existing namespace is reused and its link
    made anew (the parent may have changed since), so a restart repairs what a crash left.
    """
    run = ip or Ip()
    namespace = namespace or namespace_for(instance)
    if address is None and machine_id is not None:
        address = link_local_v4(machine_id, instance)
    if address is not None:
        ipaddress.IPv4Interface(address)  # checked by the config model; never pass junk to ip
    run("netns", "add", namespace, ok_if=["File exists"])
    run("-n", namespace, "link", "set", "lo", "up")
    run("-n", namespace, "link", "del", parent, ok_if=["Cannot find device"])
    mac = stable_mac(machine_id, instance) if machine_id else None
    # made straight inside the namespace, so it can carry the parent's name there
    macvlan(run, parent, parent, mac, "netns", namespace)
    if address is not None:
        run("-n", namespace, "address", "add", address, "dev", parent)
    run("-n", namespace, "link", "set", parent, "up")
    if address is not None and ipaddress.IPv4Interface(address) not in LINK_LOCAL_V4:
        # the host's own link (exo-host) speaks from IPv4 link-local: answers go back on-link
        run("-n", namespace, "route", "replace", str(LINK_LOCAL_V4), "dev", parent)
    return namespace


def instance_down(instance: str, *, namespace: str | None = None, ip: Ip | None = None) -> None:
    """Remove the instance's namespace (its macvlan goes with it)."""
    name = namespace or namespace_for(instance)
    (ip or Ip())("netns", "del", name, ok_if=["No such file"])


def host_up(
    parent: str,
    nodes: Sequence[str] = (),
    *,
    machine_id: str | None = None,
    ip: Ip | None = None,
) -> None:
    """The host's own macvlan on the cluster interface, to reach its nodes' addresses.

    It gets IPv4 link-local (the nodes' default addresses are in 169.254.0.0/16 on the same
    link) and IPv6 link-local; each configured node address (``nodes``, IPv4 with prefix) is
    routed through it, since the route of their network through the parent cannot reach them.
    """
    run = ip or Ip()
    run("link", "del", HOST_LINK, ok_if=["Cannot find device"])
    macvlan(run, parent, HOST_LINK, stable_mac(machine_id, HOST_LINK) if machine_id else None)
    if machine_id is not None:
        run("address", "add", link_local_v4(machine_id, HOST_LINK), "dev", HOST_LINK)
    run("link", "set", HOST_LINK, "up")
    for node in nodes:
        host = ipaddress.IPv4Interface(node).ip
        run("route", "replace", f"{host}/32", "dev", HOST_LINK)


def node_urls(config: Config, machine_id: str | None = None) -> list[str]:
    """The API URLs of this host's nodes (hardware.nodePerGpu), as the host reaches them
    through ``exo-host``; empty when the option is off. The gateway's and the registrar's."""
    from exo_nixos.addresses import url_for
    from exo_nixos.hardware.instances import instances

    nodes = instances(config.hardware.node_per_gpu)
    if not nodes:
        return []
    machine = machine_id if machine_id is not None else read_machine_id()
    urls: list[str] = []
    for node in nodes:
        address = node.address or (link_local_v4(machine, node.name) if machine else None)
        if address is not None:
            urls.append(url_for(str(ipaddress.IPv4Interface(address).ip), config.api_port))
    return urls
