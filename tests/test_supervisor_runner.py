"""The supervisor's decisions in the test's own process: ``Supervisor.run`` with a small fake
EXO (a Python one-liner), a scripted health probe and a notifier that records what it would
send to systemd.

``tests/test_supervisor_process.py`` runs ``exo-nixos run`` as a subprocess against the EXO
double; these tests drive the same code in-process, so mutation testing (which sees calls in
the pytest process only) can attribute them: readiness, the watchdog, failed probes, stop and
kill, exit statuses, a start that fails, the master named in EXO's log, STATUS wording.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import logging
import os
import re
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from exo_nixos import exoapi
from exo_nixos.config import Accelerator
from exo_nixos.exoapi import ExoApiError, NodeView, Peer
from exo_nixos.findings import Finding, Severity
from exo_nixos.supervisor.environment import Launch, Selection
from exo_nixos.supervisor.notify import Notifier
from exo_nixos.supervisor.runner import (
    LineSplitter,
    Settings,
    Supervisor,
    describe,
    exit_status,
    topology_of,
)
from exo_nixos.supervisor.snapshot import SnapshotStore, Topology

API = "http://127.0.0.1:1"


class RecordingNotifier(Notifier):
    """A notifier that keeps each message it would send (as a tuple of fields)."""

    def __init__(self, watchdog_usec: int | None = None) -> None:
        super().__init__(None, watchdog_usec)
        self.messages: list[tuple[str, ...]] = []
        self.times: list[float] = []  # time.monotonic() of each message

    def send(self, *fields: str) -> bool:
        self.messages.append(fields)
        self.times.append(time.monotonic())
        return True

    def times_of(self, field_: str) -> list[float]:
        return [t for t, m in zip(self.times, self.messages, strict=True) if field_ in m]

    def count(self, field_: str) -> int:
        return sum(field_ in m for m in self.messages)

    def statuses(self) -> list[str]:
        return [
            f.removeprefix("STATUS=") for m in self.messages for f in m if f.startswith("STATUS=")
        ]


@dataclass
class ScriptedProbe:
    """The health probe: answers ``answer`` (a view, or an exception to raise; None: never
    answers, ignoring its timeout as a stuck connection would)."""

    answer: NodeView | Exception | None = field(
        default_factory=lambda: ExoApiError("connection refused", kind="connect")
    )
    calls: int = 0

    async def __call__(self, url: str, timeout: float) -> NodeView:  # noqa: ASYNC109
        assert (url, timeout) == (API, 1.0)
        self.calls += 1
        if self.answer is None:
            await asyncio.Event().wait()
        if isinstance(self.answer, Exception):
            raise self.answer
        assert self.answer is not None
        return self.answer


def view(node: str = "node-a", **kwargs: Any) -> NodeView:
    return NodeView(url=API, node_id=node, **kwargs)


def fake_exo(code: str, *, fallback: str | None = None) -> Launch:
    selection = Selection(
        Accelerator.CPU,
        sys.executable,
        (Finding(Severity.REASON, "chosen by the test"),),
        fallback=fallback,
    )
    return Launch([sys.executable, "-c", code], {"PATH": os.environ["PATH"]}, selection, None)


def settings(**overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "role": "worker",
        "api_url": API,
        "interval": 0.01,
        "timeout": 1.0,
        "failures": 2,
        "stop_timeout": 10.0,
        "startup_poll": 0.01,
    }
    values.update(overrides)
    return Settings(**values)


async def until(condition: Callable[[], bool], what: str, limit: float = 5.0) -> None:
    deadline = time.monotonic() + limit
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


SLEEPER = "import time\nprint('Starting node node-a', flush=True)\ntime.sleep(60)\n"


@dataclass
class Run:
    supervisor: Supervisor
    notifier: RecordingNotifier
    probe: ScriptedProbe
    output: io.BytesIO
    task: asyncio.Task[int]
    loop_errors: list[dict[str, Any]]

    async def result(self, limit: float = 5.0) -> int:
        status = await asyncio.wait_for(self.task, limit)
        # an exception in a callback (EXO's output is read in the protocol's callbacks) is
        # only logged by asyncio: here it is a failure
        assert self.loop_errors == [], self.loop_errors
        return status


def start(
    launch: Launch,
    *,
    notifier: RecordingNotifier | None = None,
    probe: ScriptedProbe | None = None,
    **kwargs: Any,
) -> Run:
    notifier = notifier or RecordingNotifier()
    probe = probe or ScriptedProbe()
    output = io.BytesIO()
    config = settings(**kwargs.pop("settings", {}))
    supervisor = Supervisor(launch, config, notifier, probe=probe, output=output, **kwargs)
    errors: list[dict[str, Any]] = []
    asyncio.get_running_loop().set_exception_handler(lambda _, context: errors.append(context))
    return Run(supervisor, notifier, probe, output, asyncio.create_task(supervisor.run()), errors)


def stop_signal() -> None:
    """SIGTERM to this process, as systemd sends it to the supervisor (which forwards it)."""
    os.kill(os.getpid(), signal.SIGTERM)


# ---------------------------------------------------------------- readiness and stop


def test_ready_only_after_a_probe_passes_then_watchdog_then_a_forwarded_stop(caplog) -> None:
    caplog.set_level(logging.DEBUG, logger="exo_nixos.supervisor")

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER))
        await until(lambda: run.probe.calls >= 3, "probes before ready")
        assert run.notifier.messages == [("STATUS=worker; starting; cpu",)]
        assert run.supervisor.state.health.failed == 0  # not ready: no failure counted
        run.probe.answer = view(peers=(Peer("node-b", ("10.0.0.2",)),))
        await until(lambda: run.notifier.count("WATCHDOG=1") >= 2, "watchdog pings")
        ready = [m for m in run.notifier.messages if "READY=1" in m]
        assert ready == [("READY=1", "STATUS=worker; master unknown; 1 peer; 0 instances; cpu")]
        assert run.notifier.messages.index(ready[0]) < run.notifier.messages.index(("WATCHDOG=1",))
        stop_signal()
        assert await run.result() == 128 + signal.SIGTERM
        assert ("STOPPING=1", "STATUS=stopping EXO (SIGTERM)") in run.notifier.messages
        assert run.output.getvalue() == b"Starting node node-a\n"

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert "not ready yet: connection refused" in messages
    assert f"EXO's API answers at {API}: ready" in messages
    assert "EXO stopped (status 143)" in messages
    assert "accelerator: chosen by the test" in messages
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_failed_probes_after_ready_stop_the_watchdog_and_say_unhealthy(caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()), settings={"failures": 3})
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        run.probe.answer = ExoApiError("timed out", kind="timeout")
        unhealthy = "worker; UNHEALTHY: 3 failed probes (timed out)"
        await until(lambda: unhealthy in run.notifier.statuses(), "unhealthy status")
        assert "worker; UNHEALTHY: 2 failed probes (timed out)" not in run.notifier.statuses()
        pings = run.notifier.count("WATCHDOG=1")
        calls = run.probe.calls
        await until(lambda: run.probe.calls >= calls + 3, "more failed probes")
        assert run.notifier.count("WATCHDOG=1") == pings
        run.probe.answer = view(instances=())
        await until(lambda: run.notifier.count("WATCHDOG=1") > pings, "watchdog again")
        assert run.notifier.statuses()[-1] == "worker; master unknown; 0 peers; 0 instances; cpu"
        assert run.supervisor.state.health.failed == 0
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["health probe 1 failed: timed out"] == logging.WARNING
    assert levels["health probe 2 failed: timed out"] == logging.WARNING
    assert levels["health probe 3 failed: timed out"] == logging.ERROR
    (again,) = [m for m in levels if m.startswith("EXO healthy again after ")]
    match = re.fullmatch(r"EXO healthy again after (\d+) failed probes", again)
    assert match is not None and int(match.group(1)) >= 6, again


def test_an_exception_without_a_message_is_named_by_its_type() -> None:
    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()), settings={"failures": 1})
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        run.probe.answer = ConnectionResetError()
        status = "worker; UNHEALTHY: 1 failed probes (ConnectionResetError)"
        await until(lambda: status in run.notifier.statuses(), "unhealthy status")
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_the_watchdog_is_pinged_at_least_twice_per_period() -> None:
    """With WatchdogSec shorter than the probe interval, probes follow the watchdog: systemd
    never waits a whole period for a ping (here 0.4 s; pings every 0.2 s)."""

    async def scenario() -> None:
        run = start(
            fake_exo(SLEEPER),
            notifier=RecordingNotifier(watchdog_usec=400_000),
            probe=ScriptedProbe(view()),
            settings={"interval": 3600.0},
        )
        await until(lambda: run.notifier.count("WATCHDOG=1") >= 5, "pings every 0.2 s", 4)
        stop_signal()
        await run.result()
        pings = run.notifier.times_of("WATCHDOG=1")
        gaps = [b - a for a, b in itertools.pairwise(pings)]
        assert max(gaps) < 0.4, gaps

    asyncio.run(scenario())


def test_before_ready_the_api_is_polled_at_the_startup_pace_not_the_interval() -> None:
    """EXO takes a while to answer; the probes until it does come every ``startup_poll``
    (here 0.01 s), not every health-check interval (an hour here)."""

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), settings={"interval": 3600.0})
        await until(lambda: run.probe.calls >= 3, "probes at the startup pace")
        assert run.notifier.count("READY=1") == 0
        run.probe.answer = view()
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_a_probe_that_never_answers_fails_after_its_timeout(caplog) -> None:
    """A probe stuck past its own timeout (a connection that hangs) is cut off a second
    after it and counted as a failed probe; the watchdog stops."""
    caplog.set_level(logging.WARNING, logger="exo_nixos.supervisor")

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()))
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        run.probe.answer = None
        await until(
            lambda: "health probe 1 failed: TimeoutError" in caplog.messages, "a failed probe", 4
        )
        stop_signal()
        await run.result()

    asyncio.run(scenario())


# ---------------------------------------------------------------- exits


def test_a_crash_is_the_exit_status_and_said_in_status(caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")

    async def scenario() -> None:
        run = start(fake_exo("print('bye', flush=True)\nraise SystemExit(3)"))
        assert await run.result() == 3
        assert run.notifier.statuses()[-1] == "EXO exited with status 3"
        assert run.output.getvalue() == b"bye\n"

    asyncio.run(scenario())
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == ["EXO exited unexpectedly with status 3"]


def test_exit_is_seen_while_a_process_exo_spawned_holds_its_output(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """EXO's runners inherit its output pipe: EXO's exit must not wait for them, and they
    are killed with its process group."""
    pidfile = tmp_path / "runner.pid"
    code = (
        "import subprocess, sys\n"
        "p = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('spawned', flush=True)\n"
        "sys.exit(5)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code))
        assert await run.result(5) == 5
        assert run.output.getvalue() == b"spawned\n"

    began = time.monotonic()
    with caplog.at_level(logging.INFO, logger="exo_nixos.supervisor"):
        asyncio.run(scenario())
    assert time.monotonic() - began < 5
    assert "killed processes EXO left behind in its process group" in caplog.messages
    assert not _alive(int(pidfile.read_text()))


def _alive(pid: int) -> bool:
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        if state == "Z":
            return False
        time.sleep(0.02)
    return True


def test_an_exo_that_ignores_sigterm_is_killed_with_its_group(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")
    pidfile = tmp_path / "runner.pid"
    code = (
        "import signal, subprocess, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "p = subprocess.Popen(['sleep', '300'])\n"
        f"open({str(pidfile)!r}, 'w').write(str(p.pid))\n"
        "print('stubborn', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view()), settings={"stop_timeout": 0.3})
        await until(lambda: run.output.getvalue() == b"stubborn\n", "EXO started")
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        stop_signal()
        await asyncio.sleep(0.1)
        assert not run.task.done()  # the grace period
        stop_signal()  # a second stop signal is forwarded but restarts nothing
        assert await run.result(5) == 128 + signal.SIGKILL
        assert run.notifier.count("STOPPING=1") == 1

    asyncio.run(scenario())
    messages = [r.getMessage() for r in caplog.records]
    assert "EXO did not stop within 0s; sending SIGKILL" in messages
    assert messages.count(f"forwarding SIGTERM to EXO (pid {_pid_of(messages)})") == 2
    assert not _alive(int(pidfile.read_text()))


def _pid_of(messages: list[str]) -> str:
    line = next(m for m in messages if m.startswith("forwarding SIGTERM to EXO (pid "))
    return line.removeprefix("forwarding SIGTERM to EXO (pid ").removesuffix(")")


def test_sighup_is_forwarded_and_does_not_stop(tmp_path: Path) -> None:
    marker = tmp_path / "hup"
    code = (
        "import signal, time\n"
        f"signal.signal(signal.SIGHUP, lambda *_: open({str(marker)!r}, 'w').close())\n"
        "print('up', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view()))
        await until(lambda: run.output.getvalue() == b"up\n", "EXO started")
        os.kill(os.getpid(), signal.SIGHUP)
        await until(marker.exists, "EXO got SIGHUP")
        assert not run.supervisor.state.stopping
        assert run.notifier.count("STOPPING=1") == 0
        stop_signal()
        assert await run.result() == 143

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("argv", "status", "reason"),
    [
        (["/nonexistent/exo"], 127, "No such file or directory"),
        (["NOEXEC"], 126, "Permission denied"),
        ([sys.executable, "-c", "pass", "a\0b"], 126, "embedded null byte"),
    ],
)
def test_a_start_that_fails_is_one_line_and_a_shell_status(
    argv: list[str], status: int, reason: str, caplog, tmp_path: Path
) -> None:
    if argv == ["NOEXEC"]:  # a file without execute permission
        argv = [str(tmp_path / "exo")]
        Path(argv[0]).write_text("#!/bin/sh\n")
        Path(argv[0]).chmod(0o644)
    launch = Launch(argv, {}, Selection(Accelerator.CPU, argv[0]), None)

    async def scenario() -> None:
        run = start(launch)
        assert await run.result() == status
        assert run.notifier.statuses()[-1] == f"cannot start EXO: {reason}"
        # the signal handlers are gone: the loop's default handling is back
        loop = asyncio.get_running_loop()
        assert not loop.remove_signal_handler(signal.SIGTERM)

    asyncio.run(scenario())
    assert f"cannot start {argv[0]}: {reason}" in [r.getMessage() for r in caplog.records]


def test_exit_status_of_a_signal_is_the_shell_one() -> None:
    assert exit_status(0) == 0
    assert exit_status(3) == 3
    assert exit_status(-signal.SIGTERM) == 143
    assert exit_status(-signal.SIGKILL) == 137


# ---------------------------------------------------------------- EXO's log and STATUS


def test_the_master_named_in_exos_log_reaches_status_snapshot_and_hint(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Probes stop once ready (an hour apart here): what changes after comes from the log."""
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")
    gate = tmp_path / "gate"
    code = (
        "import os, time\n"
        "print('[ 12:00:00 ] Starting node node-a', flush=True)\n"
        "print('Node node-b elected master - demoting self', flush=True)\n"
        "print('Node node-b elected master - demoting self', flush=True)\n"
        "deadline = time.monotonic() + 30\n"
        f"while not os.path.exists({str(gate)!r}) and time.monotonic() < deadline:\n"
        "    time.sleep(0.01)\n"
        "print('\\x1b[1mNode elected Master - promoting self\\x1b[0m', flush=True)\n"
        "time.sleep(60)\n"
    )
    hints = tmp_path / "run/exo"
    store = SnapshotStore(tmp_path / "topology.json")

    async def scenario() -> None:
        run = start(
            fake_exo(code),
            probe=ScriptedProbe(view()),
            snapshots=store,
            hint_dir=hints,
            settings={"interval": 3600.0},
        )
        other = "worker; master node-b; 0 peers; 0 instances; cpu"
        await until(lambda: other in run.notifier.statuses(), "master node-b in STATUS")
        assert exoapi.read_master_hint(hints, "node-a") == "node-b"
        assert oct(hints.stat().st_mode & 0o777) == oct(0o750)
        saved = store.load()
        assert saved is not None and saved.topology.master_id == "node-b"
        assert not saved.topology.is_master
        gate.touch()
        mine = "worker; this node is master; 0 peers; 0 instances; cpu"
        await until(lambda: mine in run.notifier.statuses(), "this node as master")
        assert exoapi.read_master_hint(hints, "node-a") == "node-a"
        saved = store.load()
        assert saved is not None and saved.topology.is_master
        assert saved.role == "worker"
        assert run.probe.calls == 1
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    reports = [m for m in caplog.messages if m.startswith("EXO reports master")]
    assert reports == ["EXO reports master node-b", "EXO reports master node-a (this node)"]


