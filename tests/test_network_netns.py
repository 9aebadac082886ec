"""Real network namespaces and veth pairs: what ``net`` sees and what the watcher reports.

Needs root and iproute2; skipped with the reason otherwise.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.netns import LineReader, Netns, make_netns

pytestmark = pytest.mark.netns


@pytest.fixture
def ns() -> Iterator[Netns]:
    yield from make_netns()


def write_config(tmp_path: Path, **networking: object) -> str:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schemaVersion": 1, "networking": networking}))
    return str(path)


def net_json(ns: Netns, config: str) -> dict[str, object]:
    result = ns.python("-m", "exo_nixos", "net", "--json", "--config", config)
    assert result.returncode in (0, 1), result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def mcast(ns: Netns, send: str, recv: str) -> str:
    return ns.python("-m", "tests.network_mcast_probe", send, recv, "52413").stdout.strip()


def test_link_local_and_multicast_on_a_real_link(ns: Netns, tmp_path: Path) -> None:
    ns.veth("a0", "a1")
    address = ns.wait_link_local("a0")
    config = write_config(tmp_path, bondInterface="a0", rdmaEnabled=False)
    data = net_json(ns, config)
    cluster = data["cluster"]
    assert isinstance(cluster, dict)
    assert cluster["name"] == "a0" and cluster["ok"] is True, cluster
    interfaces = data["interfaces"]
    assert isinstance(interfaces, list)
    a0 = next(i for i in interfaces if i["name"] == "a0")
    assert a0["link_up"] and a0["multicast"]
    assert a0["link_local"][0].replace(":", "") in address or a0["link_local"][0].startswith("fe80")
    assert mcast(ns, "a0", "a1") == "received", "discovery's multicast must work when ok"


def test_ipv6_disabled_and_no_link_local_break_discovery(ns: Netns, tmp_path: Path) -> None:
    ns.veth("b0", "b1")
    ns.wait_link_local("b1")
    ns.write_sysctl("net.ipv6.conf.b0.disable_ipv6", "1")
    data = net_json(ns, write_config(tmp_path, bondInterface="b0", rdmaEnabled=False))
    cluster = data["cluster"]
    assert isinstance(cluster, dict) and cluster["ok"] is False
    assert any("IPv6 is disabled on cluster interface b0" in p for p in cluster["problems"])
    assert mcast(ns, "b0", "b1").startswith("failed"), "the problem is real"

    ns.veth("c0", "c1")
    ns.ip("link", "set", "c0", "down")
    ns.ip("link", "set", "c0", "addrgenmode", "none")
    ns.ip("link", "set", "c0", "up")
    ns.wait_link_local("c1")
    data = net_json(ns, write_config(tmp_path, bondInterface="c0", rdmaEnabled=False))
    cluster = data["cluster"]
    assert isinstance(cluster, dict) and cluster["ok"] is False
    assert any("no usable IPv6 link-local" in p for p in cluster["problems"])
    assert mcast(ns, "c0", "c1").startswith("failed"), "the problem is real"


def test_multicast_flag_off_is_a_warning_only(ns: Netns, tmp_path: Path) -> None:
    ns.veth("d0", "d1")
    ns.wait_link_local("d0")
    ns.wait_link_local("d1")
    ns.ip("link", "set", "d0", "multicast", "off")
    ns.ip("link", "set", "d1", "multicast", "off")
    data = net_json(ns, write_config(tmp_path, bondInterface="d0", rdmaEnabled=False))
    cluster = data["cluster"]
    assert isinstance(cluster, dict) and cluster["ok"] is True
    assert any("MULTICAST flag off" in w for w in cluster["warnings"])
    # Why only a warning: the kernel still delivers IPv6 multicast over the link.
    assert mcast(ns, "d0", "d1") == "received"


def test_watcher_sees_link_loss_recovery_and_failover(ns: Netns, tmp_path: Path) -> None:
    ns.veth("e0", "e1")
    ns.veth("f0", "f1")
    config = write_config(tmp_path, bondInterface="e0", backupInterface="f0")
    reader = LineReader(
        ns.popen(
            sys.executable,
            "-m",
            "exo_nixos",
            "net",
            "--watch",
            "--json",
            "--config",
            config,
        )
    )
    try:
        first = [json.loads(reader.line()) for _ in range(2)]
        assert {(e["interface"], e["up"], e["initial"]) for e in first} == {
            ("e0", True, True),
            ("f0", True, True),
        }
        ns.ip("link", "set", "e1", "down")  # e0 loses its carrier
        event = json.loads(reader.line())
        assert (event["interface"], event["up"], event["initial"]) == ("e0", False, False)
        assert (event["health"], event["active"], event["failover"]) == ("degraded", "f0", True)
        assert "failed over to backup f0" in event["message"]

        ns.ip("link", "set", "e1", "up")
        event = json.loads(reader.line())
        assert (event["interface"], event["up"], event["health"]) == ("e0", True, "up")

        ns.ip("link", "set", "f0", "down")  # administratively down
        event = json.loads(reader.line())
        assert (event["interface"], event["up"], event["health"]) == ("f0", False, "up")

        ns.ip("link", "del", "e0")  # the kernel reports it down, then gone
        event = json.loads(reader.line())
        assert (event["interface"], event["up"], event["health"]) == ("e0", False, "down")
        if event["operstate"] != "absent":
            event = json.loads(reader.line())
        assert (event["interface"], event["operstate"], event["health"]) == ("e0", "absent", "down")
    finally:
        reader.stop()


def test_watcher_callback_picks_up_a_link_created_later(ns: Netns) -> None:
    reader = LineReader(ns.popen(sys.executable, "-m", "tests.network_watch_probe", "g0", "lo"))
    try:
        initial = [json.loads(reader.line()) for _ in range(3)]
        by_name = {e["name"]: e for e in initial if "name" in e}
        assert by_name["g0"] == {
            "name": "g0",
            "up": False,
            "present": False,
            "initial": True,
            "states": by_name["g0"]["states"],
        }
        assert by_name["lo"]["up"] is True
        assert {"started": True} in initial
        ns.veth("g0", "g1")  # created down, then set up: two changes
        event = json.loads(reader.line())
        assert (event["name"], event["up"], event["present"], event["initial"]) == (
            "g0",
            False,
            True,
            False,
        )
        event = json.loads(reader.line())
        assert (event["name"], event["up"], event["present"]) == ("g0", True, True)
        assert event["states"] == {"g0": True, "lo": True}
    finally:
        err = reader.stop()
    assert "Traceback" not in err, err


def test_a_failing_callback_does_not_stop_the_watcher(ns: Netns) -> None:
    reader = LineReader(
        ns.popen(sys.executable, "-m", "tests.network_watch_probe", "--fail-first", "h0")
    )
    try:
        # The first report (h0 absent) made the callback fail, so nothing was printed.
        assert json.loads(reader.line()) == {"started": True}
        ns.veth("h0", "h1")
        event = json.loads(reader.line())
        assert (event["name"], event["present"]) == ("h0", True)
    finally:
        err = reader.stop()
    assert "link watcher callback failed for h0 is down (absent)" in err


def test_watch_follows_the_chosen_interface_when_none_is_configured(
    ns: Netns, tmp_path: Path
) -> None:
    ns.veth("p0", "p1")
    ns.wait_link_local("p0")
    ns.wait_link_local("p1")
    config = write_config(tmp_path, rdmaEnabled=False)
    reader = LineReader(
        ns.popen(sys.executable, "-m", "exo_nixos", "net", "--watch", "--config", config)
    )
    try:
        assert reader.line() == "p0 is up; up: cluster interface p0 up\n"
        ns.ip("link", "set", "p1", "down")
        assert reader.line() == (
            "p0 went down (lowerlayerdown); down: cluster interface p0 down (lowerlayerdown); "
            "no backup interface\n"
        )
    finally:
        reader.stop()


def test_watcher_recovers_from_a_failed_netlink_socket(ns: Netns) -> None:
    ns.veth("s0", "s1")
    reader = LineReader(
        ns.popen(sys.executable, "-m", "tests.network_watch_probe", "--close-socket", "s0")
    )
    try:
        lines = [json.loads(reader.line()) for _ in range(3)]
        assert lines[1:] == [{"started": True}, {"closed": True}]
        assert (lines[0]["name"], lines[0]["up"]) == ("s0", True)
        ns.ip("link", "set", "s1", "down")
        event = json.loads(reader.line())
        assert (event["name"], event["up"]) == ("s0", False)
        ns.ip("link", "set", "s1", "up")
        event = json.loads(reader.line())
        assert (event["name"], event["up"]) == ("s0", True)
    finally:
        err = reader.stop()
    assert "re-reading all links" in err


def test_capture_of_a_live_namespace_reads_back_the_same(ns: Netns, tmp_path: Path) -> None:
    ns.veth("k0", "k1")
    ns.wait_link_local("k0")
    ns.ip("link", "set", "k1", "multicast", "off")
    ns.write_sysctl("net.ipv6.conf.k1.disable_ipv6", "1")
    config = write_config(tmp_path, bondInterface="k0", rdmaEnabled=False)
    dest = tmp_path / "tree"
    captured = ns.python("-m", "exo_nixos", "net", "--capture", str(dest))
    assert captured.returncode == 0, captured.stderr
    live = net_json(ns, config)
    replay = json.loads(
        ns.python(
            "-m", "exo_nixos", "net", "--json", "--config", config, "--root", str(dest)
        ).stdout
    )
    assert {**live, "root": ""} == {**replay, "root": ""}
    k1 = next(i for i in replay["interfaces"] if i["name"] == "k1")
    assert (k1["multicast"], k1["ipv6_disabled"]) == (False, True)
