"""`networking.networkNamespace` under a real systemd 257: exo-netns.service makes the
namespace with its loopback up (EXO's API and the supervisor's READY probe use 127.0.0.1), also
when the namespace existed before, and never deletes it; the node unit joins it and gets READY.
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from tests.systemd.guest import Guest
from tests.systemd.harness import booted_guest, unit_journal, unit_props

pytestmark = pytest.mark.systemd

MODULE = """
{ pkgs, ... }: {
  services.exo = {
    enable = true;
    mode = "worker";
    networking.networkNamespace = "exo";
    healthCheck = { intervalSec = 1; timeoutSec = 1; failures = 2; };
    hardware.preferredAccelerator = "cpu";
    gateway.enable = false;
  };
}
"""


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with booted_guest(MODULE, "exo-netns") as machine:
        yield machine


def start(guest: Guest, *units: str) -> None:
    done = guest.run(["systemctl", "start", *units], check=False, timeout=90)
    assert done.returncode == 0, unit_journal(guest, "exo-netns") + unit_journal(guest, units[0])


def lo_flags(guest: Guest) -> list[str]:
    done = guest.run(["ip", "-j", "-n", "exo", "link", "show", "lo"])
    flags: list[str] = json.loads(done.stdout)[0]["flags"]
    return flags


def test_a_namespace_made_before_the_unit_gets_its_loopback_up(guest: Guest) -> None:
    # as an admin (or an earlier boot) would have left it: made by hand, loopback DOWN
    guest.run(["ip", "netns", "add", "exo"])
    assert "UP" not in lo_flags(guest)
    start(guest, "exo-worker.service")
    assert unit_props(guest, "exo-netns", "ActiveState")["ActiveState"] == "active"
    assert "UP" in lo_flags(guest)
    props = unit_props(guest, "exo-worker", "ActiveState", "StatusText")
    assert props["ActiveState"] == "active", props  # READY came: the API answered on lo


def test_the_namespace_outlives_its_unit(guest: Guest) -> None:
    guest.run(
        ["ip", "-n", "exo", "link", "add", "admin0", "type", "veth", "peer", "name", "admin1"]
    )
    guest.run(["systemctl", "stop", "exo-netns.service"])
    assert "exo" in guest.run(["ip", "netns", "list"]).stdout
    assert "admin0" in guest.run(["ip", "-n", "exo", "link", "show"]).stdout
    start(guest, "exo-netns.service")
    assert "UP" in lo_flags(guest)


def test_a_fresh_namespace_is_made_with_loopback_up(guest: Guest) -> None:
    guest.run(["systemctl", "stop", "exo-worker.service", "exo-netns.service"])
    guest.run(["ip", "netns", "delete", "exo"])
    start(guest, "exo-worker.service")
    assert "UP" in lo_flags(guest)
    assert unit_props(guest, "exo-worker", "ActiveState")["ActiveState"] == "active"
