"""One EXO node per GPU, on real network namespaces: each node its own address on the link.

The host ("node") has the cluster link ``eth0``, a veth whose other end is another host
("far") on the same segment. Each of N instances gets its namespace and a macvlan (bridge
mode) on ``eth0`` from ``exo_nixos.network.instance_net``, named ``eth0`` inside; the host gets
``exo-host`` to reach them. EXO's discovery (IPv6 multicast to ff12::e0a1:de89) from each
instance must reach the far host, the sibling instances and the host's own link; the test
double of EXO runs in each instance on one API port, reachable at each instance's own address.

Needs root, iproute2 and macvlan; run with ``flock /tmp/netns.lock``.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.exo_double.fixture import free_port
from tests.netns import LineReader, Netns, make_netns

pytestmark = pytest.mark.netns

INSTANCES = ("gpu0", "gpu1", "gpu2")
CONFIGURED = {"gpu2": "10.55.0.12/24"}  # one node with a configured address, the others default
FAR_ADDRESSES = ("169.254.200.1/16", "10.55.0.1/24")


@dataclass
class Segment:
    node: Netns
    far: Netns
    instances: dict[str, Netns]
    addresses: dict[str, str]  # IPv4 of each instance, no prefix


def _probe(ns: Netns, *args: str) -> subprocess.CompletedProcess[str]:
    return ns.python("-m", "tests.instance_net_probe", *args)


def _ipv4(ns: Netns, link: str) -> str:
    out = ns.run("ip", "-4", "-o", "address", "show", "dev", link).stdout
    found = re.search(r"inet (\d+\.\d+\.\d+\.\d+)/", out)
    assert found, out
    return found.group(1)


@pytest.fixture(scope="module")
def segment() -> Iterator[Segment]:
    node_gen, far_gen = make_netns(), make_netns()
    node, far = next(node_gen), next(far_gen)
    prefix = f"{node.name}-"
    made: list[str] = []
    try:
        node.ip("link", "add", "eth0", "type", "veth", "peer", "name", "peer0")
        node.ip("link", "set", "peer0", "netns", far.name)
        node.ip("link", "set", "eth0", "up")
        far.ip("link", "set", "peer0", "up")
        for address in FAR_ADDRESSES:
            far.ip("address", "add", address, "dev", "peer0")
        instances: dict[str, Netns] = {}
        for name in INSTANCES:
            namespace = prefix + name
            extra = [CONFIGURED[name]] if name in CONFIGURED else []
            made.append(namespace)
            # made from here, in the host's mount namespace, as exo-netns@.service does: `ip
            # netns add` inside `ip netns exec` would mount it in that command's private mount
            # namespace only (instance_up then finds it there and goes on)
            subprocess.run(["ip", "netns", "add", namespace], check=True)
            result = _probe(node, "up", "eth0", name, namespace, *extra)
            assert result.returncode == 0, result.stderr
            instances[name] = Netns(namespace)
        result = _probe(node, "host", "eth0", *CONFIGURED.values())
        assert result.returncode == 0, result.stderr
        for ns in instances.values():
            ns.wait_link_local("eth0")
        far.wait_link_local("peer0")
        node.wait_link_local("exo-host")
        addresses = {name: _ipv4(ns, "eth0") for name, ns in instances.items()}
        yield Segment(node, far, instances, addresses)
    finally:
        for namespace in made:
            subprocess.run(["ip", "netns", "del", namespace], capture_output=True, check=False)
        for gen in (node_gen, far_gen):
            next(gen, None)  # runs make_netns' finalizer: the namespace is deleted


def test_each_instance_has_its_own_link_and_addresses(segment: Segment) -> None:
    macs = set()
    for name, ns in segment.instances.items():
        link = json.loads(ns.run("ip", "-j", "-d", "link", "show", "eth0").stdout)[0]
        assert link["linkinfo"]["info_kind"] == "macvlan"
        assert link["linkinfo"]["info_data"]["mode"] == "bridge"
        macs.add(link["address"])
        assert link["address"][1] in "26ae", "a locally administered address"
        if name in CONFIGURED:
            assert segment.addresses[name] == CONFIGURED[name].split("/")[0]
        else:
            assert segment.addresses[name].startswith("169.254.")
    assert len(macs) == len(INSTANCES)
    assert len(set(segment.addresses.values())) == len(INSTANCES)


def test_discovery_multicast_from_each_instance_reaches_the_host_siblings_and_far(
    segment: Segment,
) -> None:
    port = str(free_port())
    listeners: dict[str, tuple[LineReader, int]] = {}
    everyone = len(INSTANCES)
    wanted = {"far": (segment.far, "peer0", everyone), "host": (segment.node, "exo-host", everyone)}
    for name, ns in segment.instances.items():
        wanted[name] = (ns, "eth0", everyone - 1)
    for who, (ns, link, count) in wanted.items():
        reader = LineReader(
            ns.popen(
                sys.executable, "-m", "tests.instance_net_probe", "listen", link, port, str(count)
            )
        )
        assert reader.line().strip() == "ready"
        listeners[who] = (reader, count)
    for name, ns in segment.instances.items():
        assert _probe(ns, "send", "eth0", port, name).returncode == 0
    for who, (reader, count) in listeners.items():
        got = sorted(reader.line(timeout=15).strip() for _ in range(count))
        expected = sorted(n for n in INSTANCES if n != who)
        assert got == expected, f"{who} received {got}"
        reader.stop()


def test_the_api_port_of_each_instance_answers_at_its_own_address(segment: Segment) -> None:
    port = free_port()
    doubles = []
    try:
        for name, ns in segment.instances.items():
            doubles.append(
                ns.popen(
                    sys.executable,
                    "-m",
                    "tests.exo_double",
                    "--api-port",
                    str(port),
                    "--node-id",
                    name,
                )
            )
        for name in INSTANCES:
            url = f"http://{segment.addresses[name]}:{port}/node_id"
            for ns, why in ((segment.far, "the other host"), (segment.node, "the host (exo-host)")):
                deadline = time.monotonic() + 20
                while True:
                    result = _probe(ns, "get", url)
                    if result.returncode == 0 or time.monotonic() > deadline:
                        break
                    time.sleep(0.3)
                assert result.returncode == 0, f"{why} cannot reach {name}: {result.stderr}"
                assert json.loads(result.stdout) == name
    finally:
        for proc in doubles:
            proc.terminate()
            proc.communicate(timeout=20)


def test_instance_up_is_idempotent(segment: Segment) -> None:
    namespace = segment.instances["gpu0"].name
    result = _probe(segment.node, "up", "eth0", "gpu0", namespace)
    assert result.returncode == 0, result.stderr
    segment.instances["gpu0"].wait_link_local("eth0")
    assert _ipv4(segment.instances["gpu0"], "eth0") == segment.addresses["gpu0"]


def test_instance_net_without_node_per_gpu_is_one_line(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({"schemaVersion": 1}))
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "exo_nixos",
            "instance-net",
            "up",
            "--config",
            str(path),
            "--instance",
            "gpu0",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and "hardware.nodePerGpu is off" in result.stderr


def _instance_checks(ns: Netns, namespace: str) -> dict[str, dict[str, str]]:
    code = (
        "import json, sys; from pathlib import Path;"
        "from exo_nixos.hardware.instances import Instance;"
        "from exo_nixos.network import instance_checks as c;"
        "i = Instance('gpu0', (0,), 1);"
        f"r = [c.check_namespace(i, Path('/run/netns'), {namespace!r}), c.check_link(i, 'eth0')];"
        "print(json.dumps({x.check: x.to_json() for x in r}))"
    )
    result = ns.python("-c", code)
    assert result.returncode == 0, result.stderr
    data: dict[str, dict[str, str]] = json.loads(result.stdout)
    return data


def test_preflight_sees_the_instances_namespace_and_link(segment: Segment) -> None:
    gpu0 = segment.instances["gpu0"]
    inside = _instance_checks(gpu0, gpu0.name)
    assert inside["gpu0 namespace"]["status"] == "ok"
    assert inside["gpu0 link"]["status"] == "ok"
    assert segment.addresses["gpu0"] in inside["gpu0 link"]["reason"]
    # the host's namespace is not the node's, and has no eth0 of the node's kind there
    outside = _instance_checks(segment.far, gpu0.name)
    assert outside["gpu0 namespace"]["status"] == "fail"
    assert outside["gpu0 link"]["status"] == "fail"
