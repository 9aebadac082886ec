"""The ``exo`` a guest's units run: a sandbox self-check, then the EXO test double.

It runs exactly where EXO would (the supervisor's child, under every directive of the rendered
unit), so what it records is what EXO would meet. Written to ``$EXO_SANDBOX_REPORT`` (JSON):
which writes and device opens succeed, uid/gids, capabilities, no_new_privs, seccomp.
Extra double flags for fault tests come from ``/etc/exo-double-args`` when that file exists.

``$EXO_NET_PROBES`` (space-separated ``label=host:port``, IPv6 as ``[addr%iface]:port``) names
UDP datagrams to send, the way EXO's discovery and its peers' traffic leave the node; each
label's outcome (``ok`` or the errno name) goes into the report's ``net``.
"""

from __future__ import annotations

import errno
import json
import os
import socket
import sys
from pathlib import Path

WRITE_PROBES = (
    "/usr/exo-probe",
    "/etc/exo-probe",
    "/var/exo-probe",
    "/var/lib/exo/exo-probe",
    "/var/cache/exo/exo-probe",
    "/run/exo/exo-probe",
    "/tmp/exo-probe",
    "/home/exo-probe",
    "/root/exo-probe",
)
DEVICE_PROBES = ("/dev/null", "/dev/urandom", "/dev/net/tun", "/dev/console")
ARGS_FILE = Path("/etc/exo-double-args")


def _outcome(exc: OSError | None) -> str:
    if exc is None:
        return "ok"
    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def _try_write(path: str) -> str:
    try:
        with open(path, "w") as handle:
            handle.write("probe\n")
        os.unlink(path)
    except OSError as exc:
        return _outcome(exc)
    return "ok"


def _try_open(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        os.close(fd)
    except OSError as exc:
        return _outcome(exc)
    return "ok"


def _try_send(target: str) -> str:
    host, _, port = target.rpartition(":")
    family = socket.AF_INET6 if host.startswith("[") else socket.AF_INET
    address = host.strip("[]")
    try:
        info = socket.getaddrinfo(address, int(port), family, socket.SOCK_DGRAM)[0]
        with socket.socket(family, socket.SOCK_DGRAM) as sock:
            sock.sendto(b"exo-probe", info[4])
    except OSError as exc:
        return _outcome(exc)
    return "ok"


def _net_probes() -> dict[str, str]:
    spec = os.environ.get("EXO_NET_PROBES", "")
    probes = (item.partition("=") for item in spec.split())
    return {label: _try_send(target) for label, _, target in probes}


def _status_fields() -> dict[str, str]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = value.strip()
    return fields


def report() -> dict[str, object]:
    status = _status_fields()
    return {
        "uid": os.getuid(),
        "gid": os.getgid(),
        "groups": os.getgroups(),
        "writes": {p: _try_write(p) for p in WRITE_PROBES},
        "devices": {p: _try_open(p) for p in DEVICE_PROBES},
        "net": _net_probes(),
        "CapEff": status.get("CapEff"),
        "CapBnd": status.get("CapBnd"),
        "NoNewPrivs": status.get("NoNewPrivs"),
        "Seccomp": status.get("Seccomp"),
        "env": {k: v for k, v in os.environ.items() if k.startswith(("EXO_", "XDG_", "OVERR"))},
    }


def main() -> None:
    target = os.environ.get("EXO_SANDBOX_REPORT")
    if target:
        tmp = f"{target}.tmp"
        Path(tmp).write_text(json.dumps(report(), indent=2, sort_keys=True))
        os.replace(tmp, target)
    extra = ARGS_FILE.read_text().split() if ARGS_FILE.exists() else []
    argv = [sys.executable, "-m", "tests.exo_double", *sys.argv[1:], *extra]
    os.execv(sys.executable, argv)


if __name__ == "__main__":
    main()
