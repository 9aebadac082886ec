"""Byte sizes as the tool's messages and reports write them."""

from __future__ import annotations

GIB = 1 << 30


def gib(size: float | None, digits: int = 1) -> str:
    """``48.0 GiB`` (``digits`` decimals); ``unknown`` for None."""
    return "unknown" if size is None else f"{size / GIB:.{digits}f} GiB"
