"""Benchmark: EXO test double reached directly, through ``exo-nixos gateway``, nginx and LiteLLM.

    python -m bench.bench_gateway [--quick] [--litellm PATH]

All traffic stays on 127.0.0.1. One double is the backend. The gateway runs with an API key
file and a key policy (so the limiter and the usage scan are on the path), the key sent on
every request, once with one worker process and once with ``default_workers()`` (one per
core); nginx (Debian's, started here as a foreground child with its own config in a
temporary directory, ``worker_processes`` as many as the gateway's workers, what
``auto`` gives) checks the same key with a ``map`` and proxies with ``proxy_buffering off``.
LiteLLM's proxy (``--litellm``: its ``litellm`` command, installed in a venv of its own,
never in this project's) is the LLM gateway a team would otherwise deploy: the double as an
``openai/`` model, a master key, one process as it starts by default; only the chat
workloads go through it (it has no ``/node_id``). The load comes from an aiohttp client in a
separate process, one run per (workload, clients, target), the targets interleaved.
Workloads:

- json: ``GET /node_id`` (a small JSON answer), as many as the clients can send in turn.
- chat: ``POST /v1/chat/completions`` without streaming (the double answers at once).
- sse: ``POST /v1/chat/completions`` with ``stream: true``; the double sends one event every
  ``STREAM_DELAY`` seconds. Per-event latency is the time from sending the request to the
  event's arrival, so what a proxy adds to each event shows up against direct.

Prints, per workload and client count, requests per second and p50/p99 latency of each
target, and for the proxies the ratio to direct and the added milliseconds.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import KEY_A, gateway_config, run_gateway, write_keys

from exo_nixos.gateway.workers import default_workers

MODEL = "mlx-community/Llama-3.2-1B-Instruct-4bit"
STREAM_DELAY = 0.05
STREAM_WORDS = 12
EVENTS_PER_STREAM = STREAM_WORDS + 6  # the double's reply: 5 tokens of prefix, the words, [DONE]
ROUNDS = 3
CLIENTS = {"json": (1, 64, 256), "chat": (1, 32), "sse": (1, 64, 256)}
HEADERS = {"Authorization": f"Bearer {KEY_A}"}
LITELLM_KEY = "sk-" + KEY_A  # LiteLLM's master key must start with sk-
LITELLM_CONF = """\
model_list:
  - model_name: {model}
    litellm_params:
      model: openai/{model}
      api_base: {backend}/v1
      api_key: none
general_settings:
  master_key: {key}
