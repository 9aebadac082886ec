"""Run EXO as a child of the supervisor and speak for it to systemd.

- The child runs in its own session (process group), so signals reach it only through us and
  nothing it spawns (inference runners) outlives it: on exit the group is killed.
- EXO's exit is seen the moment it happens (asyncio's child watcher), not when its output pipe
  closes: a runner EXO spawned inherits that pipe and may hold it open after EXO is gone.
- SIGTERM, SIGINT and SIGHUP are forwarded; after a stop signal the child gets ``stop_timeout``
  seconds before SIGKILL, which is kept below the unit's ``TimeoutStopSec``.
- ``READY=1`` is sent once the node's API answers a probe; ``WATCHDOG=1`` after each probe that
  passes, never otherwise, so a hung EXO runs out the unit's ``WatchdogSec`` and systemd
  restarts it. ``STATUS=`` says role, master, peers, instances and accelerator.
- EXO's output passes through to the journal line by line, every byte of it; a line longer than
  ``LINE_LIMIT`` is passed on as several lines of at most that many bytes. EXO names the
  elected master only there, so those lines are read (``exoapi.parse_log_line``): the master
  shows in STATUS, in the topology snapshot, and in ``{runtimeDir}/master.json`` for
  ``exo-nixos health/status``.
- The supervisor's exit status is the child's: its exit code, or the same signal re-raised.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, Protocol

import aiohttp

from exo_nixos import exoapi
from exo_nixos.fsutil import os_reason
from exo_nixos.hysteresis import UpDown
from exo_nixos.monitoring import psi
from exo_nixos.supervisor.environment import Launch
from exo_nixos.supervisor.notify import Notifier
from exo_nixos.supervisor.snapshot import SnapshotStore, Topology

if TYPE_CHECKING:
    from exo_nixos.network.watch import LinkEvent, LinkHealth

log = logging.getLogger(__name__)


class LinkSource(Protocol):
    """What the supervisor needs of ``exo_nixos.network.LinkMonitor``."""

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
LINE_LIMIT = 1 << 20  # longer output lines are passed on in pieces of this size
DRAIN_TIMEOUT = 1.0  # seconds to read EXO's last output once its process group is gone

Probe = Callable[[str, float], Awaitable[exoapi.NodeView]]


@dataclass(frozen=True)
class Settings:
    role: str
    api_url: str
    interval: float  # seconds between health probes once ready
    timeout: float  # per probe
    failures: int  # consecutive failed probes reported as 'unhealthy'
    stop_timeout: float  # SIGTERM -> SIGKILL grace for the child
    startup_poll: float = 0.05  # seconds between readiness probes


@dataclass
class _State:
    health: UpDown  # the probes after ready: UNHEALTHY while failing
    ready: bool = False
    stopping: bool = False
    last: Topology | None = None
    node_id: str | None = None  # from EXO's "Starting node ID" line
    master_id: str | None = None  # from EXO's election lines
    problem: str | None = None  # the first reason the last probe found the node degraded
    link: str | None = None  # the cluster link's trouble, while it is not fully up


def topology_of(view: exoapi.NodeView) -> Topology:
    return Topology(
        node_id=view.node_id,
        master_id=view.master_id,
        is_master=bool(view.is_master),
        peers={p.node_id: list(p.addresses) for p in view.peers},
        instances=len(view.instances),
    )


def describe(role: str, topo: Topology | None, accelerator: str, fallback: str | None) -> str:
    """The STATUS= line, e.g. ``worker; master 3f2a… (elected); 2 peers; 1 instance; cuda``."""
    parts = [role]
    if topo is None:
        parts.append("starting")
    else:
        if topo.is_master:
            parts.append("this node is master")
        elif topo.master_id:
            parts.append(f"master {exoapi.short_id(topo.master_id)}")
        else:
            parts.append("master unknown")
        n = len(topo.peers)
        parts.append(f"{n} peer" + ("" if n == 1 else "s"))
        parts.append(f"{topo.instances} instance" + ("" if topo.instances == 1 else "s"))
    parts.append(accelerator)
    text = "; ".join(parts)
    if fallback:
        text += f" (FALLBACK: {fallback})"
    return text


class LineSplitter:
    """Cuts a byte stream into lines of at most ``limit`` bytes; no byte is dropped.

    A line is passed on with its newline; a longer one in pieces of ``limit`` bytes, each a line
    of its own, and output that ends without a newline is passed on by :meth:`close`.
    """

    def __init__(self, emit: Callable[[bytes], None], limit: int = LINE_LIMIT) -> None:
        self._emit = emit
        self._limit = limit
        self._buffer = bytearray()

    def feed(self, data: bytes) -> None:
        buffer = self._buffer
        buffer += data
        start = 0
        while True:
            end = buffer.find(b"\n", start, start + self._limit)
            if end != -1:
                self._emit(bytes(buffer[start : end + 1]))
                start = end + 1
            elif len(buffer) - start >= self._limit:
                self._emit(bytes(buffer[start : start + self._limit]) + b"\n")
                start += self._limit
            else:
                break
        del buffer[:start]

    def close(self) -> None:
        if self._buffer:
            self._emit(bytes(self._buffer) + b"\n")
            self._buffer.clear()


class Child(asyncio.SubprocessProtocol):
    """EXO's process: its output fed to a :class:`LineSplitter`, its exit as a future.

    ``exited`` resolves when the process exits, whether or not something it spawned still holds
    its output pipe (``asyncio.subprocess.Process.wait`` waits for the pipe too);
    ``output_closed`` when the pipe reaches end of file.
    """

    def __init__(self, on_line: Callable[[bytes], None]) -> None:
        loop = asyncio.get_running_loop()
        self.exited: asyncio.Future[int] = loop.create_future()
        self.output_closed: asyncio.Future[None] = loop.create_future()
        self._lines = LineSplitter(on_line)
        self._transport: asyncio.SubprocessTransport | None = None
        self.pid = 0

    @property
    def returncode(self) -> int | None:
        """As asyncio's: the exit code, or minus the signal that ended it; None while running."""
        return self.exited.result() if self.exited.done() else None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.SubprocessTransport)
        self._transport = transport
        self.pid = transport.get_pid()

    def pipe_data_received(self, fd: int, data: bytes | bytearray) -> None:
        self._lines.feed(bytes(data))

    def pipe_connection_lost(self, fd: int, exc: Exception | None) -> None:
        self._lines.close()
        if not self.output_closed.done():
            self.output_closed.set_result(None)

    def process_exited(self) -> None:
        assert self._transport is not None
        returncode = self._transport.get_returncode()
        if not self.exited.done() and returncode is not None:
            self.exited.set_result(returncode)

    def close(self) -> None:
        """Stop reading the output (the process has exited); whatever is buffered is passed on."""
        if self._transport is not None:
            self._transport.close()
        if not self.output_closed.done():
            self._lines.close()
            self.output_closed.set_result(None)


