"""``exo-nixos run`` as a real process: a real NOTIFY_SOCKET, the EXO test double as its child."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.exoapi import run_coroutine
from tests.exo_double.fixture import (
    double_env,
    free_port,
    http_json,
    make_fake_exo_package,
)
from tests.notify_listener import NotifyListener

STOP_TIMEOUT = 3.0


@dataclass
class Run:
    process: subprocess.Popen[bytes]
    listener: NotifyListener
    config: dict[str, Any]
    log_path: Path
    tmp: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.config['apiPort']}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait(self, timeout: float = 20.0) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"still running after {timeout}s:\n{self.log()}") from None

    def child_pids(self) -> list[int]:
        path = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children")
        return [int(p) for p in path.read_text().split()]

    def fault(self, mode: str, **extra: Any) -> None:
        body = {"mode": mode, **extra}
        status, answer = run_coroutine(http_json("POST", f"{self.url}/__double__/fault", body))
        assert status == 200, answer

    def node_id(self) -> Any:
        status, answer = run_coroutine(http_json("GET", f"{self.url}/node_id"))
        assert status == 200
        return answer


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return False
    return state != "Z"


def base_config(tmp: Path, cpu_package: Path, **overrides: Any) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "schemaVersion": 1,
        "mode": "worker",
        "apiPort": free_port(),
        "networking": {"zenohPort": free_port(), "discoveryPort": free_port()},
        "hardware": {"packages": {"cpu": str(cpu_package)}},
        "healthCheck": {"intervalSec": 0.2, "timeoutSec": 0.5, "failures": 2},
        "gateway": {"enable": False},
        "security": {
            "dataDir": str(tmp / "state" / "exo"),
            "cacheDir": str(tmp / "cache" / "exo"),
            "runtimeDir": str(tmp / "run" / "exo"),
            "configDir": str(tmp / "etc" / "exo"),
        },
    }
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(doc.get(key), dict):
            doc[key] = {**doc[key], **value}
        else:
            doc[key] = value
    return doc


@pytest.fixture
def supervise(tmp_path: Path) -> Iterator[Any]:
    runs: list[Run] = []

    def start(
        config: dict[str, Any] | None = None,
        *,
        double_args: tuple[str, ...] = (),
        role: str | None = None,
        watchdog_sec: float | None = None,
        host_root: Path | None = None,
    ) -> Run:
        if config is None:
            config = base_config(tmp_path, make_fake_exo_package(tmp_path / "cpu", *double_args))
        config_path = tmp_path / "config.json"
        config_path.write_text(json.dumps(config))
        listener = NotifyListener()
        argv = [sys.executable, "-m", "exo_nixos", "run", "--config", str(config_path)]
        argv += ["--stop-timeout", str(STOP_TIMEOUT)]
        if role:
            argv += ["--role", role]
        if host_root:
            argv += ["--host-root", str(host_root)]
        log_path = tmp_path / f"supervisor-{len(runs)}.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=double_env(listener.env(watchdog_sec)),
            )
        run = Run(process, listener, config, log_path, tmp_path)
        runs.append(run)
        return run

    yield start
    for run in runs:
        leftovers = run.child_pids() if run.process.poll() is None else []
        if run.process.poll() is None:
            run.process.send_signal(signal.SIGTERM)
            try:
                run.process.wait(STOP_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                run.process.kill()
                run.process.wait()
        for pid in leftovers:  # only our own supervisor's children
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
        run.listener.close()


def test_ready_only_after_the_api_answers(supervise, tmp_path) -> None:
    run = supervise(double_args=("--slow-start", "1.5"))
    down_seen: list[float] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            run_coroutine(http_json("GET", f"{run.url}/node_id", within=0.5))
            break
        except Exception:
            down_seen.append(started)
            time.sleep(0.05)
    assert down_seen, "the slow-starting double answered at once"
    ready = run.listener.wait_for("READY", "1")
    assert ready.at > max(down_seen), "READY=1 was sent while the API was not answering"
    starting = run.listener.wait_for("STATUS", "worker; starting; cpu")
    assert starting.at < ready.at
    assert ready.fields["STATUS"].startswith("worker; ")
    assert "instance" in ready.fields["STATUS"]
    assert run.process.poll() is None


def gated_exo_package(root: Path, gate: Path) -> Path:
    """An ``exo`` that prints two lines at once, then starts the double (whose API answers)
    only once ``gate`` exists: output long before the API is up."""
    make_fake_exo_package(root)
    exe = root / "bin" / "exo"
    double = exe.read_text().splitlines()
    exe.write_text(
        "\n".join(
            [
                double[0],
                "echo 'EXO test double: banner line'",
                "echo 'EXO test double: loading'",
                f"while [ ! -e {gate} ]; do sleep 0.05; done",
                *double[1:],
            ]
        )
        + "\n"
    )
    return root


def test_ready_waits_for_the_api_not_for_exos_output(supervise, tmp_path) -> None:
    """Deterministic, not a race: the supervisor handles EXO's lines one after another, so
    once the second line is in its output, anything the first line could trigger (a READY
    sent on EXO's first output, say) has been sent. A marker datagram sent then lands in the
    listener's queue after it; READY must come after the marker, i.e. after the API answers."""
    gate = tmp_path / "gate"
    run = supervise(base_config(tmp_path, gated_exo_package(tmp_path / "cpu", gate)))
    deadline = time.monotonic() + 20
    while "EXO test double: loading" not in run.log():
        assert run.process.poll() is None, run.log()
        assert time.monotonic() < deadline, f"no output from the gated EXO:\n{run.log()}"
        time.sleep(0.02)
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as marker:
        marker.sendto(b"TEST_MARKER=1", run.listener.address)
    run.listener.wait_for("TEST_MARKER", "1")
    assert run.listener.all("READY") == [], "READY=1 before EXO's API was started"
    gate.touch()
    ready = run.listener.wait_for("READY", "1", 30)
    order = [m for m in run.listener.messages if "READY" in m.fields or "TEST_MARKER" in m.fields]
    assert ["READY" if "READY" in m.fields else "marker" for m in order][:2] == ["marker", "READY"]
    assert ready.fields["STATUS"].startswith("worker; ")
    run_coroutine(http_json("GET", f"{run.url}/node_id", within=2))


def test_crash_exit_status_propagates(supervise) -> None:
    run = supervise()
    run.listener.wait_for("READY", "1")
    run.fault("crash", exitCode=3)
    assert run.wait() == 3
    assert "EXO exited unexpectedly with status 3" in run.log()
    run.listener.wait_for("STATUS", "EXO exited with status 3")


def test_hang_stops_watchdog_pings_until_healthy_again(supervise) -> None:
    run = supervise(watchdog_sec=30)
    run.listener.wait_for("READY", "1")
    run.listener.wait_for("WATCHDOG", "1")
    run.fault("hang", paths=["/node_id", "/state", "/models"])
    run.listener.wait_for("STATUS", None, 30, prefix="worker; UNHEALTHY: 2 failed probes")
    pings = len(run.listener.all("WATCHDOG"))
    run.listener.wait_for("STATUS", None, 30, prefix="worker; UNHEALTHY: 4 failed probes")
    assert len(run.listener.all("WATCHDOG")) == pings, "pinged the watchdog while hung"
    run.fault("ok")
    deadline = time.monotonic() + 20
    while len(run.listener.all("WATCHDOG")) == pings:
        assert time.monotonic() < deadline, "no watchdog ping after EXO recovered"
        time.sleep(0.05)
    assert "healthy again" in run.log()


def test_sigterm_stops_exo_gracefully_without_orphans(supervise) -> None:
    run = supervise()
    run.listener.wait_for("READY", "1")
    children = run.child_pids()
    assert len(children) == 1
    run.process.send_signal(signal.SIGTERM)
    assert run.wait(STOP_TIMEOUT + 5) == 0
    run.listener.wait_for("STOPPING", "1")
    assert not alive(children[0])
    assert "forwarding SIGTERM" in run.log()


STUBBORN = textwrap.dedent(
    """\
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    helper = subprocess.Popen(["sleep", "300"])
    open(sys.argv[1], "w").write(f"{os.getpid()} {helper.pid}")
    while True:
        time.sleep(1)
    """
)


def test_stop_timeout_kills_a_stubborn_exo_and_its_children(supervise, tmp_path) -> None:
    package = tmp_path / "stubborn"
    (package / "bin").mkdir(parents=True)
    pids_file = tmp_path / "pids"
    script = tmp_path / "stubborn.py"
    script.write_text(STUBBORN)
    exe = package / "bin" / "exo"
    exe.write_text(f"#!/bin/sh\nexec {sys.executable} {script} {pids_file}\n")
    exe.chmod(0o755)
    run = supervise(base_config(tmp_path, package))
    deadline = time.monotonic() + 20
    while not pids_file.exists() or not pids_file.read_text():
        assert time.monotonic() < deadline
        time.sleep(0.05)
    exo_pid, helper_pid = (int(p) for p in pids_file.read_text().split())
    run.process.send_signal(signal.SIGTERM)
    status = run.wait(STOP_TIMEOUT + 5)
    assert status == 128 + signal.SIGKILL
    assert "did not stop within" in run.log()
    for pid in (exo_pid, helper_pid):
        assert not alive(pid)


def _variant(tmp: Path, name: str) -> Path:
    return make_fake_exo_package(tmp / name, "--node-id", f"{name}-variant")


def _gpu_config(tmp: Path) -> dict[str, Any]:
    packages = {"cuda": str(_variant(tmp, "cuda")), "cpu": str(_variant(tmp, "cpu"))}
    return base_config(
        tmp, tmp / "cpu", hardware={"packages": packages, "preferredAccelerator": "cuda"}
    )


def test_gpu_missing_falls_back_to_the_cpu_variant(supervise, tmp_path) -> None:
    host = tmp_path / "host"
    (host / "dev").mkdir(parents=True)
    run = supervise(_gpu_config(tmp_path), host_root=host)
    ready = run.listener.wait_for("READY", "1")
    assert (
        "FALLBACK: cuda unusable (preferred accelerator cuda cannot be used"
        in (ready.fields["STATUS"])
    )
    assert run.node_id() == "cpu-variant"
    assert "accelerator fallback" in run.log()


def test_gpu_present_runs_the_gpu_variant(supervise, tmp_path) -> None:
    host = Path(__file__).parent / "fixtures" / "hardware" / "nvidia-h100-real"
    run = supervise(_gpu_config(tmp_path), host_root=host)
    ready = run.listener.wait_for("READY", "1")
    assert "FALLBACK" not in ready.fields["STATUS"]
    # the H100's 80 GB less the margin, not the host's 128 GiB, is what EXO plans with
    assert "; cuda, plans with 64 GiB of GPU memory" in ready.fields["STATUS"]
    assert run.node_id() == "cuda-variant"


CORRUPT_SNAPSHOTS = {
    "garbage": b'{"format": 1, "takenAt": \x00\x00',
    "takenAt 1e300": b'{"format": 1, "role": "worker", "takenAt": 1e300, '
    b'"topology": {"nodeId": "x", "peers": {}}}',
    "takenAt NaN": b'{"format": 1, "role": "worker", "takenAt": NaN, '
    b'"topology": {"nodeId": "x", "peers": {}}}',
    "nested too deeply": b'{"format": 1, "topology": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
}


@pytest.mark.parametrize("raw", CORRUPT_SNAPSHOTS.values(), ids=CORRUPT_SNAPSHOTS.keys())
def test_corrupted_snapshot_is_set_aside_and_replaced(supervise, tmp_path, raw: bytes) -> None:
    package = make_fake_exo_package(tmp_path / "cpu", "--node-id", "snap-node")
    config = base_config(tmp_path, package)
    snap = Path(config["security"]["dataDir"]) / "exo-nixos" / "topology.json"
    snap.parent.mkdir(parents=True)
    snap.write_bytes(raw)
    run = supervise(config)
    run.listener.wait_for("READY", "1")
    deadline = time.monotonic() + 20
    while True:
        try:
            doc = json.loads(snap.read_text())
            break
        except (FileNotFoundError, ValueError):
            assert time.monotonic() < deadline, "no fresh snapshot written"
            time.sleep(0.05)
    assert doc["topology"]["nodeId"] == "snap-node"
    assert doc["role"] == "worker"
    aside = list(snap.parent.glob("topology.json.corrupt-*"))
    assert len(aside) == 1
    assert aside[0].read_bytes() == raw
    assert "corrupted" in run.log()
    assert "Traceback" not in run.log()


def test_exo_gets_the_arguments_and_environment_built_from_the_config(supervise, tmp_path) -> None:
    dump = tmp_path / "exo-env.json"
    package = make_fake_exo_package(tmp_path / "cpu")
    config = base_config(
        tmp_path,
        package,
        mode="master",
        noWorker=True,
        clusterNamespace="lab",
        extraArgs=["--env-dump", str(dump)],
        hardware={"packages": {"cpu": str(package)}, "memoryLimit": "1G"},
    )
    run = supervise(config, role="master")
    ready = run.listener.wait_for("READY", "1")
    assert ready.fields["STATUS"].startswith("master; ")
    seen = json.loads(dump.read_text())
    argv = seen["argv"]
    for flag in ("--force-master", "--no-worker"):
        assert flag in argv
    assert argv[argv.index("--namespace") + 1] == "lab"
    assert argv[argv.index("--api-port") + 1] == str(config["apiPort"])
    env = seen["env"]
    assert env["EXO_RUNTIME_DIR"] == config["security"]["runtimeDir"]
    assert env["XDG_DATA_HOME"] == str(tmp_path / "state")
    assert env["OVERRIDE_MEMORY_MB"] == "1024"
    assert "NOTIFY_SOCKET" not in env
    # the double takes its pid lock under $XDG_CACHE_HOME/exo, i.e. the cache directory
    assert (Path(config["security"]["cacheDir"]) / "exo.pid").exists()


def test_missing_executable_fails_with_127(supervise, tmp_path) -> None:
    run = supervise(base_config(tmp_path, tmp_path / "nowhere"))
    assert run.wait() == 127
    assert "cannot start" in run.log()


def test_master_role_needs_master_mode(tmp_path) -> None:
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"schemaVersion": 1, "mode": "worker"}))
    done = subprocess.run(
        [sys.executable, "-m", "exo_nixos", "run", "--config", str(config), "--role", "master"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert 'services.exo.mode = "master"' in done.stderr
    assert "Traceback" not in done.stderr


def test_master_named_in_exos_log_reaches_status_snapshot_and_hint(supervise, tmp_path) -> None:
    package = make_fake_exo_package(
        tmp_path / "cpu",
        "--node-id",
        "node-a",
        "--peer",
        "node-b=127.0.0.2",
        "--master-id",
        "node-b",
    )
    config = base_config(tmp_path, package)
    run = supervise(config)
    ready = run.listener.wait_for("READY", "1")
    status = ready.fields["STATUS"]
    if "master node-b" not in status:  # the election line may follow the API's first answer
        status = run.listener.wait_for("STATUS", None, prefix="worker; master node-b").fields[
            "STATUS"
        ]
    assert status.startswith("worker; master node-b; 1 peer; ")
    hint = json.loads((Path(config["security"]["runtimeDir"]) / "master.json").read_text())
    assert (hint["nodeId"], hint["masterId"]) == ("node-a", "node-b")
    snap = Path(config["security"]["dataDir"]) / "exo-nixos" / "topology.json"
    deadline = time.monotonic() + 10
    while json.loads(snap.read_text())["topology"]["masterId"] != "node-b":
        assert time.monotonic() < deadline, snap.read_text()
        time.sleep(0.05)
    assert "Starting node node-a" in run.log()  # EXO's own lines pass through


def _netns_skip_reason() -> str | None:
    if os.geteuid() != 0:
        return "needs root to create a network namespace"
    if subprocess.run(["ip", "-V"], capture_output=True, check=False).returncode != 0:
        return "iproute2 (ip) not installed"
    return None


@pytest.mark.netns
@pytest.mark.skipif(_netns_skip_reason() is not None, reason=_netns_skip_reason() or "")
def test_cluster_link_loss_and_recovery_show_in_status(tmp_path) -> None:
    """The supervisor in its own network namespace watches its cluster link (a veth)."""
    ns = f"exo-sup-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    listener = NotifyListener()
    process: subprocess.Popen[bytes] | None = None
    try:
        for cmd in (
            ["link", "set", "lo", "up"],
            ["link", "add", "clu0", "type", "veth", "peer", "name", "clu1"],
            ["link", "set", "clu1", "up"],
            ["link", "set", "clu0", "up"],
        ):
            subprocess.run(["ip", "-n", ns, *cmd], check=True)
        package = make_fake_exo_package(tmp_path / "cpu")
        config = base_config(tmp_path, package, networking={"bondInterface": "clu0"})
        path = tmp_path / "config.json"
        path.write_text(json.dumps(config))
        log_path = tmp_path / "supervisor.log"
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "exo_nixos", "run"]
        argv += ["--config", str(path), "--stop-timeout", str(STOP_TIMEOUT)]
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=double_env(listener.env()),
            )
        ready = listener.wait_for("READY", "1")
        assert "link" not in ready.fields["STATUS"]
        subprocess.run(["ip", "-n", ns, "link", "set", "clu0", "down"], check=True)
        down = wait_status(listener, "; link down: cluster interface clu0 down")
        assert "no backup interface" in down
        subprocess.run(["ip", "-n", ns, "link", "set", "clu0", "up"], check=True)
        deadline = time.monotonic() + 15
        while "; link " in listener.all("STATUS")[-1].fields["STATUS"]:
            assert time.monotonic() < deadline, "STATUS still shows the link as down"
            time.sleep(0.05)
        text = log_path.read_text()
        assert "clu0 went down" in text
        assert "clu0 went up" in text
    finally:
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(STOP_TIMEOUT + 5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        listener.close()
        subprocess.run(["ip", "netns", "delete", ns], check=False)


def wait_status(listener: NotifyListener, fragment: str, timeout: float = 15.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for msg in listener.all("STATUS"):
            if fragment in msg.fields["STATUS"]:
                return msg.fields["STATUS"]
        time.sleep(0.05)
    seen = [m.fields["STATUS"] for m in listener.all("STATUS")]
    raise AssertionError(f"no STATUS containing {fragment!r}; got {seen}")


def test_stop_while_exo_starts_ends_cleanly_without_ready(supervise) -> None:
    run = supervise(double_args=("--slow-start", "30"))
    run.listener.wait_for("STATUS", "worker; starting; cpu")  # signal handlers are in place
    run.process.send_signal(signal.SIGTERM)
    status = run.wait(STOP_TIMEOUT + 5)
    # EXO stopped by its handler (0) or, if it had not installed one yet, by the signal itself
    assert status in (0, -signal.SIGTERM), run.log()
    assert not run.listener.all("READY")
    assert "Traceback" not in run.log()


def _dry_run(
    tmp_path: Path, config: dict[str, Any], *extra: str
) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", "run", "--config", str(path), *extra, "--dry-run"],
        capture_output=True,
        text=True,
        check=False,
        env=double_env(),
    )


def test_dry_run_prints_what_exo_would_get(tmp_path) -> None:
    package = make_fake_exo_package(tmp_path / "cpu")
    config = base_config(tmp_path, package, mode="master", clusterNamespace="lab")
    done = _dry_run(tmp_path, config)
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "accelerator: cpu"  # the decision, with its reasons
    assert any(line.startswith("  because: ") for line in lines)
    command = next(line for line in lines if line.startswith(f"{package}/bin/exo "))
    assert command.startswith(f"{package}/bin/exo --api-port {config['apiPort']}")
    assert "--force-master" in command
    assert "--namespace lab" in command
    assert f"EXO_RUNTIME_DIR={config['security']['runtimeDir']}" in lines


def test_dry_run_says_when_the_executable_is_missing(tmp_path) -> None:
    package = tmp_path / "gone"  # no bin/exo in it
    done = _dry_run(tmp_path, base_config(tmp_path, package))
    assert done.returncode == 1
    assert f"error: {package}/bin/exo is not an executable file" in done.stdout


def test_run_with_a_host_root_that_is_no_directory_is_one_line(tmp_path) -> None:
    config = base_config(tmp_path, make_fake_exo_package(tmp_path / "cpu"))
    done = _dry_run(tmp_path, config, "--host-root", str(tmp_path / "nonexistent"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1 and "--host-root" in done.stderr


def test_the_link_monitor_reads_the_host_root(tmp_path, monkeypatch) -> None:
    from exo_nixos.commands import run as run_command
    from exo_nixos.config import default_config
    from exo_nixos.network import watch

    seen = {}

    def for_config(cls, config, on_change=None, root=Path("/")):
        seen["root"] = root

    monkeypatch.setattr(watch.LinkMonitor, "for_config", classmethod(for_config))

    class Fake:
        on_link_change = None

    run_command._link_monitor(default_config(), Fake(), tmp_path)  # type: ignore[arg-type]
    assert seen["root"] == tmp_path
