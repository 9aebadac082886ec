"""Hardware detection and the accelerator decision.

``detect()`` reads the machine (or a captured tree); ``choose()`` / ``decide()`` pick the
accelerator EXO runs on, with reasons. Nothing here imports pydantic or pynvml at import time.
"""

from exo_nixos.hardware.decide import EXO_BACKENDS, Decision, HardwareSettings, choose, decide
from exo_nixos.hardware.detection import detect
from exo_nixos.hardware.model import (
    AppleSilicon,
    Cpu,
    Disk,
    Gpu,
    GpuKind,
    GpuVendor,
    Inventory,
    Memory,
    NumaNode,
    to_json,
)

__all__ = [
    "EXO_BACKENDS",
    "AppleSilicon",
    "Cpu",
    "Decision",
    "Disk",
    "Gpu",
    "GpuKind",
    "GpuVendor",
    "HardwareSettings",
    "Inventory",
    "Memory",
    "NumaNode",
    "choose",
    "decide",
    "detect",
    "to_json",
]