"""

NGINX_CONF = """\
daemon off;
master_process on;
worker_processes {workers};
error_log {tmp}/error.log warn;
pid {tmp}/nginx.pid;
worker_rlimit_nofile 65535;
events {{ worker_connections 8192; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/body;
  proxy_temp_path {tmp}/proxy;
  client_max_body_size 64m;
  map $http_authorization $exo_key_ok {{
    default 0;
    "Bearer {key}" 1;
  }}
  upstream exo {{
    server 127.0.0.1:{backend};
    keepalive 512;
  }}
  server {{
    listen 127.0.0.1:{port};
    location / {{
      if ($exo_key_ok = 0) {{ return 401; }}
      proxy_pass http://exo;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header Authorization "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering off;
      proxy_request_buffering off;
      proxy_read_timeout 600s;
    }}
  }}
}}
"""


@dataclass
class Result:
    requests: int
    seconds: float
    latencies: list[float]  # seconds: per request (json) or per event (sse)
    first_event: list[float]
    errors: int

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    def merge(self, other: Result) -> None:
        self.requests += other.requests
        self.seconds += other.seconds
        self.latencies.extend(other.latencies)
        self.first_event.extend(other.first_event)
        self.errors += other.errors

    def summary(self) -> dict[str, float]:
        return {
            "rps": self.rps,
            "p50": self.pct(0.50),
            "p99": self.pct(0.99),
            "first_p50": self.pct(0.50, self.first_event),
            "first_p99": self.pct(0.99, self.first_event),
            "requests": self.requests,
            "errors": self.errors,
        }

    def pct(self, q: float, values: list[float] | None = None) -> float:
        data = sorted(self.latencies if values is None else values)
        if not data:
            return float("nan")
        return data[min(len(data) - 1, int(q * len(data)))]


async def _json_client(
    session: aiohttp.ClientSession, url: str, measure_from: float, stop_at: float, out: Result
) -> None:
    while (sent := time.perf_counter()) < stop_at:
        ok = False
        try:
            async with session.get(f"{url}/node_id") as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            pass
        if sent >= measure_from:
            out.latencies.append(time.perf_counter() - sent)
            out.requests += 1
            out.errors += 0 if ok else 1


def _chat_body(stream: bool) -> dict[str, Any]:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": " ".join(["word"] * STREAM_WORDS)}],
        "stream": stream,
    }


async def _chat_client(
    session: aiohttp.ClientSession,
    url: str,
    stream: bool,
    measure_from: float,
    stop_at: float,
    out: Result,
) -> None:
    body = _chat_body(stream)
    while (sent := time.perf_counter()) < stop_at:
        ok = False
        try:
            async with session.post(f"{url}/v1/chat/completions", json=body) as response:
                await response.read()
                ok = response.status == 200
        except (aiohttp.ClientError, TimeoutError):
            pass
        if sent >= measure_from:
            out.latencies.append(time.perf_counter() - sent)
            out.requests += 1
            out.errors += 0 if ok else 1


async def _sse_stream(
    session: aiohttp.ClientSession, url: str, measured: bool, out: Result
) -> None:
    body = _chat_body(True)
    arrivals: list[float] = []
    ok = done = False
    sent = time.perf_counter()
    try:
        async with session.post(f"{url}/v1/chat/completions", json=body) as response:
            ok = response.status == 200
            buffer = b""
            async for chunk in response.content.iter_any():
                now = time.perf_counter()
                buffer += chunk
                while b"\n\n" in buffer:
                    event, buffer = buffer.split(b"\n\n", 1)
                    if event.startswith(b"data: "):
                        arrivals.append(now - sent)
                        done = event == b"data: [DONE]"
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    # every event through (LiteLLM re-encodes the stream and may add a closing chunk)
    ok = ok and done and len(arrivals) >= EVENTS_PER_STREAM
    out.requests += 1
    out.errors += 0 if ok else 1
    if measured and arrivals:
        out.latencies.extend(arrivals)
        out.first_event.append(arrivals[0])


async def _sse_client(session: aiohttp.ClientSession, url: str, out: Result) -> None:
    await _sse_stream(session, url, False, out)  # warm-up: connections, the double's caches
    await _sse_stream(session, url, True, out)


async def _load(
    url: str,
    workload: str,
    clients: int,
    seconds: float,
    warmup: float,
    headers: dict[str, str],
    stream: bool = False,
) -> Result:
    out = Result(0, 0.0, [], [], 0)
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, headers=headers
    ) as session:
        start = time.perf_counter()
        if workload in {"json", "chat"}:
            measure_from = start + warmup
            stop_at = measure_from + seconds
            await asyncio.gather(
                *(
                    _json_client(session, url, measure_from, stop_at, out)
                    if workload == "json"
                    else _chat_client(session, url, stream, measure_from, stop_at, out)
                    for _ in range(clients)
                )
            )
            out.seconds = time.perf_counter() - measure_from
        else:
            await asyncio.gather(*(_sse_client(session, url, out) for _ in range(clients)))
            out.seconds = time.perf_counter() - start
    return out


def _bench_config(keys: Path, backend: str, workers: int) -> dict[str, Any]:
    config = gateway_config(
        port=free_port(),
        keys_file=keys,
        static_backends=[backend],
        interval=5.0,
        log_level="warning",
        workers=workers,
        # a policy that never refuses: the limiter and the usage scan are on the path
        key_policies={"bench": {"requestsPerMinute": 1_000_000, "concurrency": 65535}},
    )
    # every load client connects from 127.0.0.1: room for the largest cell and the rest
    config["gateway"]["maxConnectionsPerAddress"] = 4 * max(max(c) for c in CLIENTS.values())
    return config


def run_load(
    url: str,
    workload: str,
    clients: int,
    seconds: float,
    warmup: float,
    headers: dict[str, str] = HEADERS,
) -> Result:
    """Runs in the load process."""
    return asyncio.run(_load(url, workload, clients, seconds, warmup, headers))


def run_load_chat(url: str, clients: int, seconds: float, stream: bool) -> Result:
    """Chat completions (streamed or not) for ``seconds``; for the profiler."""
    return asyncio.run(_load(url, "chat", clients, seconds, 0.0, HEADERS, stream))


@contextlib.contextmanager
def run_litellm(command: str, backend: str) -> Iterator[str]:
    """LiteLLM's proxy in front of ``backend``, from its own installation (``command``)."""
    with tempfile.TemporaryDirectory(prefix="exo-bench-litellm-") as tmp:
        port = free_port()
        conf = Path(tmp) / "litellm.yaml"
        conf.write_text(LITELLM_CONF.format(model=MODEL, backend=backend, key=LITELLM_KEY))
        log = (Path(tmp) / "litellm.log").open("wb")
        env = {
            **os.environ,
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download at start (no network here)
            "LITELLM_LOG": "ERROR",
            # its cost calculation fetches the model's tokenizer from Hugging Face, blocking
            # its event loop for the retries (23 s per stream here, with no network)
            "HF_HUB_OFFLINE": "1",
        }
        env.pop("PYTHONPATH", None)
        process = subprocess.Popen(
            [command, "--config", str(conf), "--host", "127.0.0.1", "--port", str(port)],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=tmp,
        )
        try:
            _wait_listening(process, port, 120, Path(tmp) / "litellm.log")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
            log.close()


