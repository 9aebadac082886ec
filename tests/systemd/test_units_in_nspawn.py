"""The node unit, rendered from the evaluated module, under a real systemd 257 (nspawn guest).

One guest is booted for the module; the tests run in file order against it: start, status,
hardening, exposure, watchdog, crash-loop backoff, stop. Skipped with the reason where the
guest cannot be built or booted (not root, no systemd-nspawn/debootstrap, no nixpkgs lib).
The gateway and the interface restriction have their own guest
(test_gateway_and_interfaces_in_nspawn.py).
"""

from __future__ import annotations

import itertools
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.systemd.guest import Guest
from tests.systemd.harness import (
    AS_EXO,
    booted_guest,
    http,
    sandbox_report,
    unit_journal,
    unit_props,
)
from tests.systemd.harness import wait_until as _wait_until

pytestmark = pytest.mark.systemd

UNIT = "exo-worker"
API = 52415
EXPOSURE_LIMIT = 2.0

MODULE = """
{ pkgs, ... }: {
  services.exo = {
    enable = true;
    mode = "worker";
    # the double binds its API after 2 s, so "activating" is observable before READY
    extraArgs = [ "--slow-start" "2" ];
    healthCheck = { intervalSec = 1; timeoutSec = 1; failures = 2; };
    restart = { delaySec = 1; steps = 3; maxDelaySec = 10; };
    # CUDA is preferred, but the guest has no GPU: the pre-flight passes (it checks the
    # accelerator the supervisor will pick) and the supervisor falls back to the CPU variant
    hardware.packages = { cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; };
    hardware.preferredAccelerator = "cuda";
    environmentVariables.EXO_SANDBOX_REPORT = "/run/exo/sandbox.json";
    # this guest tests the node unit (the gateway has its own guest), and the exporter beside it
    gateway.enable = false;
    exporter.enable = true;
  };
}
"""


@pytest.fixture(scope="module")
def guest() -> Iterator[Guest]:
    with booted_guest(MODULE, "exo-test") as machine:
        # a device the exo user may open by its mode, so only DevicePolicy can refuse it
        machine.run(["chmod", "0666", "/dev/net/tun"])
        yield machine


@pytest.fixture
def running(guest: Guest) -> Guest:
    """The guest with the node active: started here when no earlier test (or one that
    stopped it) left it running, so each test also runs alone or in another order."""
    if show(guest, "ActiveState")["ActiveState"] != "active":
        guest.run(["systemctl", "reset-failed", f"{UNIT}.service"], check=False)
        guest.run(["systemctl", "start", "exo.target"], timeout=90)
        wait_until(lambda: show(guest, "ActiveState")["ActiveState"] == "active", 60, "active")
    return guest


def show(guest: Guest, *props: str) -> dict[str, str]:
    return unit_props(guest, f"{UNIT}.service", *props)


def wait_until(check: Any, timeout: float, what: str, guest: Guest | None = None) -> Any:
    return _wait_until(check, timeout, what, guest, f"{UNIT}.service")


def api_call(guest: Guest, path: str, body: dict[str, Any] | None = None) -> str:
    """HTTP to the node API from inside the guest (its own network namespace)."""
    status, text = http(guest, f"http://127.0.0.1:{API}{path}", body)
    assert status == 200, (path, status, text)
    return text


def journal(guest: Guest) -> str:
    return unit_journal(guest, f"{UNIT}.service")


