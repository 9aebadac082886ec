"""Byte sizes as the tool's messages and reports write them."""

from __future__ import annotations

MIB = 1 << 20
GIB = 1 << 30


def gib(size: float | None, digits: int = 1) -> str:
    """``48.0 GiB`` (``digits`` decimals); ``unknown`` for None."""
    return "unknown" if size is None else f"{size / GIB:.{digits}f} GiB"


def size(value: float, digits: int = 1) -> str:
    """``48 GiB`` from a GiB up, else ``512.0 MiB`` (``digits`` decimals)."""
    if value >= GIB:
        return f"{value / GIB:.{digits}f} GiB"
    return f"{value / MIB:.{digits}f} MiB"
