"""This node's name and address for the EndpointSlice."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
from typing import Any

import pytest

from exo_nixos.config import parse_config
from exo_nixos.k3s.node import _interface_address, node_address, node_name


def config(**k3s: Any) -> Any:
    return parse_config({"schemaVersion": 1, "k3s": k3s})


def test_configured_name_and_address_win() -> None:
    cfg = config(nodeName="gpu-01", nodeAddress="fd00:0:0::5")
    assert node_name(cfg) == "gpu-01"
    assert node_address(cfg) == "fd00::5"


def test_default_name_is_the_host_name() -> None:
    assert node_name(config()) == socket.gethostname()


def test_loopback_and_missing_interfaces_have_no_global_address() -> None:
    assert _interface_address("lo") is None
    assert _interface_address("nosuchif0") is None


def _default_route_interface() -> tuple[str, list[str]] | None:
    if shutil.which("ip") is None:
        return None
    routes = json.loads(
        subprocess.run(
            ["ip", "-j", "route", "show", "default"], capture_output=True, text=True, check=True
        ).stdout
        or "[]"
    )
    if not routes or "dev" not in routes[0]:
        return None
    dev = routes[0]["dev"]
    info = json.loads(
        subprocess.run(
            ["ip", "-j", "addr", "show", "dev", dev, "scope", "global"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        or "[]"
    )
    addresses = [a["local"] for i in info for a in i.get("addr_info", []) if "local" in a]
    return (dev, addresses) if addresses else None


def test_cluster_interface_address_is_used() -> None:
    found = _default_route_interface()
    if found is None:
        pytest.skip("no iproute2 or no default route with a global address on this machine")
    dev, addresses = found
    cfg = parse_config({"schemaVersion": 1, "networking": {"bondInterface": dev}})
    assert node_address(cfg) in addresses
    # Without a cluster interface: the default route's source, an address of the same device.
    assert node_address(config()) in addresses