def test_a_new_start_line_forgets_the_master(tmp_path: Path) -> None:
    """EXO restarted inside (a new node id): the master it named before is not its master."""
    code = (
        "import time\n"
        "print('Starting node node-a', flush=True)\n"
        "print('Node node-b elected master', flush=True)\n"
        "print('Starting node node-c', flush=True)\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view("node-c")), hint_dir=tmp_path)
        await until(lambda: run.output.getvalue().count(b"\n") == 3, "EXO's lines")
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        assert run.supervisor.state.master_id is None
        assert "master unknown" in run.notifier.statuses()[-1]
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_an_unwritable_hint_dir_is_a_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "file").write_text("")
    code = (
        "import time\nprint('Starting node node-a', flush=True)\n"
        "print('Node node-b elected master', flush=True)\ntime.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view()), hint_dir=tmp_path / "file/x")
        await until(lambda: run.supervisor.state.master_id == "node-b", "the master")
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == [
        f"cannot record the master in {tmp_path / 'file/x'}: [Errno 20] Not a directory: "
        f"'{tmp_path / 'file/x'}'"
    ]


def test_output_that_is_not_utf8_passes_unchanged_and_is_still_read() -> None:
    code = (
        "import sys, time\n"
        "sys.stdout.buffer.write(b'Starting node node-a \\xff\\xfe\\n')\n"
        "sys.stdout.buffer.write(b'Starting node node-a\\n')\n"
        "sys.stdout.buffer.write(b'\\xffNode node-b elected master\\n')\n"
        "sys.stdout.buffer.write(b'Node node-c elected master\\n')\n"
        "sys.stdout.flush()\n"
        "time.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view()))
        await until(lambda: run.supervisor.state.master_id == "node-c", "the master")
        assert run.output.getvalue() == (
            b"Starting node node-a \xff\xfe\nStarting node node-a\n"
            b"\xffNode node-b elected master\nNode node-c elected master\n"
        )
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_a_line_of_exactly_the_limit_is_passed_on_at_once() -> None:
    lines: list[bytes] = []
    splitter = LineSplitter(lines.append, limit=4)
    splitter.feed(b"abcd")
    assert lines == [b"abcd\n"]
    splitter.feed(b"ef\ngh")
    assert lines == [b"abcd\n", b"ef\n"]
    splitter.close()
    assert lines == [b"abcd\n", b"ef\n", b"gh\n"]


def test_output_that_cannot_be_written_does_not_stop_reading(tmp_path: Path) -> None:
    code = (
        "import time\nprint('Starting node node-a', flush=True)\n"
        "print('Node node-b elected master', flush=True)\ntime.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view()))
        run.output.close()  # journald gone
        await until(lambda: run.supervisor.state.master_id == "node-b", "the master")
        stop_signal()
        assert await run.result() == 143

    asyncio.run(scenario())


def test_a_degraded_node_and_a_link_in_trouble_show_in_status(caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")

    @dataclass
    class Health:
        state: str
        message: str

    @dataclass
    class Event:
        text: str

        def describe(self) -> str:
            return self.text

    async def scenario() -> None:
        probe = ScriptedProbe(view(problems=("state: HTTP 500", "models: timeout")))
        run = start(fake_exo(SLEEPER), probe=probe)
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        base = "worker; master unknown; 0 peers; 0 instances; cpu"
        await until(
            lambda: run.notifier.statuses()[-1] == f"{base}; degraded: state: HTTP 500",
            "degraded",
        )
        down: Any = Health("down", "cluster interface clu0 down")
        run.supervisor.on_link_change(down, Event("clu0 went down"))  # type: ignore[arg-type]
        assert run.notifier.statuses()[-1] == (
            f"{base}; degraded: state: HTTP 500; link down: cluster interface clu0 down"
        )
        probe.answer = view()
        await until(
            lambda: (
                run.notifier.statuses()[-1] == f"{base}; link down: cluster interface clu0 down"
            ),
            "healthy again, link still down",
        )
        up: Any = Health("up", "clu0 carries traffic")
        run.supervisor.on_link_change(up, Event("clu0 went up"))  # type: ignore[arg-type]
        assert run.notifier.statuses()[-1] == base
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    levels = {r.getMessage(): r.levelno for r in caplog.records}
    assert levels["clu0 went down: cluster interface clu0 down"] == logging.WARNING
    assert levels["clu0 went up: clu0 carries traffic"] == logging.INFO


def test_a_link_change_before_ready_is_kept_for_the_ready_status() -> None:
    @dataclass
    class Health:
        state: str = "degraded"
        message: str = "one of two ports down"

    class Event:
        def describe(self) -> str:
            return "bond0 changed"

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER))
        await until(lambda: run.probe.calls >= 1, "a probe")
        health: Any = Health()
        run.supervisor.on_link_change(health, Event())  # type: ignore[arg-type]
        assert run.notifier.statuses() == ["worker; starting; cpu"]  # not ready: not sent
        run.probe.answer = view()
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        assert run.notifier.statuses()[-1] == (
            "worker; master unknown; 0 peers; 0 instances; cpu; link degraded: one of two "
            "ports down"
        )
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_the_link_monitor_is_started_and_stopped_and_its_failure_is_a_warning(caplog) -> None:
    calls: list[str] = []

    class Links:
        def __init__(self, fail: bool) -> None:
            self.fail = fail

        async def start(self) -> None:
            calls.append("start")
            if self.fail:
                raise RuntimeError("no netlink here")

        async def stop(self) -> None:
            calls.append("stop")

    async def scenario(fail: bool) -> None:
        run = start(fake_exo("raise SystemExit(0)"))
        run.supervisor.links = Links(fail)
        assert await run.result() == 0

    asyncio.run(scenario(False))
    assert calls == ["start", "stop"]
    calls.clear()
    asyncio.run(scenario(True))
    assert calls == ["start"]
    assert "not watching the cluster link: no netlink here" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    ]


def test_the_last_snapshot_is_logged_at_start(tmp_path: Path, caplog) -> None:
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")
    store = SnapshotStore(tmp_path / "topology.json")
    topology = Topology("node-a", "node-m", False, {"n2": [], "n1": ["10.0.0.1"]}, 1)
    store.save("worker", topology, now=1_000_000_000)

    async def plain() -> None:
        await start(fake_exo("raise SystemExit(0)"), snapshots=store).result()

    asyncio.run(plain())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("last topology")]
    assert line == "last topology (2001-09-09 01:46:40): node node-a, master node-m, peers n1, n2"
    caplog.clear()
    store.save("worker", Topology("node-a", None, False, {}, 0), now=1_000_000_000)
    asyncio.run(plain())
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("last topology")]
    assert line == "last topology (2001-09-09 01:46:40): node node-a, master None, peers none"


