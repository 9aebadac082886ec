"""Pre-flight of one node of a node per GPU: its namespace, its link, its GPUs.

Run as the node unit's ExecStartPre, which shares the unit's network namespace
(``NetworkNamespacePath=``): the link is looked at through the calling process's own
namespace (``/proc/self/net``, interface ioctls), never through a sysfs that may belong to
another.
"""

from __future__ import annotations

import fcntl
import socket
import struct
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.fsutil import os_reason
from exo_nixos.network.instance_net import namespace_for
from exo_nixos.network.sysfs import read_if_inet6
from exo_nixos.preflight import CheckResult, Status

if TYPE_CHECKING:
    from exo_nixos.hardware.instances import Instance
    from exo_nixos.hardware.model import Inventory

NETNS_DIR = Path("/run/netns")
SIOCGIFFLAGS = 0x8913
SIOCGIFADDR = 0x8915
IFF_UP = 0x1


def check_namespace(
    instance: Instance, netns_dir: Path = NETNS_DIR, namespace: str | None = None
) -> CheckResult:
    name = namespace or namespace_for(instance.name)
    check = f"{instance.name} namespace"
    try:
        wanted = (netns_dir / name).stat()
        mine = Path("/proc/self/ns/net").stat()
    except OSError as exc:
        return CheckResult(
            check,
            Status.FAIL,
            f"{netns_dir / name}: {os_reason(exc)}",
            f"start exo-netns@{instance.name}.service (exo-nixos instance-net up)",
        )
    if (wanted.st_dev, wanted.st_ino) != (mine.st_dev, mine.st_ino):
        return CheckResult(
            check,
            Status.FAIL,
            f"not running in the network namespace {name}",
            f"the unit needs NetworkNamespacePath=/run/netns/{name}",
        )
    return CheckResult(check, Status.OK, f"running in {name}")


def _ioctl(sock: socket.socket, request: int, interface: str) -> bytes:
    return fcntl.ioctl(sock.fileno(), request, struct.pack("256s", interface.encode()[:15]))


def check_link(instance: Instance, interface: str) -> CheckResult:
    """The node's link: present in this namespace, up, with IPv4 and IPv6 link-local."""
    check = f"{instance.name} link"
    namespace = namespace_for(instance.name)
    fix = f"restart exo-netns@{instance.name}.service; see `ip -n {namespace} address`"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            flags = struct.unpack("H", _ioctl(sock, SIOCGIFFLAGS, interface)[16:18])[0]
        except OSError:
            return CheckResult(check, Status.FAIL, f"no {interface} in this namespace", fix)
        if not flags & IFF_UP:
            return CheckResult(check, Status.FAIL, f"{interface} is down", fix)
        try:
            ipv4 = socket.inet_ntoa(_ioctl(sock, SIOCGIFADDR, interface)[20:24])
        except OSError:
            return CheckResult(
                check,
                Status.FAIL,
                f"{interface} has no IPv4 address: EXO's API listens on IPv4 only",
                fix,
            )
    # /proc/net is /proc/self/net: the addresses of this process's own namespace
    addresses = read_if_inet6(Path("/")).get(interface, [])
    link_local = [a.address for a in addresses if a.address.startswith("fe80")]
    if not link_local:
        return CheckResult(
            check,
            Status.FAIL,
            f"{interface} has no IPv6 link-local address: EXO's discovery needs one",
            fix,
        )
    return CheckResult(check, Status.OK, f"{interface} up, {ipv4}, {link_local[0]}")


def check_gpus(instance: Instance, inventory: Inventory) -> CheckResult:
    """The node's GPUs are on this host and usable; a warning when it would run on the CPU."""
    from exo_nixos.hardware.instances import gpus_of

    check = f"{instance.name} GPU"
    found, missing = gpus_of(inventory, instance)
    problems = [f"no NVIDIA GPU with device minor {m}" for m in missing]
    problems += [f"{g.label}: {', '.join(g.problems)}" for g in found if g.problems]
    if not problems:
        names = ", ".join(f"{g.label} ({g.uuid})" for g in found)
        return CheckResult(check, Status.OK, names)
    if instance.cpu_fallback:
        return CheckResult(
            check, Status.WARN, "; ".join(problems) + ": this node runs on the CPU", ""
        )
    return CheckResult(
        check,
        Status.FAIL,
        "; ".join(problems),
        "check the GPU (nvidia-smi), or set hardware.nodePerGpu.cpuFallback",
    )


def instance_checks(
    instance: Instance, interface: str, inventory: Inventory, *, live: bool
) -> list[CheckResult]:
    """Every check of one node; namespace and link only on the live host (not under --root)."""
    results = [check_gpus(instance, inventory)]
    if live:
        results = [check_namespace(instance), check_link(instance, interface), *results]
    return results