def _wait_listening(
    process: subprocess.Popen[bytes], port: int, timeout: float, log: Path | None = None
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            text = log.read_text(errors="replace")[-2000:] if log else ""
            raise SystemExit(f"{process.args[0]} exited with {process.returncode}: {text}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.2):
            return
        if time.monotonic() > deadline:
            raise SystemExit(f"{process.args[0]} did not listen within {timeout}s")
        time.sleep(0.1)


@contextlib.contextmanager
def run_nginx(backend_port: int, workers: int) -> Iterator[str]:
    nginx = shutil.which("nginx") or "/usr/sbin/nginx"
    if not Path(nginx).exists():
        raise SystemExit(
            "nginx not found: apt-get install nginx-light (only the benchmark needs it)"
        )
    with tempfile.TemporaryDirectory(prefix="exo-bench-nginx-") as tmp:
        port = free_port()
        conf = Path(tmp) / "nginx.conf"
        conf.write_text(
            NGINX_CONF.format(tmp=tmp, key=KEY_A, backend=backend_port, port=port, workers=workers)
        )
        process = subprocess.Popen(
            [nginx, "-p", tmp, "-c", str(conf), "-e", f"{tmp}/error.log"],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        try:
            _wait_listening(process, port, 10, Path(tmp) / "error.log")
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                process.wait(5)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="short runs (a smoke test)")
    parser.add_argument(
        "--json-seconds", type=float, default=1.0, help="measured seconds per JSON/chat run"
    )
    parser.add_argument("--rounds", type=int, default=ROUNDS)
    parser.add_argument(
        "--litellm",
        default=shutil.which("litellm"),
        help="LiteLLM's litellm command (its own venv); left out when not found",
    )
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    json_s, warmup, rounds = (0.3, 0.1, 1) if args.quick else (args.json_seconds, 0.3, args.rounds)
    workers = default_workers()
    results: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="exo-bench-") as tmp:
        keys = write_keys(Path(tmp) / "keys", f"bench:{KEY_A}\n")
        with contextlib.ExitStack() as stack:
            double = stack.enter_context(
                run_double("--instance", MODEL, "--stream-delay", str(STREAM_DELAY), "-q")
            )
            one = stack.enter_context(run_gateway(_bench_config(keys, double.url, 1)))
            many = stack.enter_context(run_gateway(_bench_config(keys, double.url, workers)))
            nginx = stack.enter_context(run_nginx(double.port, workers))
            targets: dict[str, tuple[str, dict[str, str]]] = {
                "direct": (double.url, HEADERS),
                "gw-1": (one.url, HEADERS),
                f"gw-{workers}": (many.url, HEADERS),
                "nginx": (nginx, HEADERS),
            }
            if args.litellm:
                litellm = stack.enter_context(run_litellm(args.litellm, double.url))
                targets["litellm"] = (litellm, {"Authorization": f"Bearer {LITELLM_KEY}"})
            load = stack.enter_context(concurrent.futures.ProcessPoolExecutor(max_workers=1))
            for url, headers in targets.values():  # warm-up: connections, caches, imports
                load.submit(run_load, url, "chat", 4, 1.0, 0.0, headers).result()
            print(
                f"# {os.cpu_count()} CPUs; python {sys.version.split()[0]}; "
                f"aiohttp {aiohttp.__version__}; gateway workers {workers}, "
                f"nginx worker_processes {workers}",
                flush=True,
            )
            for workload in ("json", "chat", "sse"):
                for clients in CLIENTS[workload]:
                    here = {
                        name: target
                        for name, target in targets.items()
                        if not (name == "litellm" and workload == "json")
                    }
                    merged = {name: Result(0, 0.0, [], [], 0) for name in here}
                    for _ in range(rounds):
                        for name, (url, headers) in here.items():
                            result = load.submit(
                                run_load, url, workload, clients, json_s, warmup, headers
                            ).result()
                            merged[name].merge(result)
                    row = {name: r.summary() for name, r in merged.items()}
                    results.setdefault(workload, {})[str(clients)] = row
                    _print_row(workload, clients, row)
    print(f"# total {time.monotonic() - began:.0f} s")
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))
    return 0


