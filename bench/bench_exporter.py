"""Exporter benchmarks: scrape latency, and what monitoring costs the host while EXO idles.

1. Scrape latency: ``GET /metrics`` of ``exo-nixos exporter`` in front of the EXO test double
   (one instance, a download, one reachable peer), against what a user without the exporter
   would run from cron or a textfile collector: ``exo-nixos status --json`` (a new process
   per sample). Median and 95th percentile over ``--scrapes``.
2. Idle cost, the supervisor running the double with the exporter on beside it, scraped every
   ``--scrape-every`` seconds for ``--idle`` seconds: CPU share and RSS of each process.
3. Where the supervisor's RSS goes: the RSS of a bare interpreter, then after importing each
   group of modules the supervisor loads, in the order it loads them.

Run: ``.venv/bin/python -m bench.bench_exporter``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
from tests.exo_double.fixture import double_env, free_port, make_fake_exo_package, run_double
from tests.notify_listener import NotifyListener

from bench.bench_supervisor import config as supervisor_config
from bench.bench_supervisor import cpu_seconds, rss_kib, start, stop
from exo_nixos.exoapi import run_coroutine

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def exporter_config(tmp: Path, api_port: int) -> Path:
    doc = {
        "schemaVersion": 1,
        "apiPort": api_port,
        "gateway": {"enable": False},
        "exporter": {"enable": True, "port": free_port()},
        "security": {"runtimeDir": str(tmp / "run"), "dataDir": str(tmp / "data")},
    }
    path = tmp / "exporter.json"
    path.write_text(json.dumps(doc))
    return path


def start_exporter(path: Path) -> tuple[subprocess.Popen[bytes], str]:
    port = json.loads(path.read_text())["exporter"]["port"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "exo_nixos", "exporter", "--config", str(path)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=double_env(),
    )
    url = f"http://127.0.0.1:{port}/metrics"
    deadline = time.monotonic() + 30
    while True:
        try:
            scrape(url)
            return proc, url
        except aiohttp.ClientError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def scrape(url: str) -> float:
    async def once() -> float:
        started = time.perf_counter()
        async with aiohttp.ClientSession() as session, session.get(url) as response:
            await response.read()
            response.raise_for_status()
        return time.perf_counter() - started

    return run_coroutine(once())


def status_json(api_url: str) -> float:
    started = time.perf_counter()
    subprocess.run(
        [sys.executable, "-m", "exo_nixos", "status", "--url", api_url, "--json"],
        stdout=subprocess.DEVNULL,
        env=double_env(),
        check=False,
    )
    return time.perf_counter() - started


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p95 = ms[min(len(ms) - 1, round(0.95 * (len(ms) - 1)))]
    return f"median {statistics.median(ms):.1f} ms, p95 {p95:.1f} ms"


def latency(scrapes: int) -> None:
    port = free_port()
    args = ("--api-port", str(port), "--instance", MODEL, "--download", f"{MODEL}-x=40")
    with (
        tempfile.TemporaryDirectory() as tmp_name,
        run_double(*args, "--bind", "127.0.0.1", "--peer", "b0b=127.0.0.2"),
        run_double("--api-port", str(port), "--bind", "127.0.0.2", node_id="b0b", wait=False),
    ):
        time.sleep(1.0)
        proc, url = start_exporter(exporter_config(Path(tmp_name), port))
        try:
            scraped = [scrape(url) for _ in range(scrapes)]
            runs = max(5, scrapes // 10)
            status = [status_json(f"http://127.0.0.1:{port}") for _ in range(runs)]
        finally:
            stop(proc)
    ratio = statistics.median(status) / statistics.median(scraped)
    print(f"scrape of /metrics over {scrapes} scrapes: {summary(scraped)}")
    print(f"`exo-nixos status --json` over {runs} runs: {summary(status)}")
    print(f"  a scrape takes 1/{ratio:.0f} of the time of a status run")


def idle(seconds: float, every: float) -> None:
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        path = supervisor_config(tmp, make_fake_exo_package(tmp / "cpu"), 5.0)
        api_port = json.loads(path.read_text())["apiPort"]
        listener = NotifyListener()
        supervisor = start(path, listener)
        exporter = None
        try:
            listener.wait_for("READY", "1", 30)
            exporter, url = start_exporter(exporter_config(tmp, api_port))
            time.sleep(1.0)
            before = {p.pid: cpu_seconds(p.pid) for p in (supervisor, exporter)}
            deadline = time.monotonic() + seconds
            while time.monotonic() < deadline:
                scrape(url)
                time.sleep(every)
            for name, proc in (("supervisor", supervisor), ("exporter", exporter)):
                share = (cpu_seconds(proc.pid) - before[proc.pid]) / seconds
                print(
                    f"{name} ({seconds:.0f} s idle, probe every 5 s, scrape every {every:g} s): "
                    f"CPU {share * 100:.3f} % of one core, RSS {rss_kib(proc.pid) / 1024:.1f} MiB"
                )
        finally:
            if exporter is not None:
                stop(exporter)
            stop(supervisor)
            listener.close()


# The modules `exo-nixos run` loads, in groups, in the order it loads them.
IMPORT_STEPS = (
    ("interpreter", ""),
    ("config model (pydantic)", "exo_nixos.config"),
    ("hardware detection", "exo_nixos.hardware"),
    ("node API client (aiohttp, /state models)", "exo_nixos.exoapi"),
    ("supervisor runner", "exo_nixos.supervisor.runner"),
    ("link watcher (pyroute2)", "exo_nixos.network.watch"),
)


def where_rss_goes() -> None:
    code = (
        "import importlib, sys\n"
        "def rss():\n"
        "    for line in open('/proc/self/status'):\n"
        "        if line.startswith('VmRSS:'): return int(line.split()[1])\n"
        "for name in sys.argv[1:]:\n"
        "    if name: importlib.import_module(name)\n"
        "    print(rss())\n"
    )
    names = [module for _, module in IMPORT_STEPS]
    done = subprocess.run(
        [sys.executable, "-c", code, *names],
        capture_output=True,
        text=True,
        env=double_env(),
        check=True,
    )
    values = [int(v) for v in done.stdout.split()]
    previous = 0
    print("supervisor RSS by what it imports (MiB, cumulative / added):")
    for (label, _), value in zip(IMPORT_STEPS, values, strict=True):
        print(f"  {label:44s} {value / 1024:6.1f} / +{(value - previous) / 1024:.1f}")
        previous = value


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scrapes", type=int, default=100)
    parser.add_argument("--idle", type=float, default=60.0)
    parser.add_argument("--scrape-every", type=float, default=15.0)
    args = parser.parse_args()
    latency(args.scrapes)
    idle(args.idle, args.scrape_every)
    where_rss_goes()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
