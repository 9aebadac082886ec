"""Watch the cluster interface(s) through netlink and report link up/down at once.

``LinkWatcher`` subscribes to rtnetlink link notifications (pyroute2's asyncio socket, imported
when the watcher starts), takes a snapshot of the watched links, then reports every change of a
watched link's up/down state as a ``LinkEvent``: through a callback, an async iterator, or both.
``link_health`` turns the current states into one verdict for health and STATUS, including
failover to a backup interface.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect as _inspect
import logging
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from exo_nixos.errors import UserError

if TYPE_CHECKING:
    from exo_nixos.config import Config

log = logging.getLogger(__name__)

IFF_UP = 0x1
IFF_LOWER_UP = 0x10000
RTM_NEWLINK = 16
RTM_DELLINK = 17
RTMGRP_LINK = 0x1
_DOWN_STATES = {"down", "lowerlayerdown", "notpresent", "dormant", "testing"}
RESYNC_DELAY_SEC = 1.0


@dataclass(frozen=True)
class LinkState:
    name: str
    present: bool
    up: bool
    operstate: str  # lower-case kernel operstate, or "absent"
    ifindex: int | None = None

    @classmethod
    def absent(cls, name: str) -> LinkState:
        return cls(name=name, present=False, up=False, operstate="absent")


@dataclass(frozen=True)
class LinkEvent:
    """A watched link's state changed (``previous`` is None for the first report)."""

    name: str
    previous: LinkState | None
    current: LinkState

    @property
    def up(self) -> bool:
        return self.current.up

    def describe(self) -> str:
        state = "up" if self.current.up else f"down ({self.current.operstate})"
        if self.previous is None:
            return f"{self.name} is {state}"
        return f"{self.name} went {state}"


@dataclass(frozen=True)
class LinkHealth:
    state: Literal["up", "degraded", "down"]
    active: str | None  # the interface carrying the cluster traffic now
    failover: bool  # the primary is down and the backup carries the traffic
    message: str


def link_health(
    states: dict[str, LinkState], interfaces: Sequence[str], backup: str | None = None
) -> LinkHealth:
    """One verdict from the link states: ``interfaces[0]`` is the cluster interface."""
    if not interfaces:
        return LinkHealth("up", None, False, "no cluster interface configured")
    primary, extras = interfaces[0], list(interfaces[1:])

    def is_up(name: str) -> bool:
        state = states.get(name)
        return state is not None and state.up

    def why(name: str) -> str:
        state = states.get(name)
        return state.operstate if state is not None else "unknown"

    extras_down = [e for e in extras if not is_up(e)]
    extra_note = (
        f"; extra interface(s) down: {', '.join(f'{e} ({why(e)})' for e in extras_down)}"
        if extras_down
        else ""
    )
    if is_up(primary):
        state: Literal["up", "degraded"] = "degraded" if extras_down else "up"
        return LinkHealth(state, primary, False, f"cluster interface {primary} up{extra_note}")
    if backup is not None and backup != primary and is_up(backup):
        return LinkHealth(
            "degraded",
            backup,
            True,
            f"cluster interface {primary} down ({why(primary)}); failed over to backup "
            f"{backup}{extra_note}",
        )
    alive = [e for e in extras if is_up(e)]
    if alive:
        return LinkHealth(
            "degraded",
            alive[0],
            False,
            f"cluster interface {primary} down ({why(primary)}); only {', '.join(alive)} up",
        )
    backup_note = f"; backup {backup} down ({why(backup)})" if backup else "; no backup interface"
    return LinkHealth(
        "down", None, False, f"cluster interface {primary} down ({why(primary)}){backup_note}"
    )


def state_from_message(msg: Any) -> LinkState | None:
    """A LinkState from a pyroute2 RTM_NEWLINK/RTM_DELLINK message (None if unnamed)."""
    name = msg.get("ifname")
    if not isinstance(name, str):
        return None
    if msg["header"]["type"] == RTM_DELLINK:
        return LinkState.absent(name)
    flags = int(msg.get("flags") or 0)
    operstate = str(msg.get("operstate") or "unknown").lower()
    up = bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP) and operstate not in _DOWN_STATES
    return LinkState(name=name, present=True, up=up, operstate=operstate, ifindex=msg.get("index"))


