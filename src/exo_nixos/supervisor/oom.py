"""After EXO is killed for lack of memory, offer it less at the next start.

EXO has no runtime memory interface: it plans placement with the memory it is told at start
(``OVERRIDE_MEMORY_MB``) and never learns that the kernel killed it. So the node unit
records how each run ended (``exo-nixos record-stop`` as ``ExecStopPost``, reading systemd's
``$SERVICE_RESULT``), and each start after an ``oom-kill`` offers :data:`STEP` less of the
figure the hardware decision produced, at most :data:`MAX_STEPS` steps down; one step is
given back for every :data:`RECOVER_AFTER_S` without another kill. The reason goes to the
journal at every start it applies to.

The record also counts starts (``exo_node_starts_total``) and OOM kills for the exporter.
It lives in ``{dataDir}/exo-nixos/runs.json``, so it survives restarts and reboots.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import MutableMapping
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from exo_nixos import jsonio
from exo_nixos.fsutil import atomic_write
from exo_nixos.hardware.memory import read_meminfo
from exo_nixos.hosttree import Tree
from exo_nixos.units import MIB

log = logging.getLogger(__name__)

STEP = 0.10
"""Share of the decided memory taken off per step."""
MAX_STEPS = 4
"""At most this many steps: EXO is never offered less than 60% of the decided figure."""
RECOVER_AFTER_S = 6 * 3600
"""One step is given back per this many seconds without another OOM kill."""
RECORD = "exo-nixos/runs.json"
OOM_RESULT = "oom-kill"
"""systemd's ``$SERVICE_RESULT`` when the kernel or systemd-oomd killed a process of the unit."""


@dataclass(frozen=True)
class RunRecord:
    starts: int = 0
    oom_kills: int = 0
    steps: int = 0
    """Steps down at the last OOM kill (before recovery with time)."""
    last_oom_at: float | None = None
    last_result: str | None = None

    def steps_at(self, now: float) -> int:
        """Steps in force at ``now``: those recorded, less one per recovery period."""
        if self.steps <= 0 or self.last_oom_at is None:
            return 0
        recovered = max(0, int((now - self.last_oom_at) // RECOVER_AFTER_S))
        return max(0, self.steps - recovered)

    def to_json(self) -> dict[str, Any]:
        return {
            "starts": self.starts,
            "oomKills": self.oom_kills,
            "steps": self.steps,
            "lastOomAt": self.last_oom_at,
            "lastResult": self.last_result,
        }

    @classmethod
    def from_json(cls, doc: Any) -> RunRecord:
        if not isinstance(doc, dict):
            raise ValueError("not an object")
        counts = {k: doc.get(k, 0) for k in ("starts", "oomKills", "steps")}
        if not all(type(v) is int and v >= 0 for v in counts.values()):
            raise ValueError("starts, oomKills and steps must be counts")
        last = doc.get("lastOomAt")
        if last is not None and not (isinstance(last, int | float) and math.isfinite(last)):
            raise ValueError("lastOomAt must be a time")
        result = doc.get("lastResult")
        return cls(
            starts=counts["starts"],
            oom_kills=counts["oomKills"],
            steps=min(counts["steps"], MAX_STEPS),
            last_oom_at=float(last) if last is not None and not isinstance(last, bool) else None,
            last_result=result if isinstance(result, str) else None,
        )


def record_path(data_dir: str | Path) -> Path:
    return Path(data_dir) / RECORD


def load(path: Path) -> RunRecord:
    """The record at ``path``; a fresh one when absent or unusable (logged)."""
    try:
        return RunRecord.from_json(jsonio.loads(path.read_text(encoding="utf-8")))
    except FileNotFoundError:
        return RunRecord()
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return RunRecord()


def _save(path: Path, record: RunRecord) -> None:
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
    atomic_write(path, json.dumps(record.to_json()) + "\n", mode=0o640)


def record_start(path: Path) -> RunRecord:
    """Count a start of the node; never fails the start (a read-only disk is logged)."""
    record = load(path)
    record = replace(record, starts=record.starts + 1)
    try:
        _save(path, record)
    except OSError as exc:
        log.warning("cannot record the start in %s: %s", path, exc)
    return record


def record_stop(path: Path, result: str, now: float | None = None) -> RunRecord:
    """Record how a run ended (``$SERVICE_RESULT``); an ``oom-kill`` adds a step down."""
    now = time.time() if now is None else now
    record = replace(load(path), last_result=result or None)
    if result == OOM_RESULT:
        steps = min(MAX_STEPS, record.steps_at(now) + 1)
        record = replace(record, oom_kills=record.oom_kills + 1, steps=steps, last_oom_at=now)
    _save(path, record)
    return record


@dataclass(frozen=True)
class Offer:
    memory_mb: int | None
    reason: str | None = None
    """Why less than the decided figure is offered; None when nothing is taken off."""


def offer(record: RunRecord, decided_mb: int | None, total_mb: int | None, now: float) -> Offer:
    """The memory to offer EXO: ``decided_mb`` (or all memory when nothing limits EXO) less
    the steps in force."""
    steps = record.steps_at(now)
    if steps == 0:
        return Offer(decided_mb)
    base = decided_mb if decided_mb is not None else total_mb
    if base is None:
        return Offer(None, "EXO was killed for lack of memory, but this host's memory is unknown")
    offered = int(base * (1 - STEP * steps))
    assert record.last_oom_at is not None
    when = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(record.last_oom_at))
    reason = (
        f"EXO was killed for lack of memory (last at {when}, {record.oom_kills} in all): "
        f"offering it {offered} MiB instead of {base} MiB (OVERRIDE_MEMORY_MB, {steps} of "
        f"{MAX_STEPS} steps of {STEP:.0%}; a step is given back every "
        f"{RECOVER_AFTER_S // 3600} h without another kill)"
    )
    return Offer(offered, reason)


def _total_mb(root: Path) -> int | None:
    total, _ = read_meminfo(Tree(root))
    return total // MIB if total is not None else None


def apply(env: MutableMapping[str, str], data_dir: str, root: Path = Path("/")) -> Offer:
    """Lower ``OVERRIDE_MEMORY_MB`` in ``env`` after OOM kills, and log why."""
    decided = env.get("OVERRIDE_MEMORY_MB")
    decided_mb = int(decided) if decided and decided.isdigit() else None
    result = offer(load(record_path(data_dir)), decided_mb, _total_mb(root), time.time())
    if result.reason is not None:
        log.warning("memory: %s", result.reason)
    if result.memory_mb is not None:
        env["OVERRIDE_MEMORY_MB"] = str(result.memory_mb)
    return result


__all__ = [
    "MAX_STEPS",
    "RECOVER_AFTER_S",
    "STEP",
    "Offer",
    "RunRecord",
    "apply",
    "load",
    "offer",
    "record_path",
    "record_start",
    "record_stop",
]
