"""Physical memory, the calling process's cgroup v2 memory limit, free disk for models."""

from __future__ import annotations

import os
import re
from pathlib import Path, PurePosixPath

from exo_nixos.hardware.model import Disk, Memory
from exo_nixos.hardware.tree import Tree

_MEMINFO = re.compile(r"^(\w+):\s*(\d+)\s*kB\s*$", re.MULTILINE)
CGROUP_ROOT = "/sys/fs/cgroup"


def read_meminfo(tree: Tree) -> tuple[int | None, int | None]:
    """``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo`` in bytes (None: unknown)."""
    text = tree.text("/proc/meminfo", expected=True)
    if text is None:
        return None, None
    values = {k: int(v) * 1024 for k, v in _MEMINFO.findall(text)}
    total = values.get("MemTotal")
    if total is None:
        tree.warn(f"{tree.shown('/proc/meminfo')}: no MemTotal line; physical memory unknown")
    return total, values.get("MemAvailable")


def _cgroup_path(tree: Tree) -> str | None:
    text = tree.text("/proc/self/cgroup")
    if text is None:
        return None
    for line in text.splitlines():
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "" and path.startswith("/"):
            return path
    if text.strip():
        tree.warn(
            f"{tree.shown('/proc/self/cgroup')}: no cgroup v2 entry (cgroup v1 host?); "
            "memory limit not read"
        )
    return None


def _cgroup_limit(tree: Tree, path: str) -> int | None:
    """The lowest memory.max from the process's cgroup up to the root; None: unlimited."""
    limits: list[int] = []
    current = PurePosixPath(path)
    for group in [current, *current.parents]:
        if ".." in group.parts:
            break
        file = f"{CGROUP_ROOT}{group}/memory.max".replace("//", "/")
        value = tree.line(file)
        if value is None or value == "max":
            continue
        if value.isdigit():
            limits.append(int(value))
        else:
            tree.warn(f"{tree.shown(file)}: {value[:40]!r} is neither a number nor 'max'; ignored")
    return min(limits) if limits else None


def read_memory(tree: Tree) -> Memory:
    total, available = read_meminfo(tree)
    path = _cgroup_path(tree)
    limit = _cgroup_limit(tree, path) if path else None
    return Memory(total, available, path, limit)


def read_disk(tree: Tree, models_dir: str) -> Disk | None:
    """Free space where models go: under the root when it exists there, else on this host."""
    under_root = tree.path(models_dir)
    candidate = under_root if not tree.is_live and under_root.exists() else Path(models_dir)
    for directory in [candidate, *candidate.parents]:
        try:
            stats = os.statvfs(directory)
        except FileNotFoundError:
            continue
        except OSError as exc:
            tree.warn(f"{directory}: cannot measure free disk ({exc.strerror}); ignored")
            return None
        return Disk(
            requested=models_dir,
            measured=str(directory),
            free_bytes=stats.f_bavail * stats.f_frsize,
            total_bytes=stats.f_blocks * stats.f_frsize,
        )
    return None
