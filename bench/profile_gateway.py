"""Where a proxied request's time goes in the gateway: py-spy samples of one worker under load.

    pip install py-spy   # a tool, not a dependency of the project
    python -m bench.profile_gateway [--seconds 8] [--clients 32] [--stream]

Starts one EXO test double and the gateway with one worker (an API key with a policy, so the
key check, the limiter and the usage scan are on the path), loads it with non-streamed chat
completions (or streams with ``--stream``) from a separate process, and records the gateway
with ``py-spy record --format raw`` (stacks with their sample counts). Prints the share of
samples by what the innermost frame belongs to and the functions with the most samples of
their own. All traffic stays on 127.0.0.1.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.exo_double.fixture import free_port, run_double
from tests.gateway_helpers import KEY_A, gateway_config, run_gateway, write_keys

from bench.bench_gateway import MODEL, run_load_chat

# where the innermost frame's file lies -> what it is
KINDS = (
    ("exo_nixos/gateway/", "gateway's own code"),
    ("aiohttp/web_", "aiohttp server (request, response, middleware)"),
    ("aiohttp/_http_parser", "aiohttp HTTP parser (C)"),
    ("aiohttp/http_", "aiohttp HTTP writer and parser (Python)"),
    ("aiohttp/client", "aiohttp client (request to EXO)"),
    ("aiohttp/connector", "aiohttp client connection pool"),
    ("aiohttp/streams", "aiohttp body streams"),
    ("aiohttp/", "aiohttp, other"),
    ("multidict/", "multidict (headers)"),
    ("yarl/", "yarl (URLs)"),
    ("prometheus_client/", "prometheus_client (metrics)"),
    ("json/", "json"),
    ("asyncio/", "asyncio (tasks, timeouts)"),
    ("uvloop/", "uvloop (event loop, sockets)"),
)


def kind_of(frame: str) -> str:
    for marker, kind in KINDS:
        if marker in frame:
            return kind
    if "(idle)" in frame or "select" in frame or "poll" in frame:
        return "waiting for I/O (idle)"
    return "other"


def summarise(raw: str, top: int) -> tuple[dict[str, float], list[tuple[str, float]]]:
    kinds: collections.Counter[str] = collections.Counter()
    selves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")
        leaf = frames[-1]
        total += count
        kinds[kind_of(leaf)] += count
        selves[leaf] += count
    share = {k: 100.0 * v / total for k, v in kinds.most_common()}
    return share, [(f, 100.0 * v / total) for f, v in selves.most_common(top)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--stream", action="store_true", help="SSE completions instead")
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--raw", type=Path, help="keep py-spy's raw output here")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        raise SystemExit("py-spy not found: pip install py-spy")
    with tempfile.TemporaryDirectory(prefix="exo-profile-") as tmp:
        keys = write_keys(Path(tmp) / "keys", f"bench:{KEY_A}\n")
        config = gateway_config(
            port=free_port(),
            keys_file=keys,
            interval=5.0,
            log_level="warning",
            key_policies={"bench": {"requestsPerMinute": 1_000_000, "concurrency": 10_000}},
        )
        raw_path = Path(tmp) / "raw.txt"
        with run_double("--instance", MODEL, "-q") as double:
            config["gateway"]["staticBackends"] = [double.url]
            config["gateway"]["maxConnectionsPerAddress"] = 4096
            with (
                run_gateway(config) as gateway,
                concurrent.futures.ProcessPoolExecutor(max_workers=1) as load,
            ):
                running = load.submit(
                    run_load_chat, gateway.url, args.clients, args.seconds + 2, args.stream
                )
                time.sleep(1.0)
                subprocess.run(
                    [
                        spy, "record", "--pid", str(gateway.process.pid), "--rate", "250",
                        "--duration", str(int(args.seconds)), "--format", "raw",
                        "--nonblocking", "-o", str(raw_path),
                    ],
                    check=True,
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                )  # fmt: skip
                result = running.result()
        raw = raw_path.read_text()
        if args.raw:
            args.raw.write_text(raw)
    kinds, selves = summarise(raw, args.top)
    what = "SSE" if args.stream else "non-streamed"
    print(f"# {what} chat completions, {args.clients} clients: {result.rps:.0f} req/s")
    print(json.dumps({"by_kind_percent": {k: round(v, 1) for k, v in kinds.items()}}, indent=1))
    print("# functions with the most samples of their own (percent of all samples)")
    for frame, percent in selves:
        print(f"{percent:5.1f}  {frame}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