class LinkWatcher:
    """Report up/down changes of the named links, from netlink, without polling.

    Use as ``async with LinkWatcher(names, callback) as watcher:`` and read ``watcher.states``,
    or iterate ``async for event in watcher``. The first event per link (``previous`` None)
    reports its state at start; later ones report changes. A link that does not exist is
    ``absent`` (down) and is picked up when it appears. If the netlink socket fails (e.g. the
    receive buffer overflowed) the watcher reopens it and re-reads every link, so no change is
    lost for good.
    """

    def __init__(
        self,
        names: Iterable[str],
        callback: Callable[[LinkEvent], object] | None = None,
    ) -> None:
        self.names = list(dict.fromkeys(names))
        if not self.names:
            raise ValueError("LinkWatcher needs at least one interface name")
        self._callback = callback
        self._states: dict[str, LinkState] = {}
        self._queue: asyncio.Queue[LinkEvent | BaseException | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._socket: Any = None
        self._started = False

    @property
    def states(self) -> dict[str, LinkState]:
        return dict(self._states)

    async def start(self) -> None:
        """Subscribe, read the current state of every link, report it; then watch."""
        if self._started:
            return
        self._socket = await self._open()
        await self._snapshot()
        self._started = True
        self._task = asyncio.get_running_loop().create_task(self._run(), name="link-watcher")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self._close()
        if self._started:
            self._started = False
            self._queue.put_nowait(None)

    async def __aenter__(self) -> LinkWatcher:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> AsyncIterator[LinkEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[LinkEvent]:
        while True:
            item = await self._queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    async def _open(self) -> Any:
        try:
            from pyroute2 import AsyncIPRoute
        except ImportError as exc:
            raise UserError(f"pyroute2 is not installed ({exc}); install exo-nixos fully") from None
        sock = AsyncIPRoute()
        try:
            await sock.bind(groups=RTMGRP_LINK)
        except OSError as exc:
            sock.close()
            raise UserError(
                f"cannot subscribe to netlink link events: {exc.strerror or exc}; the unit "
                "needs AF_NETLINK in RestrictAddressFamilies"
            ) from None
        return sock

    def _close(self) -> None:
        sock, self._socket = self._socket, None
        if sock is not None:
            with contextlib.suppress(Exception):
                sock.close()

    async def _snapshot(self) -> None:
        from pyroute2 import AsyncIPRoute

        seen: dict[str, LinkState] = {}
        async with AsyncIPRoute() as ipr:
            async for msg in await ipr.get_links():
                state = state_from_message(msg)
                if state is not None and state.name in self.names:
                    seen[state.name] = state
        for name in self.names:
            await self._update(seen.get(name, LinkState.absent(name)))

    async def _run(self) -> None:
        try:
            while True:
                try:
                    while True:
                        async for msg in self._socket.get():
                            if msg["header"]["type"] in (RTM_NEWLINK, RTM_DELLINK):
                                state = state_from_message(msg)
                                if state is not None:
                                    await self._on_message(state)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    log.warning("netlink link watch failed (%s); re-reading all links", exc)
                    self._close()
                    await asyncio.sleep(RESYNC_DELAY_SEC)
                    self._socket = await self._open()
                    await self._snapshot()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            self._queue.put_nowait(exc)
            raise

    async def _on_message(self, state: LinkState) -> None:
        if state.name in self.names:
            await self._update(state)
            return
        # A watched link renamed away: its ifindex now carries another name.
        for name, known in self._states.items():
            if known.present and known.ifindex is not None and known.ifindex == state.ifindex:
                await self._update(LinkState.absent(name))

    async def _update(self, state: LinkState) -> None:
        previous = self._states.get(state.name)
        self._states[state.name] = state
        if previous is not None and previous.up == state.up and previous.present == state.present:
            return
        event = LinkEvent(state.name, previous, state)
        # The callback first, so an iterator's consumer sees what the callback updated.
        if self._callback is not None:
            try:
                result = self._callback(event)
                if _inspect.isawaitable(result):
                    await result
            except Exception:
                # A failing consumer must not be mistaken for a failing netlink socket.
                log.exception("link watcher callback failed for %s", event.describe())
        self._queue.put_nowait(event)


class LinkMonitor:
    """The cluster link's health for the supervisor.

    Watches the cluster interface(s) and the backup with a ``LinkWatcher`` and keeps
    ``health`` (a ``LinkHealth``) current; ``on_change(health, event)`` runs after every
    change, so health and ``STATUS=`` can be degraded at once and restored on recovery.
    """

    def __init__(
        self,
        interfaces: Sequence[str],
        backup: str | None = None,
        on_change: Callable[[LinkHealth, LinkEvent], object] | None = None,
    ) -> None:
        if not interfaces:
            raise ValueError("LinkMonitor needs the cluster interface")
        self.interfaces = list(interfaces)
        self.backup = backup
        self._on_change = on_change
        names = self.interfaces + ([backup] if backup and backup not in self.interfaces else [])
        self.watcher = LinkWatcher(names, callback=self._changed)
        self.health = link_health({}, self.interfaces, backup)

    @classmethod
    def for_config(
        cls,
        config: Config,
        on_change: Callable[[LinkHealth, LinkEvent], object] | None = None,
        root: Path = Path("/"),
    ) -> LinkMonitor | None:
        """Watch the configured cluster interfaces, else the best candidate; None if none."""
        interfaces = config.networking.cluster_interfaces
        if not interfaces:
            from exo_nixos.network.choose import choose_cluster_interface
            from exo_nixos.network.sysfs import inspect

            chosen = choose_cluster_interface(config, inspect(root)).name
            interfaces = [chosen] if chosen else []
        if not interfaces:
            return None
        return cls(interfaces, config.networking.backup_interface, on_change)

    async def _changed(self, event: LinkEvent) -> None:
        self.health = link_health(self.watcher.states, self.interfaces, self.backup)
        if self._on_change is not None:
            result = self._on_change(self.health, event)
            if _inspect.isawaitable(result):
                await result

    async def start(self) -> None:
        await self.watcher.start()

    async def stop(self) -> None:
        await self.watcher.stop()

    async def __aenter__(self) -> LinkMonitor:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    def __aiter__(self) -> AsyncIterator[LinkEvent]:
        return aiter(self.watcher)
