"""Client connections: at most ``maxConnectionsPerAddress`` open per client address, and a new
connection closed when its first request's headers have not arrived within
``headerReadTimeoutSec``.

aiohttp's connection handler (``RequestHandler``) is wrapped in a protocol that counts the
connection and arms the deadline; the idle time between requests is aiohttp's own
``keepalive_timeout`` (``keepAliveTimeoutSec``), which also runs while a request's headers
are incomplete.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from exo_nixos.gateway.metrics import GatewayMetrics

log = logging.getLogger(__name__)

ProtocolFactory = Callable[[], asyncio.Protocol]


class ConnectionLimits:
    """The open connections by client address, and the header-read deadlines of those that
    have not sent a request yet."""

    def __init__(self, *, per_address: int, header_timeout: float, metrics: GatewayMetrics):
        self.per_address = per_address
        self.header_timeout = header_timeout
        self.metrics = metrics
        self._open: dict[str, int] = {}
        self._refusing: set[str] = set()  # addresses at the limit (logged once, on the change)
        self._deadlines: dict[asyncio.BaseTransport, asyncio.TimerHandle] = {}

    def wrap(self, factory: ProtocolFactory) -> ProtocolFactory:
        """A protocol factory for ``loop.create_server`` around aiohttp's."""
        return lambda: _Guarded(self, factory)

    def arrived(self, transport: asyncio.BaseTransport | None) -> None:
        """A request's headers arrived on ``transport``: its header-read deadline is off."""
        if transport is not None:
            deadline = self._deadlines.pop(transport, None)
            if deadline is not None:
                deadline.cancel()

    def admit(self, transport: asyncio.BaseTransport, address: str) -> bool:
        count = self._open.get(address, 0)
        if count >= self.per_address:
            self.metrics.connections_refused.inc()
            if address not in self._refusing:
                self._refusing.add(address)
                log.warning(
                    "client %s has %d connections open, the most allowed "
                    "(maxConnectionsPerAddress): closing its new ones until some close",
                    address,
                    count,
                )
            return False
        self._open[address] = count + 1
        self.metrics.connections_open.inc()
        loop = asyncio.get_running_loop()
        self._deadlines[transport] = loop.call_later(
            self.header_timeout, self._header_timeout, transport, address
        )
        return True

    def _header_timeout(self, transport: asyncio.BaseTransport, address: str) -> None:
        self._deadlines.pop(transport, None)
        self.metrics.header_timeouts.inc()
        log.debug(
            "closing a connection from %s: no request within %gs", address, self.header_timeout
        )
        transport.close()

    def closed(self, transport: asyncio.BaseTransport, address: str) -> None:
        self.arrived(transport)
        count = self._open.get(address, 0) - 1
        if count > 0:
            self._open[address] = count
        else:
            self._open.pop(address, None)
        self.metrics.connections_open.dec()
        if address in self._refusing and count < self.per_address:
            self._refusing.discard(address)
            log.info("client %s is below maxConnectionsPerAddress again", address)


def _address(transport: asyncio.BaseTransport) -> str:
    peer = transport.get_extra_info("peername")
    if isinstance(peer, tuple) and peer:
        return str(peer[0])
    return "unknown"


class _Guarded(asyncio.Protocol):
    """One client connection: aiohttp's handler behind the limits of ``ConnectionLimits``."""

    def __init__(self, limits: ConnectionLimits, factory: ProtocolFactory) -> None:
        self._limits = limits
        self._factory = factory
        self._inner: asyncio.Protocol | None = None
        self._transport: asyncio.BaseTransport | None = None
        self._address = ""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._address = _address(transport)
        if not self._limits.admit(transport, self._address):
            transport.close()
            return
        self._transport = transport
        self._inner = self._factory()
        self._inner.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._inner is None or self._transport is None:
            return
        self._limits.closed(self._transport, self._address)
        self._inner.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._inner is not None:
            self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        return self._inner.eof_received() if self._inner is not None else None

    def pause_writing(self) -> None:
        if self._inner is not None:
            self._inner.pause_writing()

    def resume_writing(self) -> None:
        if self._inner is not None:
            self._inner.resume_writing()
