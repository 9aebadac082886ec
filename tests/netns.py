"""Real network namespaces for tests: created with iproute2, removed by a finalizer.

Only interfaces and addresses inside namespaces created here are used; nothing is sent
anywhere else.
"""

from __future__ import annotations

import itertools
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
_counter = itertools.count()


def netns_unavailable() -> str | None:
    if os.geteuid() != 0:
        return "network namespaces need root"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    return None


class Netns:
    def __init__(self, name: str) -> None:
        self.name = name

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.name, *args], check=True, capture_output=True)

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            ["ip", "netns", "exec", self.name, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
            cwd=REPO,
        )

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            ["ip", "netns", "exec", self.name, *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )

    def python(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        return self.run(sys.executable, *args, timeout=timeout)

    def write_sysctl(self, key: str, value: str) -> None:
        path = "/proc/sys/" + key.replace(".", "/")
        self.run("sh", "-c", f"echo {value} > {path}").check_returncode()

    def veth(self, a: str, b: str) -> None:
        self.ip("link", "add", a, "type", "veth", "peer", "name", b)
        self.ip("link", "set", a, "up")
        self.ip("link", "set", b, "up")

    def wait_link_local(self, name: str, timeout: float = 20) -> str:
        """Wait until ``name`` has a usable (non-tentative) IPv6 link-local address."""
        deadline = time.monotonic() + timeout
        while True:
            text = self.run("cat", "/proc/net/if_inet6").stdout
            for line in text.splitlines():
                fields = line.split()
                if (
                    len(fields) == 6
                    and fields[5] == name
                    and fields[0].startswith("fe80")
                    and not int(fields[4], 16) & 0x48
                ):
                    return fields[0]
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} got no usable link-local address:\n{text}")
            time.sleep(0.2)


def make_netns() -> Iterator[Netns]:
    reason = netns_unavailable()
    if reason:
        pytest.skip(reason)
    name = f"exonixos-{os.getpid()}-{next(_counter)}"
    created = subprocess.run(
        ["ip", "netns", "add", name], capture_output=True, text=True, check=False
    )
    if created.returncode != 0:
        pytest.skip(f"cannot create a network namespace: {created.stderr.strip()}")
    ns = Netns(name)
    try:
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", name], capture_output=True, check=False)


class LineReader:
    """Read a subprocess's stdout line by line with a deadline (a thread feeds a queue)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.thread = threading.Thread(target=self._pump, daemon=True)
        self.thread.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for text in self.proc.stdout:
            self.lines.put(text)
        self.lines.put(None)

    def line(self, timeout: float = 30) -> str:
        try:
            text = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError("no output in time from the watcher") from None
        if text is None:
            err = self.proc.stderr.read() if self.proc.stderr else ""
            raise AssertionError(f"the watcher exited: {err}")
        return text

    def stop(self) -> str:
        self.proc.terminate()
        try:
            _, err = self.proc.communicate(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return err
