"""exo-api.service next to the node unit, and the node's interface restriction, under a real
systemd 257 (a second nspawn guest, booted the same way as the node-unit tier's).

The module sets ``gateway.listenAddress = "0.0.0.0"`` with an API key file and
``networking.bondInterface = "bond0"``. Before anything starts, the test gives the guest's
network namespace two veth links to a "peer" namespace: ``bond0`` (the configured cluster
interface) and ``eth9`` (any other interface). Clients and peers speak from that namespace,
so traffic really arrives over each interface. The interface restriction is observed where
EXO runs: the units are installed unchanged, and the program at the EXO package's path (the
supervisor's child, in the node unit's cgroup and sandbox) sends the datagrams EXO's traffic
would before it starts the EXO test double (``EXO_NET_PROBES``, tests/systemd/fake_exo.py).
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.systemd.guest import Guest
from tests.systemd.harness import (
    AS_EXO,
    booted_guest,
    http,
    sandbox_report,
    unit_journal,
    wait_until,
)
from tests.systemd.harness import unit_props as props

pytestmark = pytest.mark.systemd

NODE = "exo-worker.service"
GATEWAY = "exo-api.service"
API = 52415
PORT = 52417
KEY_FILE = "/etc/exo-api-keys"
GATEWAY_EXPOSURE_LIMIT = 1.5
NODE_EXPOSURE_LIMIT = 2.0
PEER = ("ip", "netns", "exec", "peer")
# the guest's side of each link, and the peer namespace's address on it
LINKS = {"bond0": ("10.98.0.1", "10.98.0.2"), "eth9": ("10.98.1.1", "10.98.1.2")}
DISCOVERY_GROUP = "ff12::e0a1:de89"  # EXO's discovery multicast group
PROBES = " ".join(
    [
        "lo=127.0.0.1:9",
        *(f"{name}={peer}:9" for name, (_, peer) in LINKS.items()),
        *(f"{name}-v6=[{DISCOVERY_GROUP}%{name}]:52416" for name in LINKS),
    ]
)

MODULE = f"""
{{ pkgs, ... }}: {{
  services.exo = {{
    enable = true;
    mode = "worker";
    # the double listens on loopback unless told; EXO's API listens on every address
    extraArgs = [ "--bind" "0.0.0.0" ];
    healthCheck = {{ intervalSec = 1; timeoutSec = 1; failures = 2; }};
    environmentVariables = {{
      EXO_SANDBOX_REPORT = "/run/exo/sandbox.json";
      EXO_NET_PROBES = "{PROBES}";
    }};
    networking.bondInterface = "bond0";
    gateway = {{ listenAddress = "0.0.0.0"; apiKeysFile = "{KEY_FILE}"; }};
  }};
}}
"""

LINK_SETUP = """
set -e
ip netns add peer
ip -n peer link set lo up
ip link add bond0 type veth peer name pb0 netns peer
ip link add eth9 type veth peer name pe9 netns peer
ip addr add 10.98.0.1/24 dev bond0
ip addr add 10.98.1.1/24 dev eth9
ip -n peer addr add 10.98.0.2/24 dev pb0
ip -n peer addr add 10.98.1.2/24 dev pe9
ip link set bond0 up
ip link set eth9 up
ip -n peer link set pb0 up
ip -n peer link set pe9 up
"""


def _key() -> str:
    return secrets.token_hex(16)


KEYS = {"first": _key(), "second": _key()}


def write_keys(guest: Guest, text: str) -> None:
    """Replace the key file the way secrets managers do (new file, then rename), root:exo 0640."""
    (guest.root / f"{KEY_FILE}.new".lstrip("/")).write_text(text)
    guest.run(
        [
            "sh",
            "-c",
            f"chown root:exo {KEY_FILE}.new && chmod 0640 {KEY_FILE}.new "
            f"&& mv {KEY_FILE}.new {KEY_FILE}",
        ]
    )


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with booted_guest(MODULE, "exo-gw-test") as machine:
        machine.run(["sh", "-c", LINK_SETUP])
        write_keys(machine, f"first:{KEYS['first']}\n")

        # the node's pre-flight wants a usable (no longer tentative) IPv6 link-local address
        def link_local_ready() -> bool:
            return all(
                machine.run(
                    ["ip", "-6", "-o", "addr", "show", "dev", name, "scope", "link", "-tentative"]
                ).stdout.strip()
                != ""
                for name in LINKS
            )

        wait_until(link_local_ready, 20, "IPv6 link-local addresses on the veth links")
        yield machine


def gateway(guest: Guest, path: str, key: str | None = None, via: str = "bond0") -> tuple[int, str]:
    """A client in the peer namespace asks the gateway over the link ``via``."""
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    address = LINKS[via][0]
    return http(guest, f"http://{address}:{PORT}{path}", headers=headers, prefix=PEER)


def _active(guest: Guest, unit: str) -> bool:
    return props(guest, unit, "ActiveState")["ActiveState"] == "active"


@pytest.fixture
def serving(guest: Guest) -> Guest:
    """The guest with the node and the gateway active: started here where no earlier test
    (or one that stopped them) left them running, so each test also runs alone."""
    if not (_active(guest, NODE) and _active(guest, GATEWAY)):
        guest.run(["systemctl", "reset-failed", NODE, GATEWAY], check=False)
        guest.run(["systemctl", "start", "exo.target"], timeout=90)
        wait_until(lambda: _active(guest, GATEWAY), 60, GATEWAY, guest, GATEWAY)
    return guest


def use_keys(guest: Guest, name: str) -> None:
    """Make the gateway's loaded key set the single key ``name`` (a reload when it is not)."""
    if gateway(guest, "/v1/models", key=KEYS[name])[0] == 200 and all(
        gateway(guest, "/v1/models", key=KEYS[other])[0] == 401 for other in KEYS if other != name
    ):
        return
    write_keys(guest, f"{name}:{KEYS[name]}\n")
    guest.run(["systemctl", "reload", GATEWAY])