def test_an_accelerator_fallback_is_a_warning_and_in_every_status(caplog) -> None:
    async def scenario() -> None:
        launch = fake_exo(SLEEPER, fallback="no NVIDIA device nodes")
        run = start(launch, probe=ScriptedProbe(view()))
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        assert (
            run.notifier.statuses()[0] == "worker; starting; cpu (FALLBACK: no NVIDIA device nodes)"
        )
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    assert "accelerator fallback: no NVIDIA device nodes" in [
        r.getMessage() for r in caplog.records if r.levelno == logging.WARNING
    ]


LONG_ID = "12D3KooWAbCdEfGhIjKlMnOp"


@pytest.mark.parametrize(
    ("topology", "expected"),
    [
        (None, "master; starting; cuda"),
        (
            Topology("a", "a", True, {}, 0),
            "master; this node is master; 0 peers; 0 instances; cuda",
        ),
        (
            Topology("a", LONG_ID, False, {"b": []}, 1),
            f"master; master {exoapi.short_id(LONG_ID)}; 1 peer; 1 instance; cuda",
        ),
        (
            Topology("a", None, False, {"b": [], "c": []}, 2),
            "master; master unknown; 2 peers; 2 instances; cuda",
        ),
    ],
)
def test_describe(topology: Topology | None, expected: str) -> None:
    assert describe("master", topology, "cuda", None) == expected
    assert describe("master", topology, "cuda", "why") == expected + " (FALLBACK: why)"