def exit_status(returncode: int) -> int:
    """Map asyncio's returncode (negative for a signal) to a shell-style status."""
    return 128 - returncode if returncode < 0 else returncode


class Supervisor:
    def __init__(
        self,
        launch: Launch,
        settings: Settings,
        notifier: Notifier,
        snapshots: SnapshotStore | None = None,
        *,
        probe: Probe | None = None,
        hint_dir: Path | None = None,
        output: BinaryIO | None = None,
    ) -> None:
        self.launch = launch
        self.settings = settings
        self.probe: Probe = probe or self._probe_api
        self._session: aiohttp.ClientSession | None = None
        self.notifier = notifier
        self.snapshots = snapshots
        self.hint_dir = hint_dir
        self.output = output if output is not None else sys.stderr.buffer
        self.links: LinkSource | None = None
        self.memory_cgroup: Path | None = None
        """The node unit's cgroup: sustained memory pressure there shows in STATUS."""
        self.state = _State(UpDown(settings.failures))
        self.child: Child | None = None
        self._kill_task: asyncio.Task[None] | None = None

    # -- public -----------------------------------------------------------------------------

    async def run(self) -> int:
        """Start EXO, supervise it until it exits, return its (shell-style) exit status."""
        # one HTTP session for every probe: no connection setup per probe
        async with aiohttp.ClientSession() as session:
            self._session = session
            try:
                return await self._run()
            finally:
                self._session = None

    async def _probe_api(self, url: str, seconds: float) -> exoapi.NodeView:
        return await exoapi.probe(url, seconds, session=self._session)

    async def _run(self) -> int:
        loop = asyncio.get_running_loop()
        self._announce()
        for sig in FORWARDED:  # before the child exists: a stop signal then cancels the start
            loop.add_signal_handler(sig, self._on_signal, sig)
        self.notifier.status(self._status(None))
        log.info("starting %s", " ".join(self.launch.argv))
        child = Child(self._pass_on)
        failed = await self._spawn(loop, child)
        if failed is not None:
            return failed
        self.child = child
        if self.state.stopping:  # asked to stop while EXO was being started
            self._on_signal(signal.SIGTERM, again=True)
        status = exit_status(await self._supervise(loop, child))
        if self.state.stopping:
            log.info("EXO stopped (status %d)", status)
        else:
            log.error("EXO exited unexpectedly with status %d", status)
            self.notifier.status(f"EXO exited with status {status}")
        return status

    def _announce(self) -> None:
        """Log the accelerator decision and the topology the last run saw."""
        sel = self.launch.selection
        if sel.fallback:
            log.warning("accelerator fallback: %s", sel.fallback)
        for reason in sel.reasons:
            log.info("accelerator: %s", reason)
        if self.snapshots is not None:
            previous = self.snapshots.load()
            if previous is not None:
                peers = ", ".join(sorted(previous.topology.peers)) or "none"
                log.info(
                    "last topology (%s): node %s, master %s, peers %s",
                    time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(previous.taken_at)),
                    previous.topology.node_id,
                    previous.topology.master_id,
                    peers,
                )

    async def _spawn(self, loop: asyncio.AbstractEventLoop, child: Child) -> int | None:
        """Start EXO as ``child``; None once started, else the exit status to give."""
        try:
            await loop.subprocess_exec(
                lambda: child,
                *self.launch.argv,
                env=self.launch.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError) as exc:  # ValueError: a NUL or '=' where execve refuses it
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            reason = os_reason(exc)
            log.error("cannot start %s: %s", self.launch.argv[0], reason)
            self.notifier.status(f"cannot start EXO: {reason}")
            return 127 if isinstance(exc, FileNotFoundError) else 126
        return None

    async def _supervise(self, loop: asyncio.AbstractEventLoop, child: Child) -> int:
        """Probe EXO and watch the links until it exits; then clean up. EXO's return code."""
        health = asyncio.create_task(self._health_loop())
        links = await self._start_links()
        try:
            return await asyncio.shield(child.exited)
        finally:
            if links is not None:
                with contextlib.suppress(Exception):
                    await links.stop()
            health.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await health
            for sig in FORWARDED:
                loop.remove_signal_handler(sig)
            if self._kill_task is not None:
                self._kill_task.cancel()
            # runners EXO left behind hold its output pipe: once they are gone the pipe ends
            self._reap_group()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(child.output_closed), DRAIN_TIMEOUT)
            child.close()

    # -- signals ----------------------------------------------------------------------------

    def _on_signal(self, sig: signal.Signals, *, again: bool = False) -> None:
        child = self.child
        if child is None:
            if sig in STOP_SIGNALS:
                self.state.stopping = True
            return
        if child.returncode is not None:
            return
        log.info("forwarding %s to EXO (pid %d)", sig.name, child.pid)
        if sig in STOP_SIGNALS and (again or not self.state.stopping):
            self.state.stopping = True
            self.notifier.stopping(f"stopping EXO ({sig.name})")
            self._kill_task = asyncio.get_running_loop().create_task(self._kill_after_grace())
        with contextlib.suppress(ProcessLookupError):
            os.kill(child.pid, sig)

    async def _kill_after_grace(self) -> None:
        await asyncio.sleep(self.settings.stop_timeout)
        child = self.child
        if child is not None and child.returncode is None:
            log.warning(
                "EXO did not stop within %.0fs; sending SIGKILL", self.settings.stop_timeout
            )
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(child.pid, signal.SIGKILL)

    def _reap_group(self) -> None:
        """Kill whatever the child left behind in its process group (no orphans)."""
        child = self.child
        if child is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(child.pid, signal.SIGKILL)
            log.info("killed processes EXO left behind in its process group")

    # -- the cluster link ---------------------------------------------------------------------

    async def _start_links(self) -> LinkSource | None:
        if self.links is None:
            return None
        try:
            await self.links.start()
        except Exception as exc:  # link watching is a help, never a reason to stop EXO
            log.warning("not watching the cluster link: %s", exc)
            return None
        return self.links

    def on_link_change(self, health: LinkHealth, event: LinkEvent) -> None:
        """``LinkMonitor``'s callback: log the change, show trouble in STATUS at once."""
        level = logging.INFO if health.state == "up" else logging.WARNING
        log.log(level, "%s: %s", event.describe(), health.message)
        self.state.link = None if health.state == "up" else f"{health.state}: {health.message}"
        if self.state.ready:
            self.notifier.status(self._status(self.state.last))

    # -- EXO's output -----------------------------------------------------------------------

    def _pass_on(self, line: bytes) -> None:
        try:
            self.output.write(line)
            self.output.flush()
        except (OSError, ValueError):
            pass  # journald gone: keep reading so EXO never blocks on a full pipe
        self._learn(line.decode("utf-8", "replace"))

    def _learn(self, line: str) -> None:
        event = exoapi.parse_log_line(line)
        if event is None:
            return
        if event.kind == "started":
            self.state.node_id = event.node_id
            self.state.master_id = None
            return
        node = self.state.node_id
        master = event.node_id or node
        if master is None or master == self.state.master_id:
            return
        self.state.master_id = master
        log.info("EXO reports master %s%s", master, " (this node)" if master == node else "")
        if self.hint_dir is not None and node is not None:
            try:
                self.hint_dir.mkdir(parents=True, exist_ok=True, mode=0o750)
                exoapi.write_master_hint(self.hint_dir, node, master)
            except OSError as exc:
                log.warning("cannot record the master in %s: %s", self.hint_dir, exc)
        if self.state.ready and self.state.last is not None:
            self._record(self.state.last)
            self.notifier.status(self._status(self.state.last))

    # -- health -----------------------------------------------------------------------------

    async def _health_loop(self) -> None:
        s = self.settings
        interval = s.interval
        if self.notifier.watchdog_sec is not None:
            # at least two probes per watchdog period, so one slow probe is not fatal
            interval = min(interval, self.notifier.watchdog_sec / 2)
        while True:
            ok = await self._probe_once()
            if ok and not self.state.ready:
                self.state.ready = True
                log.info("EXO's API answers at %s: ready", s.api_url)
                self.notifier.ready(self._status(self.state.last))
            if ok:
                self.notifier.watchdog()
            await asyncio.sleep(interval if self.state.ready else s.startup_poll)

    async def _probe_once(self) -> bool:
        s = self.settings
        try:
            view = await asyncio.wait_for(self.probe(s.api_url, s.timeout), s.timeout + 1)
            topo = topology_of(view)
        except Exception as exc:  # any failure is a failed probe; the reason is logged
            reason = str(exc) or type(exc).__name__
            if not self.state.ready:
                log.debug("not ready yet: %s", reason)
                return False
            health = self.state.health
            health.failed_probe()
            level = logging.ERROR if health.failing else logging.WARNING
            log.log(level, "health probe %d failed: %s", health.failed, reason)
            if health.failing:
                self.notifier.status(
                    f"{s.role}; UNHEALTHY: {health.failed} failed probes ({reason})"
                )
            return False
        if self.state.health.failed:
            log.info("EXO healthy again after %d failed probes", self.state.health.failed)
        self.state.health.passed()
        self._record(topo)
        self.state.problem = view.problems[0] if view.problems else None
        if self.state.ready:
            self.notifier.status(self._status(self.state.last))
        return True

    def _record(self, topo: Topology) -> None:
        if self.state.master_id is not None and topo.node_id == self.state.node_id:
            master = self.state.master_id
            topo = replace(topo, master_id=master, is_master=master == topo.node_id)
        previous = self.state.last
        self.state.last = topo
        if topo != previous and self.snapshots is not None:
            try:
                self.snapshots.save(self.settings.role, topo)
            except OSError as exc:
                log.warning("cannot write topology snapshot %s: %s", self.snapshots.path, exc)

    def _status(self, topo: Topology | None) -> str:
        sel = self.launch.selection
        text = describe(self.settings.role, topo, sel.label(), sel.fallback)
        if topo is not None and self.state.problem:
            text += f"; degraded: {self.state.problem}"
        if self.state.link:
            text += f"; link {self.state.link}"
        if self.memory_cgroup is not None:
            pressure = psi.read_cgroup_memory(self.memory_cgroup).pressure
            if pressure is not None and pressure.degraded:
                text += f"; degraded: {pressure.degraded}"
        return text