def test_rendered_units_verify_cleanly(guest: Guest) -> None:
    units = [f"/etc/systemd/system/{u}" for u in (NODE, GATEWAY, "exo.target")]
    done = guest.run(["systemd-analyze", "verify", *units], check=False)
    assert (done.returncode, done.stdout.strip(), done.stderr.strip()) == (0, "", ""), done


def test_gateway_starts_after_the_node_is_ready(guest: Guest) -> None:
    gw = props(guest, GATEWAY, "After", "Requires", "Type", "PartOf")
    assert NODE in gw["After"].split()
    assert NODE in gw["Requires"].split()
    assert (gw["Type"], gw["PartOf"]) == ("notify", "exo.target")
    guest.run(["systemctl", "stop", "exo.target"], timeout=60)  # a start from stopped
    guest.run(["systemctl", "start", "--no-block", "exo.target"])
    wait_until(lambda: _active(guest, GATEWAY), 60, GATEWAY, guest, GATEWAY)
    assert _active(guest, NODE)
    node_ready = int(props(guest, NODE, "ActiveEnterTimestampMonotonic").popitem()[1])
    started = props(
        guest, GATEWAY, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic"
    )
    gw_exec = int(started["ExecMainStartTimestampMonotonic"])
    gw_ready = int(started["ActiveEnterTimestampMonotonic"])
    # its process was started only once the node was active (after the supervisor's READY=1),
    # and systemd called it started only after the gateway's own READY=1 (once it listened)
    assert 0 < node_ready <= gw_exec < gw_ready, (node_ready, gw_exec, gw_ready)
    # it runs on uvloop's event loop, as on NixOS (under MemoryDenyWriteExecute=true)
    pid = props(guest, GATEWAY, "MainPID")["MainPID"]
    assert "uvloop" in guest.run(["cat", f"/proc/{pid}/maps"]).stdout
    text = unit_journal(guest, GATEWAY)
    assert text.index("gateway listening on http://0.0.0.0:52417 (1 API keys)") < text.index(
        "Started exo-api.service"
    ), text


def test_requests_need_a_key(serving: Guest) -> None:
    guest = serving
    use_keys(guest, "first")
    status, body = gateway(guest, "/v1/models")
    assert status == 401, body
    assert json.loads(body)["error"]["type"] == "authentication_error"
    assert gateway(guest, "/v1/models", key=_key())[0] == 401
    assert gateway(guest, "/health")[0] == 200  # public path
    status, body = gateway(guest, "/v1/models", key=KEYS["first"])
    assert status == 200, body
    direct = http(guest, f"http://127.0.0.1:{API}/v1/models")
    # the double's answer, passed through (EXO stamps `created` anew on each answer)
    assert direct[0] == 200
    timeless = [{**m, "created": None} for m in json.loads(body)["data"]]
    assert timeless == [{**m, "created": None} for m in json.loads(direct[1])["data"]]
    assert json.loads(body)["data"], body


def _main_pid(guest: Guest) -> str:
    return props(guest, GATEWAY, "MainPID")["MainPID"]


def test_reload_switches_keys(serving: Guest) -> None:
    guest = serving
    use_keys(guest, "first")
    pid = _main_pid(guest)
    write_keys(guest, f"second:{KEYS['second']}\n")
    guest.run(["systemctl", "reload", GATEWAY])
    assert gateway(guest, "/v1/models", key=KEYS["second"])[0] == 200
    assert gateway(guest, "/v1/models", key=KEYS["first"])[0] == 401
    assert _main_pid(guest) == pid
    assert "API keys reloaded from /etc/exo-api-keys: 1 keys" in unit_journal(guest, GATEWAY)


