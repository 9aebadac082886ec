"""Send one datagram to EXO's discovery group on one link and try to receive it on another.

Usage: python -m tests.network_mcast_probe SEND_IF RECV_IF PORT; prints "received" or the error.
This is what EXO's discovery does (IPv6 multicast ff12::e0a1:de89, UDP), inside a namespace.
"""

from __future__ import annotations

import socket
import struct
import sys

GROUP = "ff12::e0a1:de89"


def main(send_if: str, recv_if: str, port: int) -> int:
    recv = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    recv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    recv.bind(("::", port))
    mreq = socket.inet_pton(socket.AF_INET6, GROUP) + struct.pack(
        "@I", socket.if_nametoindex(recv_if)
    )
    recv.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_JOIN_GROUP, mreq)
    recv.settimeout(3)
    send = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
    send.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex(send_if))
    send.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_LOOP, 0)
    try:
        send.sendto(b"hello", (GROUP, port, 0, socket.if_nametoindex(send_if)))
        data, _ = recv.recvfrom(64)
    except OSError as exc:
        print(f"failed: {exc}")
        return 1
    print("received" if data == b"hello" else f"unexpected {data!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3])))
