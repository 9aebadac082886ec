"""``exo-nixos models reconcile``: converge the cluster to the declared models.

``exo-models.service`` runs it on every node that declares models, but a pass *acts* only on
the node that is the elected master (its supervisor records the master from EXO's log,
:mod:`exo_nixos.exoapi.hint`): EXO places instances on the master anyway, exactly one node
is master at a time, and the declared models are the same on every node, so a new master
takes over the work when the old one leaves. Three more guards keep the cluster from
getting the same instance twice:

1. a lock file: two reconcilers on one host take turns;
2. after ``POST /place_instance`` a pass waits (``/instance/await``) until the instance
   exists before it ends, and does not place the model again for ``placeTimeoutSec``;
3. if two masters overlap during an election and both placed, the next pass of either
   deletes all but one instance of the model (the smallest instance id, so both agree).

Each pass: the node's ``/state`` (instances, runners, downloads) against the declared
models; missing instances are placed (after a placement preview, which names upstream's
reason for a refusal, and after the local model cache is repaired), duplicates deleted,
instances that never become ready replaced, models declared ``running = false`` downloaded
(``/download/start`` on the nodes a placement would use), custom cards added
(``/models/add``). Every action and its reason goes to the journal; the unit's STATUS= says
where the cluster stands. Errors (cluster down, hub unreachable) are retried with backoff;
nothing declared is dropped.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import fcntl
import logging
import os
import signal
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from exo_nixos.addresses import local_api_url
from exo_nixos.exoapi import ExoApiError, State, read_master_hint, short_id
from exo_nixos.exoapi.state import DownloadProgress, Instance
from exo_nixos.fsutil import os_reason
from exo_nixos.models.api import ModelsApi, Placement

if TYPE_CHECKING:
    from exo_nixos.config import Config, DeclaredModel

log = logging.getLogger("exo_nixos.models.reconcile")

READY_RUNNERS = frozenset({"Ready", "Running"})
LOCK_FILE = "models.lock"

RepairFn = Callable[[str], None]
"""Quarantine the damaged files of one model (by id) in the local cache."""

ActionKind = Literal["place", "delete", "download", "wait", "ok", "failed"]


@dataclass(frozen=True)
class Action:
    """One step of a pass, with the reason the journal shows."""

    kind: ActionKind
    model_id: str
    reason: str
    instance_id: str | None = None


@dataclass
class Memory:
    """What a reconciler remembers between passes."""

    placed_at: dict[str, float] = field(default_factory=dict)
    """Model -> when this reconciler last sent ``POST /place_instance`` for it."""
    unready_since: dict[str, float] = field(default_factory=dict)
    """Instance id -> when it was first seen not ready."""
    downloads_at: dict[str, float] = field(default_factory=dict)
    """Model -> when this reconciler last started its downloads."""


def instance_ready(state: State, instance: Instance) -> bool:
    """Every node's runner of ``instance`` is ``RunnerReady`` or ``RunnerRunning``."""
    nodes = instance.node_ids
    if not nodes:
        return False
    for node in nodes:
        runner = state.runner_of(node, instance)
        if runner is None or runner.name not in READY_RUNNERS:
            return False
    return True


def _runner_summary(state: State, instance: Instance) -> str:
    parts = []
    for node in instance.node_ids:
        runner = state.runner_of(node, instance)
        name = runner.name if runner is not None else "none"
        if runner is not None and runner.error_message:
            name += f" ({runner.error_message})"
        parts.append(f"{short_id(node)}: {name}")
    return ", ".join(parts) or "no runners"


def instances_of(state: State, model_id: str) -> list[Instance]:
    """The instances of ``model_id``, smallest instance id first (the one duplicates keep)."""
    found = [i for i in state.instances.values() if i.model_id == model_id]
    return sorted(found, key=lambda i: i.instance_id)


def downloads_of(state: State, model_id: str) -> Iterator[tuple[str, DownloadProgress]]:
    """``(node, download)`` for every download of ``model_id`` in ``/state``."""
    for node, entries in state.downloads.items():
        for entry in entries:
            if entry.model_id == model_id:
                yield node, entry


def download_status(state: State, model_id: str) -> dict[str, str]:
    """Node -> ``Pending``/``Ongoing``/``Completed``/``Failed`` for ``model_id``."""
    return {node: entry.status for node, entry in downloads_of(state, model_id)}


