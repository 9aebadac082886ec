"""A real NOTIFY_SOCKET for tests: a datagram socket that records every sd_notify message."""

from __future__ import annotations

import os
import socket
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Message:
    at: float  # time.monotonic() when received
    fields: dict[str, str]


class NotifyListener:
    """Binds a datagram socket (a path, or an abstract ``@name``) and records messages."""

    def __init__(self, abstract: bool = False) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._dir: str | None = None
        if abstract:
            name = f"exo-nixos-test-{os.getpid()}-{id(self)}"
            self.sock.bind(b"\0" + name.encode())
            self.address = "@" + name
        else:
            self._dir = tempfile.mkdtemp(prefix="notify-")
            self.address = str(Path(self._dir) / "notify.sock")
            self.sock.bind(self.address)
        self.sock.settimeout(0.1)
        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._stop = False
        self._thread = threading.Thread(target=self._loop, daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            fields: dict[str, str] = {}
            for line in data.decode().splitlines():
                key, _, value = line.partition("=")
                fields[key] = value
            with self._cond:
                self.messages.append(Message(time.monotonic(), fields))
                self._cond.notify_all()

    def env(self, watchdog_sec: float | None = None) -> dict[str, str]:
        env = {"NOTIFY_SOCKET": self.address}
        if watchdog_sec is not None:
            env["WATCHDOG_USEC"] = str(int(watchdog_sec * 1_000_000))
        return env

    def wait_for(
        self, key: str, value: str | None = None, timeout: float = 15.0, *, prefix: str = ""
    ) -> Message:
        """The first message with ``key`` (equal to ``value``, or starting with ``prefix``)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.messages:
                    got = msg.fields.get(key)
                    if got is None or not got.startswith(prefix):
                        continue
                    if value is None or got == value:
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    seen = [m.fields for m in self.messages]
                    raise AssertionError(f"no {key}={value or '*'} within {timeout}s; got {seen}")
                self._cond.wait(left)

    def all(self, key: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if key in m.fields]

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()
        if self._dir:
            for child in Path(self._dir).iterdir():
                child.unlink()
            os.rmdir(self._dir)
