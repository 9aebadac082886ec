"""Config value types and the config's path, needing nothing beyond the standard library.

They live apart from :mod:`exo_nixos.config` (pydantic) so that commands on the start path,
such as ``exo-nixos detect``, can use them without importing pydantic.
"""

from __future__ import annotations

import re
from enum import StrEnum
from pathlib import Path

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


_SIZE = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*(?P<unit>[KMGT]?)(?:i?B)?$", re.IGNORECASE)
_PERCENT = re.compile(r"^(?P<num>\d+(?:\.\d+)?)\s*%$")
_UNIT_SHIFT = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40}


class MemoryLimit:
    """A memory limit as written in the config: a share of RAM ("80%") or a size ("48G")."""

    def __init__(self, percent: float | None, size_bytes: int | None) -> None:
        self.percent = percent
        self.size_bytes = size_bytes

    @classmethod
    def parse(cls, text: str) -> MemoryLimit:
        text = text.strip()
        if match := _PERCENT.match(text):
            percent = float(match["num"])
            if not 0 < percent <= 100:
                raise ValueError("a percentage must be above 0% and at most 100%")
            return cls(percent, None)
        if match := _SIZE.match(text):
            size = int(float(match["num"]) * (1 << _UNIT_SHIFT[match["unit"].upper()]))
            if size <= 0:
                raise ValueError("a size must be above zero")
            return cls(None, size)
        raise ValueError(
            "must be a percentage of physical memory such as '80%' or a size such as "
            "'48G', '512M' or '64GiB' (binary units K, M, G, T)"
        )

    def resolve(self, total_bytes: int) -> int:
        """The limit in bytes on a machine with ``total_bytes`` of memory."""
        if self.percent is not None:
            return int(total_bytes * self.percent / 100)
        assert self.size_bytes is not None
        return self.size_bytes
