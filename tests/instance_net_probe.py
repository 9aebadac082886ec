"""Helpers the node-per-GPU namespace tests run inside namespaces.

python -m tests.instance_net_probe up PARENT INSTANCE NAMESPACE [ADDRESS]
python -m tests.instance_net_probe host PARENT [NODE_ADDRESS...]
python -m tests.instance_net_probe listen IF PORT COUNT   (prints "ready", then each payload)
python -m tests.instance_net_probe send IF PORT PAYLOAD
python -m tests.instance_net_probe get URL                (prints the body)

``listen`` and ``send`` do what EXO's discovery does: UDP to the IPv6 group ff12::e0a1:de89
on one link (upstream's discovery, as tests/network_mcast_probe.py).
"""

from __future__ import annotations

import socket
import struct
import sys
import urllib.request

from exo_nixos.network import instance_net

GROUP = "ff12::e0a1:de89"
MACHINE_ID = "0123456789abcdef0123456789abcdef"  # a fixed host identity for the tests


def listen(interface: str, port: int, count: int) -> int:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("::", port))
    index = socket.if_nametoindex(interface)
    mreq = socket.inet_pton(socket.AF_INET6, GROUP) + struct.pack("@I", index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    sock.settimeout(10)
    print("ready", flush=True)
    for _ in range(count):
        try:
            data, _ = sock.recvfrom(256)
        except TimeoutError:
            print("timeout", flush=True)
            return 1
        print(data.decode(), flush=True)
    return 0


def send(interface: str, port: int, payload: str) -> int:
    sock = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    index = socket.if_nametoindex(interface)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, index)
    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)  # others only
    sock.sendto(payload.encode(), (GROUP, port, 0, index))
    return 0


def main(argv: list[str]) -> int:
    action, *rest = argv
    if action == "up":
        parent, instance, namespace, *address = rest
        instance_net.instance_up(
            parent,
            instance,
            address=address[0] if address else None,
            machine_id=MACHINE_ID,
            namespace=namespace,
        )
        return 0
    if action == "host":
        parent, *nodes = rest
        instance_net.host_up(parent, nodes, machine_id=MACHINE_ID)
        return 0
    if action == "listen":
        return listen(rest[0], int(rest[1]), int(rest[2]))
    if action == "send":
        return send(rest[0], int(rest[1]), rest[2])
    if action == "get":
        with urllib.request.urlopen(rest[0], timeout=5) as response:
            print(response.read().decode())
        return 0
    raise SystemExit(f"unknown action {action}")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
