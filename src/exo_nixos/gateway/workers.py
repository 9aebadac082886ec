"""Several gateway processes on one port.

One Python process serves one core. With ``gateway.workers`` above 1 (by default one per
core the gateway may run on, at most ``MAX_DEFAULT_WORKERS``), the process systemd starts
becomes a master that forks the workers and does nothing else: each worker listens on the
port with its own ``SO_REUSEPORT`` socket (the kernel spreads new connections over them)
and serves requests on its own event loop.

What must hold across workers is shared, not copied:

- the key policies' limits and the backends' state (failed by a request, requests in
  flight) live in ``SharedTable``s mapped before the fork (``shared.py``);
- the metrics are written by each worker to files in one directory, and ``/metrics`` in any
  worker reads them all (prometheus_client's multiprocess mode, ``metrics.py``);
- each worker probes the backends itself (a failure one worker sees is in the shared table
  at once) and reads the key and policy files itself on SIGHUP, which the master passes on.

The master speaks to systemd (``READY=1`` once every worker listens, ``RELOADING=1`` and
``READY=1`` around a reload, ``STOPPING=1``), starts a worker again when one dies, and
gives up when one cannot start (a port in use, a bad file: exit code 2 with its one line).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import tempfile
import time
from collections.abc import Callable

from exo_nixos.config import Config
from exo_nixos.errors import UserError
from exo_nixos.gateway.server import Shared, Worker, check, serve
from exo_nixos.supervisor.notify import Notifier

log = logging.getLogger(__name__)

MAX_DEFAULT_WORKERS = 8
_WATCHED = (signal.SIGHUP, signal.SIGTERM, signal.SIGINT, signal.SIGCHLD)
_READY, _RELOADED = b"R", b"H"
# a worker dying more often than this is not started again: the gateway stops
_RESTARTS, _RESTART_WINDOW = 5, 60.0
_STOP_TIMEOUT = 10.0

LoopFactory = Callable[[], asyncio.AbstractEventLoop] | None


def default_workers() -> int:
    """One worker per core this process may run on, at most ``MAX_DEFAULT_WORKERS``."""
    return max(1, min(MAX_DEFAULT_WORKERS, len(os.sched_getaffinity(0))))


class Master:
    def __init__(self, config: Config, workers: int, loop_factory: LoopFactory) -> None:
        self.config = config
        self.workers = workers
        self.loop_factory = loop_factory
        self.metrics_dir = tempfile.mkdtemp(prefix="exo-gateway-metrics-")
        # read by prometheus_client in every worker (inherited through fork)
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.metrics_dir
        self.shared = Shared(workers, self.metrics_dir)
        self.notifier = Notifier.from_environ()
        self.pids: dict[int, int] = {}  # pid -> worker index
        self.ready: set[int] = set()
        self.reloaded: set[int] = set()
        self.announced = False
        self.reloading = False
        self.deaths: list[float] = []
        self._reports, self._report_end = os.pipe()
        os.set_blocking(self._reports, False)

    def start(self, index: int) -> None:
        pid = os.fork()
        if pid == 0:  # the worker; never returns
            os._exit(self._work(index))
        self.pids[pid] = index

    def _work(self, index: int) -> int:
        try:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
            os.close(self._reports)
            self.shared.become(index)

            def report(kind: bytes) -> Callable[[], None]:
                def send() -> None:
                    os.write(self._report_end, kind + bytes([index]))

                return send

            worker = Worker(self.shared, report(_READY), report(_RELOADED))
            with asyncio.Runner(loop_factory=self.loop_factory) as runner:
                runner.run(serve(self.config, worker=worker))
            return 0
        except UserError as exc:
            print(f"exo-nixos: error: {exc}", file=sys.stderr, flush=True)
            return 2
        except BaseException:
            log.exception("gateway worker %d failed", index)
            return 1

    def run(self) -> int:
        signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            for index in range(self.workers):
                self.start(index)
            return self._loop()
        finally:
            self._stop()
            with contextlib.suppress(OSError):
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
            shutil.rmtree(self.metrics_dir, ignore_errors=True)

    def _loop(self) -> int:
        while True:
            info = signal.sigtimedwait(_WATCHED, 0.2)
            self._read_reports()
            if info is None:
                continue
            if info.si_signo == signal.SIGHUP:
                self.notifier.send("RELOADING=1")
                self.reloading = True
                self.reloaded.clear()
                for pid in self.pids:
                    os.kill(pid, signal.SIGHUP)
            elif info.si_signo in (signal.SIGTERM, signal.SIGINT):
                return 0
            elif info.si_signo == signal.SIGCHLD:
                code = self._reap()
                if code is not None:
                    return code

    def _read_reports(self) -> None:
        try:
            data = os.read(self._reports, 4096)
        except BlockingIOError:
            return
        for start in range(0, len(data) - 1, 2):
            kind, index = data[start : start + 1], data[start + 1]
            (self.ready if kind == _READY else self.reloaded).add(index)
        if not self.announced and len(self.ready) >= self.workers:
            self.announced = True
            log.info("gateway ready: %d worker processes listening", self.workers)
            self.notifier.ready()
        if self.reloading and self.reloaded >= set(self.pids.values()):
            self.reloading = False
            self.notifier.ready()

    def _reap(self) -> int | None:
        """Collect dead workers and start them again; an exit code when the gateway stops."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return None
            if pid == 0:
                return None
            index = self.pids.pop(pid, None)
            if index is None:
                continue
            code = os.waitstatus_to_exitcode(status)
            self._forget(pid, index)
            if code == 0:  # it was told to stop (systemd signals every process of the unit)
                return 0
            if code == 2 or not self.announced:  # it cannot start: nor would the others
                return code if code > 0 else 1
            now = time.monotonic()
            self.deaths = [t for t in self.deaths if now - t < _RESTART_WINDOW] + [now]
            if len(self.deaths) > _RESTARTS:
                log.error(
                    "gateway workers died %d times in %gs: stopping",
                    len(self.deaths),
                    _RESTART_WINDOW,
                )
                return 1
            log.warning(
                "gateway worker %d (pid %d) exited with %d; starting it again", index, pid, code
            )
            self.start(index)

    def _forget(self, pid: int, index: int) -> None:
        """What a dead worker held: its live gauges, its requests in flight."""
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid, self.metrics_dir)  # type: ignore[no-untyped-call]
        self.shared.clear_worker(index)
        self.ready.discard(index)

    def _stop(self) -> None:
        self.notifier.stopping()
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT
        while self.pids and time.monotonic() < deadline:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            if pid == 0:
                time.sleep(0.05)
            else:
                self.pids.pop(pid, None)
        for pid in self.pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
        self.pids.clear()
        self.notifier.close()


def supervise(config: Config, workers: int, loop_factory: LoopFactory) -> int:
    """Run ``workers`` gateway processes until SIGTERM or SIGINT; the exit code."""
    check(config)  # the key, policy and TLS files: a bad one stops it here, with one line
    return Master(config, workers, loop_factory).run()
