"""Config value types and the config's path, needing nothing beyond the standard library.

They live apart from :mod:`exo_nixos.config` (pydantic) so that commands on the start path,
such as ``exo-nixos detect``, can use them without importing pydantic.
"""

from __future__ import annotations

import functools
import json
import re
from enum import StrEnum
from pathlib import Path
from typing import Any

DEFAULT_CONFIG_PATH = Path("/etc/exo/config.json")
"""Where the NixOS module writes the config document."""

# upstream EXO's default ports
EXO_API_PORT = 52415
EXO_ZENOH_PORT = 52414
EXO_DISCOVERY_PORT = 52413


class Accelerator(StrEnum):
    CUDA = "cuda"
    ROCM = "rocm"
    MLX = "mlx"
    CPU = "cpu"


PATTERNS: dict[str, dict[str, Any]] = json.loads(
    Path(__file__).with_name("patterns.json").read_text(encoding="utf-8")
)


@functools.cache
def _pattern(kind: str) -> re.Pattern[str]:
    return re.compile(PATTERNS[kind]["pattern"])


def check(kind: str, value: str) -> str:
    """``value`` if it has the syntax ``kind`` of patterns.json (which the NixOS option types
    read too), else ValueError saying what it must be."""
    spec = PATTERNS[kind]
    too_long = len(value.encode()) > spec.get("maxLength", len(value.encode()))
    if "\0" in value or too_long or not _pattern(kind).fullmatch(value):
        raise ValueError(f"must be {spec['description']}")
    if value in spec.get("reserved", ()):
        raise ValueError(f"must be {spec['description']}")
    return value


_UNIT_SHIFT = {"K": 10, "M": 20, "G": 30, "T": 40}


class MemoryLimit:
    """A memory limit as written in the config: a share of RAM ("80%") or a size ("48G")."""

    def __init__(self, percent: float | None, size_bytes: int | None) -> None:
        self.percent = percent
        self.size_bytes = size_bytes

    @classmethod
    def parse(cls, text: str) -> MemoryLimit:
        match = _pattern("memoryLimit").fullmatch(check("memoryLimit", text))
        assert match is not None
        number = float(match[1])
        if match[3] == "%":
            if not 0 < number <= 100:
                raise ValueError("a percentage must be above 0% and at most 100%")
            return cls(number, None)
        size = int(number * (1 << _UNIT_SHIFT[match[4].upper()]))
        if size <= 0:
            raise ValueError("a size must be above zero")
        return cls(None, size)

    def resolve(self, total_bytes: int) -> int:
        """The limit in bytes on a machine with ``total_bytes`` of memory."""
        if self.percent is not None:
            return int(total_bytes * self.percent / 100)
        assert self.size_bytes is not None
        return self.size_bytes