def plan(
    declared: Mapping[str, DeclaredModel],
    state: State,
    memory: Memory,
    *,
    now: float,
    place_timeout_s: float,
) -> list[Action]:
    """What a pass should do, one or more actions per declared model (no I/O)."""
    actions: list[Action] = []
    for model_id, spec in declared.items():
        if not spec.running:
            actions.append(_plan_download(model_id, state, memory, now, place_timeout_s))
            continue
        instances = instances_of(state, model_id)
        if not instances:
            sent = memory.placed_at.get(model_id)
            if sent is not None and now - sent < place_timeout_s:
                actions.append(
                    Action("wait", model_id, f"placement sent {now - sent:.0f}s ago, not yet seen")
                )
            elif sent is not None:
                actions.append(
                    Action(
                        "place",
                        model_id,
                        f"the placement sent {now - sent:.0f}s ago never appeared "
                        "(see the master's EXO log); placing again",
                    )
                )
            else:
                actions.append(Action("place", model_id, "declared running, no instance"))
            continue
        # the placement landed: a later teardown is placed again at once
        memory.placed_at.pop(model_id, None)
        keep, *extra = instances
        actions += [
            Action(
                "delete",
                model_id,
                f"duplicate instance (keeping {short_id(keep.instance_id)})",
                extra_instance.instance_id,
            )
            for extra_instance in extra
        ]
        if instance_ready(state, keep):
            memory.unready_since.pop(keep.instance_id, None)
            actions.append(Action("ok", model_id, "running", keep.instance_id))
            continue
        since = memory.unready_since.setdefault(keep.instance_id, now)
        runners = _runner_summary(state, keep)
        if now - since >= place_timeout_s:
            actions.append(
                Action(
                    "delete",
                    model_id,
                    f"not ready after {now - since:.0f}s ({runners}); it will be placed again",
                    keep.instance_id,
                )
            )
            memory.unready_since.pop(keep.instance_id, None)
            memory.placed_at.pop(model_id, None)
        else:
            progress = _download_progress(state, model_id)
            actions.append(
                Action("wait", model_id, f"starting: {runners}{progress}", keep.instance_id)
            )
    return actions


def _download_progress(state: State, model_id: str) -> str:
    done = total = 0
    for _, entry in downloads_of(state, model_id):
        done += entry.downloaded_bytes
        total += entry.total_bytes
    return f"; downloaded {done / total:.0%}" if total else ""


def _plan_download(
    model_id: str, state: State, memory: Memory, now: float, timeout_s: float
) -> Action:
    statuses = download_status(state, model_id)
    if statuses and all(s == "Completed" for s in statuses.values()):
        return Action("ok", model_id, f"downloaded on {len(statuses)} node(s)")
    failed = [n for n, s in statuses.items() if s == "Failed"]
    if failed:
        return Action("download", model_id, f"download failed on {short_id(failed[0])}; retrying")
    if statuses:
        return Action("wait", model_id, f"downloading{_download_progress(state, model_id)}")
    sent = memory.downloads_at.get(model_id)
    if sent is not None and now - sent < timeout_s:
        return Action("wait", model_id, f"downloads requested {now - sent:.0f}s ago")
    return Action("download", model_id, "declared, not downloaded on any node")