def test_rendered_units_verify_cleanly(guest: Guest) -> None:
    units = [f"/etc/systemd/system/{UNIT}.service", "/etc/systemd/system/exo.target"]
    done = guest.run(["systemd-analyze", "verify", *units], check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", done.stdout
    assert done.stderr.strip() == "", done.stderr  # any warning fails


def test_node_reaches_active_only_after_ready(guest: Guest) -> None:
    guest.run(["systemctl", "stop", "exo.target"], timeout=60)  # a start from stopped
    wait_until(lambda: show(guest, "ActiveState")["ActiveState"] == "inactive", 60, "stopped")
    guest.run(["systemctl", "start", "--no-block", "exo.target"])
    states: list[str] = []

    def active() -> bool:
        states.append(show(guest, "ActiveState")["ActiveState"])
        return states[-1] == "active"

    wait_until(active, 60, f"{UNIT} to become active")
    assert "activating" in states, f"never seen activating before READY: {states}"
    # READY=1 came from the supervisor once the API answered; it answers now
    assert json.loads(api_call(guest, "/node_id"))
    props = show(guest, "Type", "NotifyAccess", "Result", "MainPID")
    assert props["Type"] == "notify"
    assert props["Result"] == "success"
    text = journal(guest)
    # EXO's API came up, the supervisor saw it answer, and only then did systemd call it started
    api_up = text.index("Starting API")
    answered = text.index("EXO's API answers")
    started = text.index("Started exo-worker.service")
    assert api_up < answered < started, text


def test_systemctl_status_shows_the_status_line(running: Guest) -> None:
    guest = running
    status = guest.run(["systemctl", "status", "--no-pager", f"{UNIT}.service"], check=False)
    match = re.search(r'Status: "([^"]*)"', status.stdout)
    assert match, status.stdout
    line = match.group(1)
    assert line.startswith("worker; ")
    assert "peer" in line
    assert "instance" in line
    # no GPU in the guest: the CUDA variant was refused, the CPU one runs, and it says so
    assert "cpu (FALLBACK: cuda unusable (preferred accelerator cuda cannot be used" in line


def test_runs_as_exo_with_the_hardening_enforced(running: Guest) -> None:
    guest = running
    main_pid = show(guest, "MainPID")["MainPID"]
    status = guest.run(["cat", f"/proc/{main_pid}/status"]).stdout
    uid = guest.run(["id", "-u", "exo"]).stdout.strip()
    assert re.search(rf"^Uid:\s+{uid}\s+{uid}\s+{uid}\s+{uid}$", status, re.M), status
    report = sandbox_report(guest)
    assert str(report["uid"]) == uid
    writes = report["writes"]
    for denied in ("/usr/exo-probe", "/etc/exo-probe", "/var/exo-probe"):
        assert writes[denied] == "EROFS", (denied, writes)
    for hidden in ("/home/exo-probe", "/root/exo-probe"):
        assert writes[hidden] in {"EACCES", "ENOENT", "EROFS"}, (hidden, writes)
    for allowed in ("/var/lib/exo/exo-probe", "/var/cache/exo/exo-probe", "/run/exo/exo-probe"):
        assert writes[allowed] == "ok", (allowed, writes)
    assert writes["/tmp/exo-probe"] == "ok"  # PrivateTmp: its own /tmp
    devices = report["devices"]
    assert devices["/dev/null"] == "ok"
    assert devices["/dev/net/tun"] == "EPERM", devices  # mode 0666, but not in DeviceAllow
    # control: the same user outside the unit opens it, so the refusal is the unit's doing
    opened = guest.run(
        [
            *AS_EXO,
            "python3",
            "-c",
            "import os; os.close(os.open('/dev/net/tun', os.O_RDWR))",
        ],
        check=False,
    )
    assert opened.returncode == 0, opened.stderr
    assert report["CapEff"] == "0000000000000000"
    assert report["NoNewPrivs"] == "1"
    assert report["Seccomp"] == "2"
    modes = guest.run(["stat", "-c", "%n %a %U", "/var/lib/exo", "/var/cache/exo", "/run/exo"])
    assert modes.stdout.split("\n")[:3] == [
        "/var/lib/exo 750 exo",
        "/var/cache/exo 750 exo",
        "/run/exo 750 exo",
    ]


def test_exposure_is_recorded_and_low(guest: Guest) -> None:
    out = guest.run(["systemd-analyze", "security", "--no-pager", f"{UNIT}.service"]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    exposure = float(match.group(1))
    record = os.environ.get("EXO_NIXOS_EXPOSURE_RECORD")
    if record:
        Path(record).write_text(out)
    assert exposure <= EXPOSURE_LIMIT, out


def test_exporter_reads_the_node_units_cgroup_and_is_tight(running: Guest) -> None:
    """The exporter as installed: its sandbox lets it read the node unit's real cgroup, the
    supervisor's facts and run record; its exposure stays at the gateway's."""
    guest = running
    exporter = "exo-exporter.service"
    _wait_until(
        lambda: unit_props(guest, exporter, "ActiveState")["ActiveState"] == "active",
        60,
        "the exporter to become active",
        guest,
        exporter,
    )
    status, text = http(guest, "http://127.0.0.1:52418/metrics", timeout=10)
    assert status == 200, text
    assert re.search(r"^exo_up 1\.0$", text, re.M), text
    some = r'^exo_node_unit_memory_pressure_ratio\{kind="some",window="60s"\} [0-9.e-]+$'
    assert re.search(some, text, re.M), text
    # PSI files are the cgroup core's; memory.current exists only where the memory controller
    # is enabled for the slice, which the nspawn guest does not do
    stalled = r'^exo_node_unit_memory_stalled_seconds_total\{kind="full"\} [0-9.e+-]+$'
    assert re.search(stalled, text, re.M), text
    starts = re.search(r"^exo_node_starts_total ([0-9.]+)$", text, re.M)
    assert starts and float(starts.group(1)) >= 1, text
    accelerator = re.search(r"^exo_accelerator_info\{(.*)\} 1\.0$", text, re.M)
    assert accelerator, text
    assert 'accelerator="cpu"' in accelerator.group(1)
    assert 'fallback="1"' in accelerator.group(1)
    out = guest.run(["systemd-analyze", "security", "--no-pager", "exo-exporter.service"]).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out
    assert float(match.group(1)) <= 1.5, out


def test_exec_stop_post_records_how_the_run_ended(running: Guest) -> None:
    guest = running
    guest.run(["systemctl", "stop", f"{UNIT}.service"], timeout=60)
    wait_until(lambda: show(guest, "ActiveState")["ActiveState"] == "inactive", 60, "stopped")
    record = json.loads(guest.run(["cat", "/var/lib/exo/exo-nixos/runs.json"]).stdout)
    assert record["lastResult"] == "success", record
    assert record["starts"] >= 1, record
    assert record["oomKills"] == 0, record


def _restarts(guest: Guest) -> int:
    return int(show(guest, "NRestarts")["NRestarts"])


def test_hung_node_is_killed_by_the_watchdog_and_restarted(running: Guest) -> None:
    guest = running
    before = _restarts(guest)
    old_pid = show(guest, "MainPID")["MainPID"]
    api_call(guest, "/__double__/fault", {"mode": "hang"})
    wait_until(lambda: _restarts(guest) > before, 60, "a restart after the watchdog fired")
    assert "Watchdog timeout" in journal(guest)
    wait_until(lambda: show(guest, "ActiveState")["ActiveState"] == "active", 60, "active")
    assert show(guest, "MainPID")["MainPID"] != old_pid


def test_crash_loop_backs_off_with_growing_delays(guest: Guest, tmp_path: Path) -> None:
    # the backoff counter (NRestarts) only resets on a start by hand: begin from zero
    guest.run(["systemctl", "restart", f"{UNIT}.service"], timeout=90)
    assert _restarts(guest) == 0
    args_file = guest.root / "etc" / "exo-double-args"
    args_file.write_text("--crash-after 0.5 --exit-code 3\n")
    try:
        since = guest.run(["cat", "/proc/uptime"]).stdout.split()[0]
        api_call(guest, "/__double__/fault", {"mode": "crash", "exitCode": 3})
        event = re.compile(
            r"^\[\s*(\d+\.\d+)\] \S+ systemd\[1\]: "
            r"(Starting exo-worker|exo-worker\.service: Main process exited)",
            re.M,
        )

        def delays() -> list[float]:
            # systemd's own wait: from the main process's exit to the next start, so the
            # time the supervisor and the double take to start under load does not count
            found = [
                (float(t), kind.startswith("Starting"))
                for t, kind in event.findall(journal(guest))
                if float(t) >= float(since)
            ]
            return [
                later - earlier
                for (earlier, is_start), (later, next_is_start) in itertools.pairwise(found)
                if not is_start and next_is_start
            ]

        seen = wait_until(lambda: d if len(d := delays()) >= 3 else None, 120, "3 restarts", guest)
        assert seen[0] < seen[1] < seen[2], f"restart delays did not grow: {seen}"
        assert "status=3" in journal(guest)
    finally:
        args_file.unlink()
    guest.run(["systemctl", "reset-failed", f"{UNIT}.service"], check=False)
    guest.run(["systemctl", "restart", f"{UNIT}.service"], timeout=90)
    assert show(guest, "ActiveState")["ActiveState"] == "active"


def test_stopping_the_target_stops_everything(running: Guest) -> None:
    guest = running
    guest.run(["systemctl", "stop", "exo.target"], timeout=60)
    # PartOf= queues the node's stop alongside the target's; it ends within TimeoutStopSec
    stop_timeout = int(show(guest, "TimeoutStopUSec")["TimeoutStopUSec"].rstrip("s") or 30)
    wait_until(
        lambda: show(guest, "ActiveState")["ActiveState"] == "inactive",
        stop_timeout,
        f"{UNIT} to stop",
        guest,
    )
    assert show(guest, "Result")["Result"] == "success"
    left = guest.run(["pgrep", "-u", "exo"], check=False)
    assert left.stdout.strip() == "", f"processes of user exo left: {left.stdout}"
