"""State the gateway's worker processes share: rows of numbers in anonymous shared memory.

The memory is mapped before the workers are forked, so every worker sees the same bytes; one
process alone uses the same code over memory nobody else maps. A row is found by the hash
of its name (an API key's name, a backend's URL), with linear probing; rows are never freed
(their names are bounded: the keys in the key file, the cluster's node APIs).

Fields a single worker writes (its own in-flight count) need no lock: an aligned 8-byte
store is atomic, and a reader sees the old or the new value. Read-modify-write updates that
several workers make (a rate limit's state) take the table's lock, a process-shared
semaphore held for a few microseconds.
"""

from __future__ import annotations

import hashlib
import mmap
import multiprocessing
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import cast

_TAG = 8  # bytes of a row's tag (the hash of its name)
_FIELD = 8  # bytes of each field (a double)


class TableFull(Exception):
    """No free row is left for a new name."""


class SharedTable:
    """``capacity`` rows of ``fields`` doubles plus ``workers`` per-worker doubles each."""

    def __init__(self, capacity: int, fields: int, workers: int = 1) -> None:
        self.capacity = capacity
        self.fields = fields
        self.workers = workers
        self.width = fields + workers
        self._memory = mmap.mmap(-1, capacity * (_TAG + self.width * _FIELD))
        view = memoryview(self._memory)
        self._tags = view[: capacity * _TAG].cast("q")
        self._values = view[capacity * _TAG :].cast("d")
        # a fork-inherited semaphore; a plain Lock when there is one process only
        context = multiprocessing.get_context("fork")
        self.lock: AbstractContextManager[bool] = cast(AbstractContextManager[bool], context.Lock())
        self._rows: dict[str, int] = {}
        self.worker = 0  # the index of the calling process's own column

    @staticmethod
    def _tag(name: str) -> int:
        digest = hashlib.blake2b(name.encode("utf-8", "surrogateescape"), digest_size=8).digest()
        return int.from_bytes(digest, "little", signed=True) or 1  # 0 marks a free row

    def row(self, name: str) -> int:
        """The index of ``name``'s first field (the row is made on first use)."""
        found = self._rows.get(name)
        if found is not None:
            return found
        tag = self._tag(name)
        start = tag % self.capacity
        with self.lock:
            for step in range(self.capacity):
                slot = (start + step) % self.capacity
                current = self._tags[slot]
                if current == 0:
                    self._tags[slot] = tag
                if current in (0, tag):
                    base = slot * self.width
                    self._rows[name] = base
                    return base
        raise TableFull(name)

    def get(self, base: int, field: int) -> float:
        return self._values[base + field]

    def set(self, base: int, field: int, value: float) -> None:
        self._values[base + field] = value

    def set_own(self, base: int, value: float) -> None:
        """Set the calling worker's column (no lock: no other process writes it)."""
        self._values[base + self.fields + self.worker] = value

    def add_own(self, base: int, delta: float) -> float:
        """Add to the calling worker's column (no lock: no other process writes it)."""
        index = base + self.fields + self.worker
        value = self._values[index] + delta
        self._values[index] = value
        return value

    def total(self, base: int) -> float:
        """The sum of every worker's column of a row."""
        start = base + self.fields
        return sum(self._values[start : start + self.workers])

    def clear_worker(self, worker: int) -> None:
        """Zero a worker's column in every row (it died; what it held is let go)."""
        for slot in range(self.capacity):
            if self._tags[slot] != 0:
                self._values[slot * self.width + self.fields + worker] = 0.0

    def update(self, base: int, change: Callable[[list[float]], None]) -> list[float]:
        """Apply ``change`` to a row's shared fields under the lock; return them."""
        with self.lock:
            fields = list(self._values[base : base + self.fields])
            change(fields)
            for offset, value in enumerate(fields):
                self._values[base + offset] = value
            return fields
