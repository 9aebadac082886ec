"""Link health verdicts and netlink message decoding (no netlink needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import default_config, parse_config
from exo_nixos.network import LinkMonitor, LinkState, LinkWatcher, link_health
from exo_nixos.network.watch import (
    IFF_LOWER_UP,
    IFF_UP,
    RTM_DELLINK,
    RTM_NEWLINK,
    state_from_message,
)

FIXTURES = Path(__file__).parent / "fixtures" / "network"


def up(name: str) -> LinkState:
    return LinkState(name, True, True, "up", 3)


def down(name: str, operstate: str = "lowerlayerdown") -> LinkState:
    return LinkState(name, True, False, operstate, 4)


def test_primary_up() -> None:
    health = link_health({"bond0": up("bond0")}, ["bond0"], "eth2")
    assert (health.state, health.active, health.failover) == ("up", "bond0", False)


def test_failover_to_backup() -> None:
    states = {"bond0": down("bond0"), "eth2": up("eth2")}
    health = link_health(states, ["bond0"], "eth2")
    assert (health.state, health.active, health.failover) == ("degraded", "eth2", True)
    assert health.message == (
        "cluster interface bond0 down (lowerlayerdown); failed over to backup eth2"
    )


def test_everything_down() -> None:
    states = {"bond0": LinkState.absent("bond0"), "eth2": down("eth2", "down")}
    health = link_health(states, ["bond0"], "eth2")
    assert (health.state, health.active) == ("down", None)
    assert "bond0 down (absent)" in health.message and "backup eth2 down (down)" in health.message
    alone = link_health({"bond0": down("bond0")}, ["bond0"])
    assert alone.state == "down" and "no backup interface" in alone.message


def test_extra_interfaces() -> None:
    states = {"bond0": up("bond0"), "tb0": down("tb0")}
    assert link_health(states, ["bond0", "tb0"]).state == "degraded"
    only_extra = link_health({"bond0": down("bond0"), "tb0": up("tb0")}, ["bond0", "tb0"])
    assert (only_extra.state, only_extra.active) == ("degraded", "tb0")
    assert link_health({}, []).state == "up"


def message(kind: int, name: str | None, flags: int, operstate: str) -> dict[str, Any]:
    msg: dict[str, Any] = {"header": {"type": kind}, "flags": flags, "index": 7}
    if name is not None:
        msg["ifname"] = name
    msg["operstate"] = operstate
    return msg


def test_state_from_message() -> None:
    running = state_from_message(message(RTM_NEWLINK, "eth0", IFF_UP | IFF_LOWER_UP, "UP"))
    assert running == LinkState("eth0", True, True, "up", 7)
    no_carrier = state_from_message(message(RTM_NEWLINK, "eth0", IFF_UP, "DOWN"))
    assert no_carrier is not None and not no_carrier.up
    unknown = state_from_message(message(RTM_NEWLINK, "tun0", IFF_UP | IFF_LOWER_UP, "UNKNOWN"))
    assert unknown is not None and unknown.up
    gone = state_from_message(message(RTM_DELLINK, "eth0", 0, "DOWN"))
    assert gone == LinkState.absent("eth0")
    assert state_from_message(message(RTM_NEWLINK, None, 0, "UP")) is None


def test_watcher_needs_names() -> None:
    with pytest.raises(ValueError, match="at least one"):
        LinkWatcher([])


def test_monitor_for_config(tmp_path: Path) -> None:
    configured = parse_config(
        {
            "schemaVersion": 1,
            "networking": {
                "bondInterface": "bond0",
                "extraInterfaces": ["tb0"],
                "backupInterface": "eno1",
            },
        }
    )
    monitor = LinkMonitor.for_config(configured, root=tmp_path)
    assert monitor is not None
    assert (monitor.interfaces, monitor.backup) == (["bond0", "tb0"], "eno1")
    assert monitor.watcher.names == ["bond0", "tb0", "eno1"]
    assert monitor.health.state == "down", "nothing is known up before the watch starts"
    chosen = LinkMonitor.for_config(default_config(), root=FIXTURES / "bond-8023ad")
    assert chosen is not None and chosen.interfaces == ["bond0"]
    assert LinkMonitor.for_config(default_config(), root=tmp_path) is None
    with pytest.raises(ValueError, match="cluster interface"):
        LinkMonitor([])
