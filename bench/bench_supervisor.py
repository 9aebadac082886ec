"""Supervisor benchmarks: READY latency, and the supervisor's own cost while EXO idles.

1. READY latency: the EXO test double binds its API after ``--slow-start``; this script
   connects to the port in a tight loop to see the moment it accepts, and takes the moment the
   READY=1 datagram arrives on its NOTIFY_SOCKET. Median (and spread) over ``--runs``.
2. Idle cost: after READY, with the default health check (a probe every 5 s), the supervisor's
   CPU time over ``--idle`` seconds (from /proc/PID/stat) and its resident memory (VmRSS).

Run: ``.venv/bin/python -m bench.bench_supervisor``.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.exo_double.fixture import double_env, free_port, make_fake_exo_package
from tests.notify_listener import NotifyListener

CLK_TCK = os.sysconf("SC_CLK_TCK")


def config(tmp: Path, package: Path, interval: float) -> Path:
    doc = {
        "schemaVersion": 1,
        "apiPort": free_port(),
        "networking": {"zenohPort": free_port(), "discoveryPort": free_port()},
        "hardware": {"packages": {"cpu": str(package)}},
        "healthCheck": {"intervalSec": interval, "timeoutSec": 3, "failures": 3},
        "gateway": {"enable": False},
        "security": {
            "dataDir": str(tmp / "state" / "exo"),
            "cacheDir": str(tmp / "cache" / "exo"),
            "runtimeDir": str(tmp / "run" / "exo"),
        },
    }
    path = tmp / "config.json"
    path.write_text(json.dumps(doc))
    return path


def start(path: Path, listener: NotifyListener) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "exo_nixos", "run", "--config", str(path)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=double_env(listener.env()),
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def reachable_at(port: int, deadline: float) -> float:
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return time.monotonic()
        time.sleep(0.0005)
    raise TimeoutError("the API never became reachable")


def ready_latency(runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        with tempfile.TemporaryDirectory() as tmp_name:
            tmp = Path(tmp_name)
            package = make_fake_exo_package(tmp / "cpu", "--slow-start", "1.0")
            path = config(tmp, package, 5.0)
            port = json.loads(path.read_text())["apiPort"]
            listener = NotifyListener()
            proc = start(path, listener)
            try:
                api = reachable_at(port, time.monotonic() + 30)
                ready = listener.wait_for("READY", "1", 30)
                samples.append(ready.at - api)
            finally:
                stop(proc)
                listener.close()
    return samples


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def idle_cost(seconds: float) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = config(tmp, make_fake_exo_package(tmp / "cpu"), 5.0)
        listener = NotifyListener()
        proc = start(path, listener)
        try:
            listener.wait_for("READY", "1", 30)
            time.sleep(1.0)
            before = cpu_seconds(proc.pid)
            time.sleep(seconds)
            used = cpu_seconds(proc.pid) - before
            return used / seconds, rss_kib(proc.pid)
        finally:
            stop(proc)
            listener.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--idle", type=float, default=60.0, help="seconds of idle measurement")
    args = parser.parse_args()
    samples = ready_latency(args.runs)
    ms = sorted(s * 1000 for s in samples)
    print(
        f"READY latency over {len(ms)} runs: median {statistics.median(ms):.1f} ms, "
        f"min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms"
    )
    share, rss = idle_cost(args.idle)
    print(
        f"supervisor while EXO idles ({args.idle:.0f} s, probe every 5 s): "
        f"CPU {share * 100:.3f} % of one core, RSS {rss / 1024:.1f} MiB"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