def test_garbled_key_file_fails_the_reload_and_keeps_the_keys(serving: Guest) -> None:
    guest = serving
    use_keys(guest, "second")
    pid = _main_pid(guest)
    write_keys(guest, "ci:tooshort\n")
    done = guest.run(["systemctl", "reload", GATEWAY], check=False)
    assert done.returncode != 0, done
    assert "exo-api.service" in done.stderr  # systemctl says the reload failed
    text = unit_journal(guest, GATEWAY)
    assert re.search(r"line 1: key 'ci' is shorter than 16 characters", text), text
    assert _active(guest, GATEWAY)
    assert _main_pid(guest) == pid
    assert gateway(guest, "/v1/models", key=KEYS["second"])[0] == 200
    assert gateway(guest, "/v1/models", key="tooshort")[0] == 401
    write_keys(guest, f"second:{KEYS['second']}\n")


def test_gateway_sees_only_pseudo_devices(serving: Guest) -> None:
    guest = serving
    pid = _main_pid(guest)
    # /proc/PID/root is the gateway's own view of the file system (its mount namespace)
    seen = set(guest.run(["ls", "-A", f"/proc/{pid}/root/dev"]).stdout.split())
    pseudo = {"null", "zero", "full", "random", "urandom", "tty", "ptmx", "pts", "shm"}
    pseudo |= {"mqueue", "hugepages", "stdin", "stdout", "stderr", "fd", "core", "log", "char"}
    assert seen and seen <= pseudo, seen - pseudo
    host = set(guest.run(["ls", "-A", "/dev"]).stdout.split())
    assert "net" in host and "net" not in seen  # /dev/net/tun exists, but not for it
    nodes = guest.run(
        ["find", f"/proc/{pid}/root/dev", "-type", "c", "-exec", "stat", "-c", "%n %t", "{}", "+"]
    ).stdout.splitlines()
    # the character devices left: null/zero/full/random/urandom (major 1), tty and ptmx (5),
    # pseudo-terminals (136, hex 88, under /dev/pts)
    majors = {line.split()[-1] for line in nodes}
    assert nodes and majors <= {"1", "5", "88"}, nodes
    assert all("/dev/pts/" in line for line in nodes if line.endswith(" 88")), nodes
    policy = props(guest, GATEWAY, "DevicePolicy", "PrivateDevices")
    assert policy == {"DevicePolicy": "closed", "PrivateDevices": "yes"}


def exposure(guest: Guest, unit: str) -> float:
    out = guest.run(["systemd-analyze", "security", "--no-pager", unit]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    record = os.environ.get("EXO_NIXOS_EXPOSURE_RECORD")
    if record:
        Path(f"{record}.{unit}").write_text(out)
    return float(match.group(1))


def test_exposure_is_low(guest: Guest) -> None:
    figure = exposure(guest, GATEWAY)
    assert figure <= GATEWAY_EXPOSURE_LIMIT, figure
    # the node unit with its interface restriction, for the record (and the same bound as
    # the node-unit tier's)
    assert exposure(guest, NODE) <= NODE_EXPOSURE_LIMIT


def test_node_may_use_only_the_bond_and_loopback(serving: Guest) -> None:
    guest = serving
    allowed = props(guest, NODE, "RestrictNetworkInterfaces")["RestrictNetworkInterfaces"]
    assert set(allowed.split()) == {"lo", "bond0"}, allowed
    # sent by the program EXO would be, inside the running node unit
    sent = sandbox_report(guest)["net"]
    assert sent == {
        "lo": "ok",
        "bond0": "ok",
        "eth9": "EPERM",
        "bond0-v6": "ok",
        "eth9-v6": "EPERM",
    }
    # control: the same datagrams from the same user outside the unit all leave
    outside = guest.run(
        [
            *AS_EXO,
            "env",
            f"EXO_NET_PROBES={PROBES}",
            "PYTHONPATH=/opt/exo-nixos",
            "python3",
            "-c",
            "import json; from tests.systemd.fake_exo import _net_probes; "
            "print(json.dumps(_net_probes()))",
        ]
    )
    assert set(json.loads(outside.stdout).values()) == {"ok"}, outside.stdout
    # inbound: a peer reaches EXO's API over the bond, not over the other link (the packets
    # are dropped, so the connection times out), while the unrestricted gateway answers on both
    assert http(guest, f"http://{LINKS['bond0'][0]}:{API}/node_id", prefix=PEER)[0] == 200
    blocked = http(guest, f"http://{LINKS['eth9'][0]}:{API}/node_id", prefix=PEER, timeout=2)
    assert blocked[0] == 0, blocked
    assert gateway(guest, "/health", via="eth9")[0] == 200


def test_stopping_the_target_stops_the_gateway(serving: Guest) -> None:
    guest = serving
    guest.run(["systemctl", "stop", "exo.target"], timeout=60)
    for unit in (GATEWAY, NODE):
        wait_until(
            lambda u=unit: props(guest, u, "ActiveState")["ActiveState"] == "inactive",  # type: ignore[misc]
            40,
            f"{unit} to stop",
            guest,
            unit,
        )
        assert props(guest, unit, "Result")["Result"] == "success"
    left = guest.run(["pgrep", "-u", "exo"], check=False)
    assert left.stdout.strip() == "", f"processes of user exo left: {left.stdout}"
