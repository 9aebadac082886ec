"""Readers of host trees refuse what a real sysfs never holds: FIFOs, devices, huge files.

A captured tree (or a hostile one) can hold anything; detection, `net` and the pre-flight must
neither hang on a FIFO, nor read /dev/zero until memory runs out, nor spend minutes on a 10 MB
attribute.
"""

from __future__ import annotations

import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from exo_nixos.hardware import detect
from exo_nixos.network import inspect

FIXTURES = Path(__file__).parent / "fixtures"


def test_read_bounded_refuses_fifo_device_and_oversize(tmp_path):
    from exo_nixos.fsutil import HOST_FILE_LIMIT, read_bounded

    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(OSError) as caught:
        read_bounded(fifo)  # returns at once: no writer is waited for
    assert caught.value.errno == errno.EINVAL and caught.value.strerror == "not a regular file"
    with pytest.raises(OSError, match="not a regular file"):
        read_bounded("/dev/zero")
    big = tmp_path / "big"
    big.write_bytes(b"x" * (HOST_FILE_LIMIT + 1))
    with pytest.raises(OSError) as caught:
        read_bounded(big)
    assert caught.value.errno == errno.EFBIG
    exact = tmp_path / "exact"
    exact.write_bytes(b"y" * HOST_FILE_LIMIT)
    assert len(read_bounded(exact)) == HOST_FILE_LIMIT


@pytest.fixture
def hostile_tree(tmp_path: Path) -> Path:
    """The bond tree with its bond's attributes replaced by a FIFO, /dev/zero and 10 MB."""
    root = tmp_path / "tree"
    shutil.copytree(FIXTURES / "network" / "bond-active-backup", root, symlinks=True)
    net = root / "sys" / "class" / "net"
    bond = net / "bond0"
    bond = bond.resolve() if bond.is_symlink() else bond
    (bond / "mtu").unlink()
    os.mkfifo(bond / "mtu")
    (bond / "address").unlink()
    (bond / "address").symlink_to("/dev/zero")
    (bond / "operstate").write_bytes(b"up" * (5 << 20))
    meminfo = root / "proc" / "meminfo"
    meminfo.parent.mkdir(parents=True, exist_ok=True)
    meminfo.unlink(missing_ok=True)
    os.mkfifo(meminfo)
    return root


def test_net_and_detect_do_not_hang_or_balloon_on_a_hostile_tree(hostile_tree: Path):
    for command in (
        ["net", "--root", str(hostile_tree), "--json"],
        ["detect", "--root", str(hostile_tree), "--json"],
    ):
        done = subprocess.run(
            [sys.executable, "-m", "exo_nixos", *command],
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert "Traceback" not in done.stderr, done.stderr
        assert len(done.stdout) < 200_000, (command, len(done.stdout))


def test_inventories_ignore_what_they_cannot_read(hostile_tree: Path):
    inv = inspect(hostile_tree)
    bond = inv.interface("bond0")
    assert bond is not None and bond.mtu is None
    inventory = detect(hostile_tree, use_nvml=False)
    assert inventory.memory.total_bytes is None
