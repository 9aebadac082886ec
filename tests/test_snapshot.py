from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from exo_nixos.supervisor.snapshot import SnapshotStore, Topology

TOPO = Topology("node-a", "node-b", False, {"node-b": ["10.0.0.2"]}, 1)


def test_save_then_load_round_trips(tmp_path) -> None:
    store = SnapshotStore(tmp_path / "state" / "topology.json")
    store.save("worker", TOPO, now=1234.5)
    loaded = store.load()
    assert loaded is not None
    assert loaded.topology == TOPO
    assert loaded.role == "worker"
    assert loaded.taken_at == 1234.5
    assert oct(store.path.stat().st_mode & 0o777) == oct(0o640)
    assert [p.name for p in store.path.parent.iterdir()] == ["topology.json"]


def test_missing_file_is_no_snapshot(tmp_path) -> None:
    assert SnapshotStore(tmp_path / "topology.json").load() is None


def test_corrupted_file_is_set_aside_with_a_warning(tmp_path, caplog) -> None:
    path = tmp_path / "topology.json"
    path.write_bytes(b'{"format": 1, "takenAt": 3, "topo')
    store = SnapshotStore(path)
    with caplog.at_level(logging.WARNING):
        assert store.load() is None
    assert "corrupted" in caplog.text
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("topology.json.corrupt-")]
    assert len(aside) == 1
    assert aside[0].read_bytes() == b'{"format": 1, "takenAt": 3, "topo'
    assert not path.exists()
    store.save("master", TOPO)
    assert store.load() is not None


def test_wrong_shape_counts_as_corrupted(tmp_path) -> None:
    path = tmp_path / "topology.json"
    for bad in ([1, 2], {"format": 1, "takenAt": 1, "role": "w", "topology": {"peers": 3}}):
        path.write_text(json.dumps(bad))
        assert SnapshotStore(path).load() is None
        assert not path.exists()
    assert len(list(tmp_path.glob("topology.json.corrupt-*"))) == 2


def _doc(taken_at: str) -> bytes:
    topology = '{"nodeId": "node-a", "peers": {}}'
    text = f'{{"format": 1, "role": "worker", "takenAt": {taken_at}, "topology": {topology}}}'
    return text.encode()


UNUSABLE = {
    "takenAt far beyond any date": _doc("1e300"),
    "takenAt NaN": _doc("NaN"),
    "takenAt Infinity": _doc("-Infinity"),
    "takenAt a string": _doc('"1700000000"'),
    "takenAt true": _doc("true"),
    "nested too deeply": b'{"format": 1, "topology": ' + b"[" * 200_000 + b"]" * 200_000 + b"}",
    "peer addresses not a list": b'{"format": 1, "role": "w", "takenAt": 1, '
    b'"topology": {"nodeId": "a", "peers": {"b": "10.0.0.2"}}}',
}


@pytest.mark.parametrize("raw", UNUSABLE.values(), ids=UNUSABLE.keys())
def test_unusable_values_count_as_corrupted(tmp_path, caplog, raw: bytes) -> None:
    path = tmp_path / "topology.json"
    path.write_bytes(raw)
    with caplog.at_level(logging.WARNING):
        assert SnapshotStore(path).load() is None
    assert not path.exists()
    (aside,) = tmp_path.glob("topology.json.corrupt-*")
    assert aside.read_bytes() == raw
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1
    assert "corrupted" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_kill_9_while_writing_never_leaves_a_partial_file(tmp_path) -> None:
    """A writer killed with SIGKILL at random moments leaves a whole snapshot or none."""
    path = tmp_path / "topology.json"
    writer = textwrap.dedent(
        f"""
        import sys
        from exo_nixos.supervisor.snapshot import SnapshotStore, Topology
        store = SnapshotStore(__import__("pathlib").Path({str(path)!r}))
        peers = {{f"peer-{{i}}": ["10.0.0.%d" % (i % 250)] * 20 for i in range(400)}}
        n = 0
        print("go", flush=True)
        while True:
            n += 1
            store.save("worker", Topology(f"node-{{n}}", None, True, peers, n))
        """
    )
    for delay in (0.05, 0.11, 0.17, 0.23, 0.31):
        proc = subprocess.Popen(
            [sys.executable, "-c", writer], stdout=subprocess.PIPE, env=dict(os.environ)
        )
        assert proc.stdout is not None
        assert proc.stdout.readline() == b"go\n"
        time.sleep(delay)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        if path.exists():
            loaded = SnapshotStore(path).load()
            assert loaded is not None, "a kill -9 left a snapshot that does not parse"
            assert len(loaded.topology.peers) == 400
    assert not list(tmp_path.glob("*.corrupt-*"))
    assert SnapshotStore(path).load() is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["topology.json"], "temporaries left"
