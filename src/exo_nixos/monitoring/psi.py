"""Memory pressure of the EXO node unit, from its cgroup v2 files.

``memory.pressure`` is the kernel's pressure stall information (PSI) for the cgroup::

    some avg10=0.00 avg60=0.00 avg300=0.00 total=0
    full avg10=0.00 avg60=0.00 avg300=0.00 total=0

``some``: the share of time at least one task waited for memory (reclaim, refaults, swap);
``full``: all non-idle tasks waited at once. ``avgN`` are percentages over N seconds,
``total`` the stall in microseconds since the cgroup was made. Sustained pressure
(``some avg60`` at or above :data:`DEGRADED_SOME_AVG60`) marks the node *degraded*: EXO has
no runtime memory interface, so it keeps placing work while the kernel reclaims below
``MemoryHigh`` (docs/monitoring.md).

Also ``memory.current``, ``memory.high``, ``memory.max`` and the ``oom_kill`` count of
``memory.events``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from exo_nixos.fsutil import os_reason

CGROUP_ROOT = Path("/sys/fs/cgroup")
DEGRADED_SOME_AVG60 = 10.0
"""Percent of the last minute with some task stalled on memory that counts as degraded."""
_LIMIT = 64 * 1024  # bytes read from one cgroup file at most


@dataclass(frozen=True)
class Stall:
    avg10: float
    avg60: float
    avg300: float
    total_us: int


@dataclass(frozen=True)
class Pressure:
    some: Stall
    full: Stall

    @property
    def degraded(self) -> str | None:
        """One line when the pressure is sustained, else ``None``."""
        if self.some.avg60 < DEGRADED_SOME_AVG60:
            return None
        return (
            f"memory pressure: tasks stalled on memory {self.some.avg60:.1f}% of the last "
            f"minute (PSI some avg60; {DEGRADED_SOME_AVG60:g}% counts as degraded)"
        )


def parse_pressure(text: str) -> Pressure:
    """Parse a ``memory.pressure`` file; ValueError names what is wrong."""
    lines: dict[str, Stall] = {}
    for line in text.splitlines():
        kind, _, rest = line.partition(" ")
        if kind not in ("some", "full"):
            continue
        fields = dict(part.partition("=")[::2] for part in rest.split())
        try:
            lines[kind] = Stall(
                avg10=float(fields["avg10"]),
                avg60=float(fields["avg60"]),
                avg300=float(fields["avg300"]),
                total_us=int(fields["total"]),
            )
        except (KeyError, ValueError):
            raise ValueError(f"unexpected PSI line {line[:80]!r}") from None
    if "some" not in lines:
        raise ValueError("no 'some' line")
    # the root cgroup and old kernels have no "full" line for some resources
    return Pressure(some=lines["some"], full=lines.get("full", Stall(0.0, 0.0, 0.0, 0)))


def unit_cgroup(unit: str, root: Path = CGROUP_ROOT) -> Path:
    """The cgroup of a system service: ``/sys/fs/cgroup/system.slice/UNIT.service``."""
    name = unit if unit.endswith(".service") else f"{unit}.service"
    return root / "system.slice" / name


def own_cgroup(root: Path = CGROUP_ROOT, proc: Path = Path("/proc/self/cgroup")) -> Path | None:
    """This process's cgroup v2 directory, or None (cgroup v1, unreadable)."""
    try:
        text = proc.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("0::/"):
            return root / line.removeprefix("0::/")
    return None


@dataclass(frozen=True)
class CgroupMemory:
    """What the node unit's cgroup says about its memory; ``problem`` when unreadable."""

    path: Path
    pressure: Pressure | None = None
    current_bytes: int | None = None
    high_bytes: int | None = None
    """``memory.high``; None when ``max`` (no throttling)."""
    max_bytes: int | None = None
    """``memory.max``; None when ``max`` (no limit)."""
    oom_kills: int | None = None
    problem: str | None = None


def _read(path: Path) -> str:
    with path.open("rb") as handle:
        return handle.read(_LIMIT).decode("utf-8", "replace")


def _bytes(text: str) -> int | None:
    value = text.strip()
    return None if value == "max" else int(value)


def _why(path: Path, exc: OSError) -> str:
    if isinstance(exc, FileNotFoundError):
        unit = path.parent.name
        return f"{path} does not exist: is {unit} running (and the host on cgroup v2)?"
    if isinstance(exc, PermissionError):
        return f"cannot read {path} as this user; run as root or the service user"
    return f"cannot read {path}: {os_reason(exc)}"


def read_cgroup_memory(path: Path) -> CgroupMemory:
    """Read the memory files of the cgroup at ``path``; never raises."""
    pressure_file = path / "memory.pressure"
    try:
        pressure = parse_pressure(_read(pressure_file))
    except OSError as exc:
        return CgroupMemory(path, problem=_why(pressure_file, exc))
    except ValueError as exc:
        return CgroupMemory(path, problem=f"{pressure_file}: {exc}")
    values: dict[str, int | None] = {}
    for name in ("memory.current", "memory.high", "memory.max"):
        try:
            values[name] = _bytes(_read(path / name))
        except (OSError, ValueError):
            values[name] = None
    oom_kills = None
    try:
        for line in _read(path / "memory.events").splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                oom_kills = int(value)
    except (OSError, ValueError):
        pass
    return CgroupMemory(
        path,
        pressure=pressure,
        current_bytes=values["memory.current"],
        high_bytes=values["memory.high"],
        max_bytes=values["memory.max"],
        oom_kills=oom_kills,
    )
