"""Cluster topology snapshots, kept crash-safe in the state directory.

Each snapshot is one JSON document written with :func:`exo_nixos.fsutil.atomic_write` (temporary
file, fsync, rename, fsync of the directory): a ``kill -9`` at any moment leaves the previous
snapshot or the new one, never a mix. A file that does not parse (disk trouble, a hand edit) is
renamed aside to ``NAME.corrupt-<UTC timestamp>`` with a warning and replaced by the next write;
so is one whose values are unusable (a ``takenAt`` that is no date, JSON nested too deeply to
decode): whatever is in the file, loading it never fails.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from exo_nixos.fsutil import atomic_write

log = logging.getLogger(__name__)

FORMAT = 1


@dataclass(frozen=True)
class Topology:
    node_id: str
    master_id: str | None
    is_master: bool
    peers: dict[str, list[str]]  # node id -> addresses
    instances: int

    def to_json(self) -> dict[str, Any]:
        return {
            "nodeId": self.node_id,
            "masterId": self.master_id,
            "isMaster": self.is_master,
            "peers": {k: list(v) for k, v in sorted(self.peers.items())},
            "instances": self.instances,
        }

    @classmethod
    def from_json(cls, doc: Any) -> Topology:
        if not isinstance(doc, dict):
            raise ValueError("topology must be an object")
        peers = doc.get("peers", {})
        if not isinstance(doc.get("nodeId"), str) or not isinstance(peers, dict):
            raise ValueError("topology needs a string nodeId and a peers object")
        for addresses in peers.values():
            if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
                raise ValueError("each peer's addresses must be a list of strings")
        master = doc.get("masterId")
        instances = doc.get("instances", 0)
        if not isinstance(instances, int) or isinstance(instances, bool):
            raise ValueError("instances must be an integer")
        return cls(
            node_id=doc["nodeId"],
            master_id=master if isinstance(master, str) else None,
            is_master=bool(doc.get("isMaster", False)),
            peers={str(k): list(v) for k, v in peers.items()},
            instances=instances,
        )


@dataclass(frozen=True)
class Snapshot:
    taken_at: float
    role: str
    topology: Topology


def _timestamp(value: Any) -> float:
    """``takenAt``: seconds since the epoch that make a UTC date (what the log line shows)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError("takenAt must be a number")
    seconds = float(value)
    if not math.isfinite(seconds):
        raise ValueError(f"takenAt {value} is not a time")
    try:
        time.gmtime(seconds)
    except (OverflowError, OSError, ValueError):
        raise ValueError(f"takenAt {value} is not a date") from None
    return seconds


class SnapshotStore:
    """Reads and writes ``path``; ``load`` recovers from a corrupted file."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def load(self) -> Snapshot | None:
        """The last snapshot, or None when there is none or it was corrupted (set aside).

        Temporary files left by a writer killed mid-write are removed.
        """
        self._remove_stale_temporaries()
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("cannot read topology snapshot %s: %s", self.path, exc.strerror)
            return None
        try:
            doc = json.loads(raw)
            if not isinstance(doc, dict) or doc.get("format") != FORMAT:
                raise ValueError(f"not a format-{FORMAT} topology snapshot")
            return Snapshot(
                taken_at=_timestamp(doc["takenAt"]),
                role=str(doc["role"]),
                topology=Topology.from_json(doc["topology"]),
            )
        except RecursionError:
            reason = "nested too deeply"
        except (ValueError, KeyError, TypeError, UnicodeDecodeError, OverflowError) as exc:
            reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        try:
            aside = self.set_aside()
        except OSError as exc:  # a read-only state directory: the next write fails the same way
            log.warning(
                "topology snapshot %s is corrupted (%s) and cannot be moved aside: %s",
                self.path,
                reason,
                exc.strerror or exc,
            )
            return None
        log.warning(
            "topology snapshot %s is corrupted (%s); moved it to %s, a new one will be written",
            self.path,
            reason,
            aside,
        )
        return None

    def _remove_stale_temporaries(self) -> None:
        # atomic_write names its temporary ".NAME.<random>.tmp" in the same directory
        if not self.path.parent.is_dir():
            return
        for stale in self.path.parent.glob(f".{self.path.name}.*.tmp"):
            with contextlib.suppress(OSError):
                stale.unlink()
                log.info("removed %s left by an interrupted snapshot write", stale)

    def set_aside(self) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        n = 1
        while aside.exists():
            n += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}.{n}")
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path, aside)
        return aside

    def save(self, role: str, topology: Topology, now: float | None = None) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o750)
        doc = {
            "format": FORMAT,
            "takenAt": time.time() if now is None else now,
            "role": role,
            "topology": topology.to_json(),
        }
        atomic_write(self.path, json.dumps(doc, indent=2, sort_keys=True) + "\n", mode=0o640)
