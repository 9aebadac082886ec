"""The backend pool: the cluster's node APIs, health-checked, chosen by load.

Backends come from three places: the local node (``http://127.0.0.1:{apiPort}``), the peers
listed in the cluster state of a node that answers (each peer's address plus the API port,
which upstream requires to be equal on every node), and ``gateway.staticBackends``. A health
check probes every backend each ``healthCheck.intervalSec`` with the node API client: a backend
is up after one passing probe and down after ``healthCheck.failures`` failed ones in a row, or
at once when a request to it cannot connect.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import itertools
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from exo_nixos import exoapi
from exo_nixos.addresses import multiaddr, url_for
from exo_nixos.exoapi import NodeView
from exo_nixos.gateway.metrics import GatewayMetrics
from exo_nixos.gateway.shared import SharedTable, TableFull
from exo_nixos.hysteresis import UpDown

log = logging.getLogger(__name__)


Probe = Callable[[str, float], Awaitable[NodeView]]

# rows of the shared backend table: the cluster's node APIs, and addresses they move to
BACKEND_ROWS = 1024
# the one shared field of a backend's row: when a request found it failing
_FAILED_AT = 0


def backend_table(workers: int = 1) -> SharedTable:
    """The table of the backends' state shared by ``workers`` processes (see BackendPool)."""
    return SharedTable(BACKEND_ROWS, 1, workers)


