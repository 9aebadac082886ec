"""This node's name and address as the EndpointSlice carries them."""

from __future__ import annotations

import ipaddress
import re
import socket

from exo_nixos.config import Config
from exo_nixos.errors import UserError

# A Kubernetes node name is a DNS subdomain (RFC 1123, lower case, at most 253 characters).
_DNS1123_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_SUBDOMAIN = re.compile(rf"^{_DNS1123_LABEL}(\.{_DNS1123_LABEL})*$")

# Documentation addresses (RFC 5737, RFC 3849): connecting a UDP socket to them sends nothing
# but makes the kernel pick the source address of the default route.
_PROBE_TARGETS = (("192.0.2.1", socket.AF_INET), ("2001:db8::1", socket.AF_INET6))


def node_name(config: Config) -> str:
    """``k3s.nodeName``, else the host name in lower case (K3s' own default node name: it
    lowercases the host name). A host name that is still no valid node name (``GPU_01``:
    the API server answers 422 for ``nodeName``) is a UserError naming the setting."""
    if config.k3s.node_name:
        return config.k3s.node_name
    name = socket.gethostname().lower()
    if len(name) > 253 or not _SUBDOMAIN.match(name):
        raise UserError(
            f"the host name {name!r} is not a valid Kubernetes node name (lower-case letters, "
            "digits, '-' and '.'): set k3s.nodeName to this node's name in K3s"
        )
    return name


def _interface_address(ifname: str) -> str | None:
    """The first global (scope universe) address on ``ifname``, IPv4 before IPv6."""
    from pyroute2 import IPRoute

    with IPRoute() as ipr:
        indices = ipr.link_lookup(ifname=ifname)
        if not indices:
            return None
        found: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
        for message in ipr.get_addr(index=indices[0]):
            if message["scope"] != 0:  # RT_SCOPE_UNIVERSE
                continue
            value = message.get_attr("IFA_ADDRESS")
            if value:
                found.append(ipaddress.ip_address(value))
    found.sort(key=lambda a: a.version)
    return str(found[0]) if found else None


def _default_route_source() -> str | None:
    for target, family in _PROBE_TARGETS:
        try:
            with socket.socket(family, socket.SOCK_DGRAM) as sock:
                sock.connect((target, 9))
                address = str(sock.getsockname()[0])
        except OSError:
            continue
        if not ipaddress.ip_address(address).is_loopback:
            return address
    return None


def node_address(config: Config) -> str | None:
    """``k3s.nodeAddress``, else the cluster interface's, else the default route's source."""
    if config.k3s.node_address:
        return str(ipaddress.ip_address(config.k3s.node_address))
    bond = config.networking.bond_interface
    if bond:
        try:
            found = _interface_address(bond)
        except OSError:
            found = None
        if found:
            return found
    return _default_route_source()