@contextlib.contextmanager
def host_lock(path: Path) -> Iterator[bool]:
    """An exclusive lock on ``path`` (True) or, held by another process, False at once."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True
    finally:
        os.close(fd)


@dataclass
class PassResult:
    converged: bool
    status: str
    acted: bool = False


class Reconciler:
    """One node's reconciler: passes over the declared models."""

    def __init__(
        self,
        api: ModelsApi,
        declared: Mapping[str, DeclaredModel],
        *,
        hint_dir: Path | None,
        lock_path: Path,
        place_timeout_s: float,
        repair: RepairFn | None = None,
    ) -> None:
        self.api = api
        self.declared = dict(declared)
        self.hint_dir = hint_dir
        self.lock_path = lock_path
        self.place_timeout_s = place_timeout_s
        self.repair = repair
        self.memory = Memory()
        self._last_reason: dict[str, str] = {}

    def _say(self, action: Action, level: int = logging.INFO) -> None:
        """Log an action's reason once (a pass repeats waits; the journal gets changes)."""
        key = f"{action.model_id}/{action.kind}/{action.instance_id}"
        if action.kind in ("wait", "ok") and self._last_reason.get(key) == action.reason:
            return
        self._last_reason[key] = action.reason
        label = {"ok": "ok", "wait": "waiting"}.get(action.kind, action.kind)
        log.log(level, "%s %s: %s", label, action.model_id, action.reason)

    async def _is_master(self, node_id: str) -> tuple[bool, str]:
        if self.hint_dir is None:
            return True, ""
        master = read_master_hint(self.hint_dir, node_id)
        if master is None:
            return False, "standby: the master is not known yet (EXO has not logged an election)"
        if master != node_id:
            return False, f"standby: {short_id(master)} is master and reconciles"
        return True, ""

    async def run_pass(self) -> PassResult:
        """One comparison and the actions it calls for. Raises ExoApiError when the node
        does not answer."""
        node_id = await self.api.node_id()
        master, why = await self._is_master(node_id)
        if not master:
            return PassResult(True, why)
        with host_lock(self.lock_path) as locked:
            if not locked:
                return PassResult(False, "another reconciler on this host holds the lock")
            return await self._locked_pass()

    async def _locked_pass(self) -> PassResult:
        state = await self.api.state()
        if not state.synced:
            return PassResult(False, "waiting: the node has reached no master yet")
        problems: list[str] = []
        blocked = await self._add_cards(problems)
        actions = [
            Action("failed", a.model_id, blocked[a.model_id]) if a.model_id in blocked else a
            for a in plan(
                self.declared,
                state,
                self.memory,
                now=time.monotonic(),
                place_timeout_s=self.place_timeout_s,
            )
        ]
        acted = False
        for action in actions:
            try:
                acted |= await self._do(action)
            except ExoApiError as exc:
                problems.append(f"{action.model_id}: {exc}")
                log.warning("cannot %s %s: %s; retrying", action.kind, action.model_id, exc)
        return self._summary(actions, problems, acted)

    async def _add_cards(self, problems: list[str]) -> dict[str, str]:
        """Add the cards of custom models EXO does not list; model -> why it could not."""
        custom = [m for m, spec in self.declared.items() if spec.custom]
        if not custom:
            return {}
        known = await self.api.model_ids()
        blocked: dict[str, str] = {}
        for model_id in custom:
            if model_id in known:
                continue
            log.info("add-card %s: declared custom, not in EXO's model list", model_id)
            try:
                await self.api.add_custom(model_id)
            except ExoApiError as exc:
                if exc.kind != "http":
                    raise  # the node itself is gone: the whole pass waits
                blocked[model_id] = f"cannot add its card: {exc}"
                problems.append(f"{model_id}: {blocked[model_id]}")
                log.warning("cannot add-card %s: %s; retrying", model_id, exc)
        return blocked

    def _placement(self, model_id: str) -> Placement:
        return Placement.declared(model_id, self.declared[model_id])

    async def _do(self, action: Action) -> bool:
        if action.kind in ("ok", "wait", "failed"):
            if action.kind != "failed":  # failures were logged where they happened
                self._say(action)
            return False
        self._say(action)
        if action.kind == "delete" and action.instance_id is not None:
            await self.api.delete_instance(action.instance_id)
            return True
        if action.kind == "place":
            return await self._place(action.model_id)
        if action.kind == "download":
            return await self._download(action.model_id)
        return False

    async def _place(self, model_id: str) -> bool:
        placement = self._placement(model_id)
        # the same placement without placing: upstream's 400 names why it cannot be placed
        await self.api.preview(placement)
        if self.repair is not None:
            await asyncio.to_thread(self.repair, model_id)
        await self.api.place(placement)
        self.memory.placed_at[model_id] = time.monotonic()
        wait = min(self.place_timeout_s, 60.0)
        if await self.api.await_instance(model_id, wait):
            log.info("placed %s: the instance exists; waiting for its runners", model_id)
        else:
            log.warning("placed %s: no instance after %.0fs yet", model_id, wait)
        return True

    async def _download(self, model_id: str) -> bool:
        preview = await self.api.preview(self._placement(model_id))
        for node, shard in preview.shards_by_node().items():
            await self.api.start_download(node, shard)
            log.info("download %s: started on %s", model_id, short_id(node))
        self.memory.downloads_at[model_id] = time.monotonic()
        return True

    def _summary(self, actions: list[Action], problems: list[str], acted: bool) -> PassResult:
        ok = {a.model_id for a in actions if a.kind == "ok"}
        pending = {a.model_id for a in actions} - ok
        total = len(self.declared)
        status = f"{len(ok)}/{total} declared models in place"
        if problems:
            status += f"; {problems[0]}"
        elif pending:
            first = next(a for a in actions if a.model_id in pending and a.kind != "ok")
            reason = {
                "place": "placed, waiting for the instance",
                "download": "downloads started",
                "delete": "deleted an instance",
            }.get(first.kind, first.reason)
            status += f"; {first.model_id}: {reason}"
        return PassResult(not pending and not problems, status, acted)