async def default_probe(base_url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
    """The node API client's probe: ``/node_id``, ``/state`` and ``/models``."""
    return await exoapi.probe(base_url, timeout)


def address_host(address: str) -> str | None:
    """The IP address in a peer address: a bare IP, ``host:port``, ``[v6]:port`` or a multiaddr
    (``/ip4/10.0.0.2/tcp/52414``). None for anything else and for link-local IPv6 (it would
    need an interface scope the gateway cannot know)."""
    text = address.strip()
    if text.startswith("/"):
        found = multiaddr(text)
        text = found[1] if found and found[0] in {"ip4", "ip6"} else ""
    elif text.startswith("["):
        text = text[1:].partition("]")[0]
    elif text.count(":") == 1:
        text = text.partition(":")[0]
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if ip.is_unspecified or (ip.version == 6 and ip.is_link_local):
        return None
    return str(ip)


def without_credentials(url: str) -> str:
    """``url`` without a user name and password (what logs, metrics and /health show)."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


@dataclass(eq=False)
class Backend:
    """One node API. ``urls`` are the addresses it may answer on; ``url`` the one in use."""

    urls: list[str]
    source: str  # "local", "static" or "peer"
    node_id: str | None = None
    # A peer is the node the cluster state names: its API must answer /node_id with this id.
    # The local node and static backends have none; they are whichever node answers.
    expected_node_id: str | None = None
    healthy: bool = False
    reported: bool | None = None  # the state last logged; None before the first
    probes: UpDown = field(kw_only=True)  # limit: the pool's healthCheck.failures
    inflight: int = 0
    confirmed: float = 0.0  # time.monotonic() of the last probe that found it up
    _index: int = field(default=0, repr=False)

    @property
    def url(self) -> str:
        return self.urls[self._index % len(self.urls)]

    @property
    def label(self) -> str:
        """The backend's name in logs, metrics and ``/health``: never a password."""
        return without_credentials(self.urls[0])

    def next_address(self) -> None:
        self._index = (self._index + 1) % len(self.urls)


class BackendPool:
    """Health-checked backends; ``candidates()`` gives the order to try them for a request."""

    def __init__(
        self,
        *,
        local_url: str | None,
        static_urls: Iterable[str],
        api_port: int,
        interval: float,
        timeout: float,
        failures: int,
        metrics: GatewayMetrics,
        probe: Probe = default_probe,
        shared: SharedTable | None = None,
    ) -> None:
        self.api_port = api_port
        # Shared with the other worker processes (one per backend label): when a request
        # found the backend failing (field 0, time.monotonic()) and each worker's requests
        # in flight there. A failure any worker saw holds until this worker's next passing
        # probe, so no worker keeps sending requests to a node another found down.
        self.shared = shared or backend_table()
        self.interval = interval
        self.timeout = timeout
        self.failure_threshold = failures
        self.metrics = metrics
        self._probe = probe
        self.local = Backend([local_url], "local", probes=UpDown(failures)) if local_url else None
        self.static = [
            Backend([url], "static", probes=UpDown(failures)) for url in dict.fromkeys(static_urls)
        ]
        self.peers: dict[str, Backend] = {}
        self._turn = itertools.count()
        self._task: asyncio.Task[None] | None = None
        self.checked = asyncio.Event()
        self._none_up: bool | None = None  # whether no backend was up when last logged
        for backend in self.all():
            self._publish(backend)

    def all(self) -> list[Backend]:
        fixed = [self.local] if self.local else []
        return fixed + self.static + list(self.peers.values())

    def healthy(self) -> list[Backend]:
        return [b for b in self.all() if self.up(b)]

    def _row(self, backend: Backend) -> int | None:
        try:
            return self.shared.row(backend.label)
        except TableFull:
            return None

    def up(self, backend: Backend) -> bool:
        """Up by this worker's probes, and not found failing by a request (in any worker)
        since the last of them passed."""
        if not backend.healthy:
            return False
        row = self._row(backend)
        return row is None or self.shared.get(row, _FAILED_AT) <= backend.confirmed

    def load(self, backend: Backend) -> int:
        """Requests in flight at ``backend`` from every worker."""
        row = self._row(backend)
        return backend.inflight if row is None else int(self.shared.total(row))

    def candidates(self) -> list[Backend]:
        """Healthy backends, least busy first, ties taken in turn; when none is healthy, the
        others (a stale health state must not turn every request away)."""
        backends = self.all()
        if not backends:
            return []
        start = next(self._turn) % len(backends)
        rotated = backends[start:] + backends[:start]
        healthy = [b for b in rotated if self.up(b)]
        chosen = healthy or rotated
        return sorted(chosen, key=self.load)

    def mark_failed(self, backend: Backend, reason: str) -> None:
        """A request could not reach the backend: it is down until a probe passes."""
        backend.probes.give_up()
        row = self._row(backend)
        if row is not None:
            self.shared.set(row, _FAILED_AT, time.monotonic())
        self._set_health(backend, False, reason)
        if len(backend.urls) > 1:
            backend.next_address()
        self._publish(backend)
        self._report_pool()

    def _publish(self, backend: Backend) -> None:
        self.metrics.backend_up.labels(backend.label).set(1 if backend.healthy else 0)
        self.metrics.inflight(backend.label, backend.inflight)
        self.metrics.backends_healthy.set(len(self.healthy()))

    def started(self, backend: Backend) -> None:
        backend.inflight += 1
        self._count(backend)

    def finished(self, backend: Backend) -> None:
        backend.inflight -= 1
        self._count(backend)

    def _count(self, backend: Backend) -> None:
        row = self._row(backend)
        if row is not None:
            self.shared.set_own(row, backend.inflight)
        self.metrics.inflight(backend.label, backend.inflight)

    async def _check(self, backend: Backend) -> NodeView | None:
        """Probe one backend. Up: its API answers and reports no problem (a node that has
        not reached a master, or whose /state or /models fail, cannot serve requests)."""
        view: NodeView | None = None
        wrong_node = False
        try:
            view = await self._probe(backend.url, self.timeout)
        except Exception as exc:  # the probe's errors and anything a broken peer causes
            reason = str(exc) or type(exc).__name__
        else:
            reason = "; ".join(view.problems)
            if backend.expected_node_id is None:
                backend.node_id = view.node_id
            elif view.node_id != backend.expected_node_id:
                # e.g. a peer's fallback address that is this host: another node answers
                # there, which must not count as the peer (nor as a second healthy node)
                reason = (
                    f"{backend.url} answers as node {view.node_id}, "
                    f"not as {backend.expected_node_id}"
                )
                wrong_node = True
                view = None
        if not reason:
            backend.probes.passed()
            backend.confirmed = time.monotonic()
            self._set_health(backend, True, "")
        else:
            backend.probes.failed_probe()
            # down: another node answered, enough probes failed, or it never was up (the
            # first failure says why, once)
            never_up = backend.reported is None
            if wrong_node or never_up or backend.probes.failing:
                self._set_health(backend, False, reason)
            if not backend.healthy and len(backend.urls) > 1:
                backend.next_address()
        self._publish(backend)
        return view

    def _set_health(self, backend: Backend, healthy: bool, reason: str) -> None:
        """Set a backend's state; log it when it changes (not on every probe or request)."""
        backend.healthy = healthy
        if backend.reported is healthy:
            return
        backend.reported = healthy
        if healthy:
            log.info("backend %s up (node %s)", without_credentials(backend.url), backend.node_id)
        else:
            log.warning("backend %s down: %s", backend.label, reason)

    def _report_pool(self) -> None:
        """Log when the pool goes from some backend up to none, and back."""
        up = len(self.healthy())
        if (up == 0) is self._none_up:
            return
        previous, self._none_up = self._none_up, up == 0
        if up == 0:
            log.error(
                "no EXO backend is up (%d known): requests get 502 until one is",
                len(self.all()),
            )
        elif previous:
            log.info("EXO backends up again: %d of %d", up, len(self.all()))

    def _discover(self, view: NodeView) -> list[Backend]:
        """Make the pool's peers those of ``view`` (its own node and fixed backends aside);
        return the peers new to the pool."""
        new: list[Backend] = []
        known = {b.node_id for b in [self.local, *self.static] if b and b.node_id}
        known.add(view.node_id)
        seen: set[str] = set()
        for peer in view.peers:
            if peer.node_id in known:
                continue
            # Where the node reached the peer's API first, then its other addresses.
            hosts = [h for h in (address_host(a) for a in peer.addresses) if h]
            urls = list(
                dict.fromkeys([*peer.api_urls, *(url_for(h, self.api_port) for h in hosts)])
            )
            if not urls:
                continue
            seen.add(peer.node_id)
            current = self.peers.get(peer.node_id)
            if current is None:
                log.info("peer %s found at %s", peer.node_id, ", ".join(urls))
                backend = Backend(
                    urls,
                    "peer",
                    node_id=peer.node_id,
                    expected_node_id=peer.node_id,
                    probes=UpDown(self.failure_threshold),
                )
                self.peers[peer.node_id] = backend
                self._publish(backend)
                new.append(backend)
            elif current.urls != urls:
                current.urls = urls
        for node_id in list(self.peers):
            if node_id not in seen:
                gone = self.peers.pop(node_id)
                log.info("peer %s left the cluster state", node_id)
                self.metrics.forget_backend(gone.label)
        self.metrics.backends_healthy.set(len(self.healthy()))
        return new

    async def check_once(self) -> None:
        """Probe every backend; learn the peers from the first node that answers."""
        backends = self.all()
        views = await asyncio.gather(*(self._check(b) for b in backends))
        # The local node's view first: it is the node this gateway belongs to.
        for view in views:
            if view is not None and view.state_ok:
                new = self._discover(view)
                await asyncio.gather(*(self._check(b) for b in new))
                break
        self._report_pool()
        self.checked.set()

    async def run(self) -> None:
        while True:
            try:
                await self.check_once()
            except Exception:  # keep checking; one bad round must not stop health checks
                log.exception("health check round failed")
            await asyncio.sleep(self.interval)

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self.run(), name="exo-gateway-health")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    def summary(self) -> dict[str, int]:
        return {"healthy": len(self.healthy()), "total": len(self.all())}

    def describe(self) -> list[dict[str, Any]]:
        """Each backend as ``/health`` lists it: the address in use (without credentials),
        its node, whether it is up and the requests it serves now."""
        return [
            {
                "url": without_credentials(b.url),
                "nodeId": b.node_id,
                "source": b.source,
                "up": self.up(b),
                "inflight": self.load(b),
            }
            for b in self.all()
        ]