def _print_row(workload: str, clients: int, row: dict[str, dict[str, float]]) -> None:
    what = {
        "json": "GET /node_id, latency per request",
        "chat": "non-streamed chat completions, latency per request",
        "sse": "SSE streams, latency per event from the request",
    }[workload]
    rate = "streams/s" if workload == "sse" else "req/s"
    print(f"\n## {workload}, {clients} clients ({what}; ms)")
    header = f"{'target':8} {rate:>9} {'p50':>8} {'p99':>8} {'x direct':>8} {'+p50':>8} {'+p99':>8}"
    if workload == "sse":
        header += f" {'1st p50':>8} {'+1st p50':>8}"
    print(header + f" {'errors':>6}")
    base = row["direct"]
    for name, r in row.items():
        ratio = r["rps"] / base["rps"] if base["rps"] else float("nan")
        direct = name == "direct"
        added50 = f"{'-':>8}" if direct else _ms(r["p50"] - base["p50"])
        added99 = f"{'-':>8}" if direct else _ms(r["p99"] - base["p99"])
        line = f"{name:8} {r['rps']:9.1f} {_ms(r['p50'])} {_ms(r['p99'])} {ratio:8.2f}"
        line += f" {added50} {added99}"
        if workload == "sse":
            first = f"{'-':>8}" if direct else _ms(r["first_p50"] - base["first_p50"])
            line += f" {_ms(r['first_p50'])} {first}"
        print(line + f" {int(r['errors']):6d}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
