"""Start the EXO test double as a real subprocess from tests, or install it as a fake ``exo``.

``run_double(...)`` starts ``python -m tests.exo_double`` on a free port and waits until
``GET /node_id`` answers. ``make_fake_exo_package(dir)`` writes ``dir/bin/exo``, an
executable that runs the double with whatever flags it is given, so code that launches
``<package>/bin/exo`` (the supervisor, ``hardware.packages.*``) can be pointed at it.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from exo_nixos.exoapi import run_coroutine
from tests.exo_double.cluster import random_node_id

REPO_ROOT = Path(__file__).resolve().parents[2]


def _port_range() -> range:
    """Ports below the kernel's ephemeral range, which it never hands to a connect() or a
    bind to port 0: a port taken from here stays free until a child binds it."""
    try:
        low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        low = 32768
    return range(max(1024, low - 12000), low)


_PORTS = _port_range()
# start where no other test process on this machine (another pytest run) is likely to be
_next_port = itertools.count(os.getpid() * 7919 % len(_PORTS))


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    """A TCP (or, with ``kind=socket.SOCK_DGRAM``, UDP) port free on 127.0.0.1, never handed
    out twice in this process and outside the ephemeral range (so no outgoing connection
    takes it before the child that is told it binds it)."""
    for _ in range(len(_PORTS)):
        port = _PORTS[next(_next_port) % len(_PORTS)]
        with socket.socket(socket.AF_INET, kind) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port below the ephemeral range")


def double_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment with the repository root on PYTHONPATH."""
    env = dict(os.environ)
    old = env.get("PYTHONPATH")
    env["PYTHONPATH"] = f"{REPO_ROOT}{os.pathsep}{old}" if old else str(REPO_ROOT)
    if extra:
        env.update(extra)
    return env


def double_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tests.exo_double", *args]


async def http_json(
    method: str, url: str, body: Any = None, within: float = 5.0
) -> tuple[int, Any]:
    """One HTTP request; returns the status and the decoded JSON body (or the text)."""
    client_timeout = aiohttp.ClientTimeout(total=within)
    async with (
        aiohttp.ClientSession(timeout=client_timeout) as session,
        session.request(method, url, json=body) as response,
    ):
        text = await response.text()
        try:
            return response.status, json.loads(text)
        except ValueError:
            return response.status, text


async def _answers(url: str) -> bool:
    try:
        status, _ = await http_json("GET", f"{url}/node_id", within=1.0)
    except (aiohttp.ClientError, TimeoutError):
        return False
    return status == 200


@dataclass
class DoubleProcess:
    """A running double: its process, port, node id and the file its stderr goes to."""

    process: subprocess.Popen[bytes]
    port: int
    node_id: str
    log_path: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_until_answering(self, timeout: float = 20.0) -> None:
        """Poll ``GET /node_id`` until it answers 200; fail if the process exits first."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"exo double exited with {self.process.returncode} before answering:\n"
                    + self.log_text()
                )
            if run_coroutine(_answers(self.url)):
                return
            time.sleep(0.05)
        raise TimeoutError(f"exo double at {self.url} did not answer in {timeout}s")

    def set_fault(
        self, mode: str, *, exit_code: int | None = None, paths: Sequence[str] = ()
    ) -> Any:
        """``POST /__double__/fault``; ``paths`` limits the fault to those routes."""
        body: dict[str, Any] = {"mode": mode, "paths": list(paths)}
        if exit_code is not None:
            body["exitCode"] = exit_code
        status, answer = run_coroutine(http_json("POST", f"{self.url}/__double__/fault", body))
        if status != 200:
            raise RuntimeError(f"fault {mode!r} refused: {status} {answer}")
        return answer

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``timeout``; returns the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        return self.process.returncode


@contextlib.contextmanager
def run_double(
    *args: str,
    node_id: str | None = None,
    port: int | None = None,
    wait: bool = True,
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[DoubleProcess]:
    """Run the double with ``args`` (exo's and the double's flags) on ``port`` (default: free).

    ``--api-port`` and ``--node-id`` are added unless given in ``args``. With ``wait`` the
    context is entered once ``/node_id`` answers. The process is stopped on exit.
    """
    argv = list(args)
    if "--api-port" not in argv:
        argv += ["--api-port", str(port or free_port())]
    api_port = int(argv[argv.index("--api-port") + 1])
    if "--node-id" in argv:
        node = argv[argv.index("--node-id") + 1]
    else:
        node = node_id or random_node_id()
        argv += ["--node-id", node]
    with tempfile.TemporaryDirectory(prefix="exo-double-") as tmp:
        log_path = Path(tmp) / "stderr.log"
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                double_command(*argv),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=double_env(env),
                cwd=REPO_ROOT,
            )
        double = DoubleProcess(process=process, port=api_port, node_id=node, log_path=log_path)
        try:
            if wait:
                double.wait_until_answering(timeout)
            yield double
        finally:
            double.stop()


def make_fake_exo_package(root: Path, *double_args: str, python: str | None = None) -> Path:
    """Write ``root/bin/exo``, running the double with its arguments plus ``double_args``.

    Returns ``root``, usable wherever an exo package path is expected. ``double_args``
    (for example ``--node-id abc --bind 127.0.0.1``) come after the caller's arguments.
    """
    bin_dir = root / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    exe = bin_dir / "exo"
    extra = " ".join(shlex.quote(a) for a in double_args)
    exe.write_text(
        "#!/bin/sh\n"
        "# EXO test double standing in for the exo executable.\n"
        f"PYTHONPATH={shlex.quote(str(REPO_ROOT))}${{PYTHONPATH:+:$PYTHONPATH}}\n"
        "export PYTHONPATH\n"
        f'exec {shlex.quote(python or sys.executable)} -m tests.exo_double "$@" {extra}\n'
    )
    exe.chmod(0o755)
    return root