def repair_function(config: Config) -> RepairFn:
    """Quarantine damaged files of one model in this node's writable model dirs."""
    from exo_nixos.models.verify import check_model_dir, quarantine

    roots = [Path(config.effective_models_dir), *map(Path, config.extra_model_dirs)]
    target = Path(config.effective_quarantine_dir)

    def repair(model_id: str) -> None:
        name = model_id.replace("/", "--")  # ModelId.normalize upstream
        reports = [check_model_dir(r / name) for r in roots if (r / name).is_dir()]
        if any(not r.clean for r in reports):
            try:
                moved = quarantine(reports, target)
            except OSError as exc:
                log.warning(
                    "cache %s: cannot quarantine damaged files in %s: %s; placing anyway "
                    "(run exo-nixos models verify --repair as the service user)",
                    model_id,
                    target,
                    os_reason(exc),
                )
                return
            for report in reports:
                for damage in report.damage:
                    log.warning("cache %s: %s", model_id, damage.line())
            log.warning("cache %s: %d damaged file(s) moved to %s", model_id, moved, target)

    return repair


async def serve(
    reconciler: Reconciler,
    *,
    interval_s: float,
    once: bool,
    stop: asyncio.Event,
    notify: Callable[[str], object] | None = None,
) -> int:
    """Passes until ``stop``: ``interval_s`` apart once converged, sooner while work is in
    flight, with backoff while the node does not answer."""
    from exo_nixos.backoff import Backoff

    backoff = Backoff(1.0, interval_s)
    last_status = ""
    while True:
        try:
            result = await reconciler.run_pass()
            backoff.reset()
            delay = interval_s if result.converged else min(interval_s, 2.0)
        except ExoApiError as exc:
            result = PassResult(False, f"waiting for the node API: {exc}")
            delay = backoff.next()
        if result.status != last_status:
            log.info("%s", result.status)
            last_status = result.status
        if notify is not None:
            notify(result.status)
        if once:
            return 0 if result.converged else 1
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), delay)
        if stop.is_set():
            return 0


def main(args: argparse.Namespace) -> int:
    import aiohttp

    from exo_nixos.config import load_config
    from exo_nixos.supervisor.logs import setup_logging
    from exo_nixos.supervisor.notify import Notifier

    config = load_config(args.config)
    setup_logging(config.log_level)
    url = args.url or local_api_url(config.api_port)
    runtime = Path(config.security.runtime_dir)
    notifier = Notifier.from_environ()
    if not config.models:
        log.info("no models declared: nothing to reconcile")
        notifier.ready("no models declared")
        return 0
    settings = config.model_reconciler

    async def run() -> int:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        async with aiohttp.ClientSession() as session:
            reconciler = Reconciler(
                ModelsApi(session, url),
                config.models,
                hint_dir=runtime,
                lock_path=_lock_path(runtime),
                place_timeout_s=settings.place_timeout_sec,
                repair=repair_function(config) if settings.repair_cache else None,
            )
            notifier.ready(f"reconciling {len(config.models)} declared model(s)")
            return await serve(
                reconciler,
                interval_s=settings.interval_sec,
                once=args.once,
                stop=stop,
                notify=notifier.status,
            )

    try:
        return asyncio.run(run())
    finally:
        notifier.close()


def _lock_path(runtime: Path) -> Path:
    """The lock in the runtime dir when it is writable here, else in /tmp (a person's run)."""
    if os.access(runtime, os.W_OK):
        return runtime / LOCK_FILE
    return Path("/tmp") / f"exo-nixos-{os.getuid()}-{LOCK_FILE}"
