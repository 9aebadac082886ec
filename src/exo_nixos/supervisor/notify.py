"""The sd_notify protocol, spoken directly over the ``NOTIFY_SOCKET`` datagram socket.

systemd passes ``NOTIFY_SOCKET`` (a filesystem path, or ``@name`` for the abstract namespace)
to ``Type=notify`` services, and ``WATCHDOG_USEC`` (plus ``WATCHDOG_PID``) when ``WatchdogSec=``
is set. Outside systemd there is no socket and every message is silently dropped, so the
supervisor runs unchanged in a terminal.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping

log = logging.getLogger(__name__)


def _address(value: str) -> str | bytes | None:
    if not value:
        return None
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    if value.startswith("/"):
        return value
    return None  # vsock:… and other forms are not used for system services


class Notifier:
    """Sends sd_notify messages; a no-op when the service manager did not ask for them."""

    def __init__(self, address: str | bytes | None, watchdog_usec: int | None = None) -> None:
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._last_status: str | None = None

    @classmethod
    def from_environ(
        cls, environ: Mapping[str, str] | None = None, *, pid: int | None = None
    ) -> Notifier:
        """Read NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID (as sd_watchdog_enabled)."""
        env = os.environ if environ is None else environ
        address = _address(env.get("NOTIFY_SOCKET", ""))
        watchdog: int | None = None
        try:
            usec = int(env.get("WATCHDOG_USEC", ""))
        except ValueError:
            usec = 0
        owner = env.get("WATCHDOG_PID", "")
        ours = not owner or owner == str(os.getpid() if pid is None else pid)
        if usec > 0 and ours:
            watchdog = usec
        return cls(address, watchdog)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_sec(self) -> float | None:
        return None if self.watchdog_usec is None else self.watchdog_usec / 1_000_000

    def send(self, *fields: str) -> bool:
        """Send one datagram of ``KEY=VALUE`` lines; False when not delivered."""
        if self.address is None:
            return False
        payload = "\n".join(fields).encode()
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(payload, self.address)
        except OSError as exc:
            log.debug("sd_notify %r not delivered: %s", payload[:40], exc)
            return False
        return True

    def ready(self, status: str | None = None) -> bool:
        return self._send_state("READY=1", status)

    def status(self, text: str) -> bool:
        """Send ``STATUS=``; repeated identical text is not resent."""
        if text == self._last_status:
            return True
        self._last_status = text
        return self.send(_status_field(text))

    def watchdog(self) -> bool:
        return self.send("WATCHDOG=1")

    def stopping(self, status: str | None = None) -> bool:
        return self._send_state("STOPPING=1", status)

    def _send_state(self, state: str, status: str | None) -> bool:
        """``state`` (``READY=1``, ``STOPPING=1``) with an optional ``STATUS=`` in one message."""
        if status is None:
            return self.send(state)
        self._last_status = status
        return self.send(state, _status_field(status))

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _status_field(text: str) -> str:
    return "STATUS=" + " ".join(text.split())