def test_topology_of_a_view() -> None:
    seen = view(
        master_id="node-a",
        peers=(Peer("node-b", ("10.0.0.2", "fe80::1")),),
        instances=(),
    )
    assert topology_of(seen) == Topology(
        "node-a", "node-a", True, {"node-b": ["10.0.0.2", "fe80::1"]}, 0
    )
    assert not topology_of(view(master_id=None)).is_master


class CountingStore(SnapshotStore):
    """A snapshot store that counts its writes."""

    saves = 0

    def save(self, role: str, topology: Topology, now: float | None = None) -> None:
        self.saves += 1
        super().save(role, topology, now)


def test_a_snapshot_is_written_when_the_topology_changes_only(tmp_path: Path) -> None:
    store = CountingStore(tmp_path / "topology.json")

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()), snapshots=store)
        await until(lambda: run.probe.calls >= 5, "several probes")
        assert store.saves == 1
        run.probe.answer = view(peers=(Peer("node-b"),))
        await until(lambda: store.saves == 2, "the new topology written")
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_a_snapshot_that_cannot_be_written_is_a_warning(tmp_path: Path, caplog) -> None:
    (tmp_path / "file").write_text("")
    store = SnapshotStore(tmp_path / "file/topology.json")

    async def scenario() -> None:
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()), snapshots=store)
        await until(lambda: run.notifier.count("READY=1") == 1, "ready all the same")
        stop_signal()
        await run.result()

    asyncio.run(scenario())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    path = tmp_path / "file/topology.json"
    (line,) = [w for w in warnings if w.startswith(f"cannot write topology snapshot {path}: ")]
    assert line.endswith(f"File exists: {str(tmp_path / 'file')!r}"), line  # the reason


