"""``SharedTable``: rows of numbers found by name, shared by the gateway's worker processes.

Each name has a row of its own (names whose hashes collide included), each field and each
worker's column is its own place, a row made by one process is found by another, and a dead
worker's columns can be cleared."""

from __future__ import annotations

import itertools
import os

import pytest

from exo_nixos.gateway.shared import SharedTable, TableFull


def colliding(capacity: int, count: int) -> list[str]:
    """``count`` names whose rows would start at the same slot of a table of ``capacity``."""
    by_slot: dict[int, list[str]] = {}
    for n in itertools.count():
        name = f"key-{n}"
        group = by_slot.setdefault(SharedTable._tag(name) % capacity, [])
        group.append(name)
        if len(group) == count:
            return group
    raise AssertionError("unreachable")


def test_each_name_has_a_row_of_its_own_even_when_hashes_collide() -> None:
    table = SharedTable(capacity=4, fields=2, workers=3)
    names = colliding(4, 3)
    rows = [table.row(name) for name in names]
    assert len(set(rows)) == 3
    for index, row in enumerate(rows):
        table.set(row, 0, 10.0 + index)
        table.set(row, 1, 20.0 + index)
    for index, name in enumerate(names):
        row = table.row(name)  # the same row again
        assert (table.get(row, 0), table.get(row, 1)) == (10.0 + index, 20.0 + index)


def test_a_full_table_says_which_name_found_no_row() -> None:
    table = SharedTable(capacity=2, fields=1)
    table.row("a")
    table.row("b")
    with pytest.raises(TableFull) as full:
        table.row("c")
    assert str(full.value) == "c"
    assert table.row("a") != table.row("b")  # the rows made are still found


def test_names_that_are_not_valid_unicode_have_rows() -> None:
    """Key names come from a file read with surrogateescape: a stray byte is a lone
    surrogate, which must not stop the gateway."""
    table = SharedTable(capacity=8, fields=1)
    assert table.row("caf\udce9") != table.row("café")


def test_each_worker_has_its_own_column_and_a_dead_ones_is_cleared() -> None:
    table = SharedTable(capacity=8, fields=2, workers=3)
    rows = [table.row(name) for name in ("alice", "bob")]
    for worker in range(3):
        table.worker = worker
        for row in rows:
            table.set_own(row, 1.0)
            assert table.add_own(row, 2.0 + worker) == 3.0 + worker
            assert table.add_own(row, -1.0) == 2.0 + worker
    # shared fields untouched by the columns
    assert [table.get(row, field) for row in rows for field in (0, 1)] == [0.0] * 4
    assert [table.total(row) for row in rows] == [2.0 + 3.0 + 4.0] * 2
    table.clear_worker(1)
    assert [table.total(row) for row in rows] == [2.0 + 4.0] * 2
    table.clear_worker(0)
    table.clear_worker(2)
    assert [table.total(row) for row in rows] == [0.0, 0.0]


def test_update_changes_the_shared_fields_under_the_lock() -> None:
    table = SharedTable(capacity=8, fields=3, workers=2)
    row = table.row("alice")

    def change(fields: list[float]) -> None:
        fields[0] += 1.0
        fields[2] = 7.0

    assert table.update(row, change) == [1.0, 0.0, 7.0]
    assert table.update(row, change) == [2.0, 0.0, 7.0]
    assert table.total(row) == 0.0  # the workers' columns are not fields


def test_what_one_process_writes_another_reads() -> None:
    """The memory is mapped before the fork, as the gateway's master maps it: a row a worker
    makes, and its column, are seen by the other process."""
    table = SharedTable(capacity=16, fields=1, workers=2)
    parent_row = table.row("made-before-the-fork")
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # the worker
        try:
            os.close(reader)
            table.worker = 1
            table.add_own(table.row("made-before-the-fork"), 5.0)
            row = table.row("made-by-the-worker")
            table.set(row, 0, 42.0)
            table.set_own(row, 3.0)
            os.write(writer, b"done")
        finally:
            os._exit(0)
    os.close(writer)
    assert os.read(reader, 4) == b"done"
    os.close(reader)
    os.waitpid(pid, 0)
    assert table.total(parent_row) == 5.0
    row = table.row("made-by-the-worker")  # not in this process's own index: found by its tag
    assert (table.get(row, 0), table.total(row)) == (42.0, 3.0)
