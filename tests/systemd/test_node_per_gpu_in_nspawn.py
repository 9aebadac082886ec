"""`hardware.nodePerGpu` under a real systemd 257: the template exo-worker@.service with each
instance's drop-in, exo-netns@ making each node's namespace and macvlan, every node READY in its
own namespace with its own directories, and one node's failure leaving the other running.

The guest has no GPU, so the nodes run with `cpuFallback` on the CPU variant (the test double
of EXO); the guest has no udev either, so the device units the namespace units bind to are
taken out of their copies in the guest, the only change to the rendered units.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator

import pytest

from tests.systemd.guest import Guest
from tests.systemd.harness import booted_guest, unit_journal, unit_props, wait_until

pytestmark = pytest.mark.systemd

MODULE = """
{ pkgs, ... }: {
  services.exo = {
    enable = true;
    mode = "worker";
    networking.bondInterface = "clus0";
    healthCheck = { intervalSec = 1; timeoutSec = 1; failures = 2; };
    hardware.nodePerGpu = { enable = true; gpus = [ 0 1 ]; cpuFallback = true; };
    gateway.enable = false;
  };
}
"""
NODES = ("gpu0", "gpu1")


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with booted_guest(MODULE, "exo-pergpu") as machine:
        # the cluster link: a veth pair inside the container (no udev: no device units)
        machine.run(["ip", "link", "add", "clus0", "type", "veth", "peer", "name", "clus1"])
        machine.run(["ip", "link", "set", "clus0", "up"])
        machine.run(["ip", "link", "set", "clus1", "up"])
        # dependencies cannot be reset by a drop-in: the device lines go from the copies
        for unit in ("exo-netns@.service", "exo-host-link.service"):
            path = f"/etc/systemd/system/{unit}"
            machine.run(["sed", "-i", "/^BindsTo=/d; /^After=sys-subsystem-net-devices/d", path])
        machine.run(["systemctl", "daemon-reload"])
        yield machine


def _active(guest: Guest, unit: str) -> bool:
    return unit_props(guest, unit, "ActiveState")["ActiveState"] == "active"


def test_every_node_is_ready_in_its_own_namespace(guest: Guest) -> None:
    done = guest.run(["systemctl", "start", "exo.target"], check=False, timeout=120)
    assert done.returncode == 0, done.stderr + guest.run(["journalctl", "-n", "80"]).stdout
    for name in NODES:
        unit = f"exo-worker@{name}"
        namespace_unit = f"exo-netns@{name}"
        assert _active(guest, namespace_unit), unit_journal(guest, namespace_unit)
        wait_until(functools.partial(_active, guest, unit), 60, unit, guest, unit)
        status = unit_props(guest, unit, "StatusText")["StatusText"]
        assert status.startswith(f"worker@{name}; "), status
        link = json.loads(
            guest.run(["ip", "-j", "-d", "-n", f"exo-{name}", "link", "show", "clus0"]).stdout
        )[0]
        assert link["linkinfo"]["info_kind"] == "macvlan"
        pid = unit_props(guest, unit, "MainPID")["MainPID"]
        assert guest.run(["ip", "netns", "identify", pid]).stdout.strip() == f"exo-{name}"
        cache = guest.run(["ls", f"/var/cache/exo/instances/{name}"], check=False)
        assert cache.returncode == 0, "each node has its own cache directory"
    assert _active(guest, "exo-host-link")


def test_one_node_failing_leaves_the_other_running(guest: Guest) -> None:
    guest.run(["systemctl", "kill", "--signal=KILL", "exo-worker@gpu0.service"])
    assert _active(guest, "exo-worker@gpu1")
    node = "exo-worker@gpu0"
    wait_until(lambda: _active(guest, node), 60, f"{node} restarted", guest, node)