def test_a_master_from_the_log_is_not_applied_to_another_node(tmp_path: Path) -> None:
    """The log names the master for the node that wrote it; a probe that finds another node
    (EXO restarted with a new id) keeps what its API says."""
    code = (
        "import time\nprint('Starting node node-a', flush=True)\n"
        "print('Node node-b elected master', flush=True)\ntime.sleep(60)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code), probe=ScriptedProbe(view("node-x")))
        await until(lambda: run.supervisor.state.master_id == "node-b", "the master")
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        await until(lambda: run.probe.calls >= 3, "more probes")
        assert run.notifier.statuses()[-1].startswith("worker; master unknown;")
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_exo_gets_its_environment_no_stdin_and_its_stderr_reaches_the_output(caplog) -> None:
    """EXO runs with the launch's environment (not the supervisor's), reads nothing from the
    supervisor's stdin, and what it writes to stderr is passed on with its stdout."""
    caplog.set_level(logging.INFO, logger="exo_nixos.supervisor")
    code = (
        "import os, sys\n"
        "print('mark', os.environ.get('EXO_TEST_MARK'), os.environ.get('EXO_NOT_PASSED'), "
        "repr(sys.stdin.read()), flush=True)\n"
        "sys.stderr.write('on stderr\\n')\n"
    )
    launch = fake_exo(code)
    launch = replace(launch, env={**launch.env, "EXO_TEST_MARK": "given"})

    async def scenario() -> None:
        os.environ["EXO_NOT_PASSED"] = "supervisor's own"
        try:
            run = start(launch)
            assert await run.result() == 0
        finally:
            del os.environ["EXO_NOT_PASSED"]
        lines = run.output.getvalue().decode().splitlines()
        assert lines == ["mark given None ''", "on stderr"]

    asyncio.run(scenario())
    assert f"starting {sys.executable} -c {code}" in caplog.messages


def test_a_process_that_left_exos_group_does_not_hold_the_supervisor(tmp_path: Path) -> None:
    """A process EXO started that left its process group (so the group kill misses it) and
    still holds EXO's output: the supervisor waits for the output a moment, then ends."""
    pid_file = tmp_path / "stray.pid"
    stray = tmp_path / "stray.py"
    stray.write_text(
        "import os, sys, time\n"
        "os.setsid()\n"
        f"open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "time.sleep(60)\n"
    )
    code = (
        "import os, subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, {str(stray)!r}])\n"
        f"while not os.path.exists({str(pid_file)!r}):\n"  # it has left the group
        "    time.sleep(0.01)\n"
        "print('started', flush=True)\n"
    )

    async def scenario() -> None:
        run = start(fake_exo(code))
        try:
            assert await run.result(limit=8) == 0
        finally:
            for _ in range(100):
                if pid_file.exists() and pid_file.read_text():
                    os.kill(int(pid_file.read_text()), signal.SIGKILL)
                    break
                await asyncio.sleep(0.05)

    asyncio.run(scenario())


def test_sustained_memory_pressure_shows_in_status(tmp_path: Path) -> None:
    cgroup = tmp_path / "cgroup"
    cgroup.mkdir()

    def pressure(avg60: float) -> None:
        (cgroup / "memory.pressure").write_text(
            f"some avg10=0.00 avg60={avg60:.2f} avg300=0.00 total=1\n"
            "full avg10=0.00 avg60=0.00 avg300=0.00 total=1\n"
        )

    async def scenario() -> None:
        pressure(2.0)
        run = start(fake_exo(SLEEPER), probe=ScriptedProbe(view()))
        run.supervisor.memory_cgroup = cgroup
        await until(lambda: run.notifier.count("READY=1") == 1, "ready")
        assert not any("degraded" in s for s in run.notifier.statuses())
        pressure(25.0)
        await until(lambda: "degraded" in run.notifier.statuses()[-1], "degraded")
        assert run.notifier.statuses()[-1] == (
            "worker; master unknown; 0 peers; 0 instances; cpu; degraded: memory pressure: "
            "tasks stalled on memory 25.0% of the last minute (PSI some avg60; 10% counts as "
            "degraded)"
        )
        stop_signal()
        await run.result()

    asyncio.run(scenario())


def test_a_link_monitor_that_fails_to_stop_does_not_change_the_exit(caplog) -> None:
    class Links:
        async def start(self) -> None:
            pass

        async def stop(self) -> None:
            raise RuntimeError("netlink gone")

    async def scenario() -> None:
        run = start(fake_exo("raise SystemExit(4)"))
        run.supervisor.links = Links()
        assert await run.result() == 4

    asyncio.run(scenario())
