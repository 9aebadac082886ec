"""The hardware inventory: plain dataclasses, JSON-ready through :func:`to_json`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from typing import Any

from exo_nixos.basetypes import Accelerator


class GpuVendor(StrEnum):
    NVIDIA = "nvidia"
    AMD = "amd"
    INTEL = "intel"
    OTHER = "other"


class GpuKind(StrEnum):
    DISCRETE = "discrete"
    INTEGRATED = "integrated"
    DISPLAY = "display"  # display-only controller (BMC VGA, emulated VGA): never an accelerator


VENDOR_ACCELERATOR: dict[GpuVendor, Accelerator] = {
    GpuVendor.NVIDIA: Accelerator.CUDA,
    GpuVendor.AMD: Accelerator.ROCM,
}


@dataclass
class Gpu:
    """One PCI display-class device and what is known about it."""

    address: str  # PCI address as sysfs spells it, 0000:1b:00.0
    vendor: GpuVendor
    vendor_id: str  # four hex digits
    device_id: str
    pci_class: str  # six hex digits, 030000 VGA, 030200 3D, 038000 display
    name: str
    kind: GpuKind
    driver: str | None = None
    subsystem: str | None = None  # vendor:device of the board maker
    boot_vga: bool = False
    numa_node: int | None = None
    drm: list[str] = field(default_factory=list)  # card0, renderD128
    device_nodes: list[str] = field(default_factory=list)  # present /dev nodes it needs
    missing_nodes: list[str] = field(default_factory=list)  # needed /dev nodes not present
    memory_bytes: int | None = None
    memory_source: str | None = None  # nvml, kfd, sysfs, "pci id" (nominal) or unified
    compute_capability: str | None = None  # CUDA, e.g. 9.0
    gfx_target: str | None = None  # ROCm, e.g. gfx90a
    uuid: str | None = None
    index: int | None = None  # NVML / nvidia-smi index; PCI bus order
    minor: int | None = None  # NVIDIA device minor: /dev/nvidia<minor>
    responding: bool | None = None  # None: not asked (no NVML)
    mig: bool | None = None  # NVIDIA MIG mode on (CUDA then sees MIG instances, not the GPU)
    problems: list[str] = field(default_factory=list)  # why it cannot run EXO's backend

    @property
    def accelerator(self) -> Accelerator | None:
        if self.kind is GpuKind.DISPLAY:
            return None
        return VENDOR_ACCELERATOR.get(self.vendor)

    @property
    def usable(self) -> bool:
        """A device its accelerator's runtime can use here (driver, nodes, answering)."""
        return self.kind is not GpuKind.DISPLAY and not self.problems

    @property
    def label(self) -> str:
        return f"{self.name} at {self.address}"


@dataclass
class NumaNode:
    id: int
    cpus: str  # cpulist as the kernel prints it, 0-55,112-167
    memory_bytes: int | None


@dataclass
class Cpu:
    architecture: str  # x86_64, aarch64 or what the platform says
    model: str
    sockets: int
    cores: int
    threads: int
    flags: list[str]  # only the ones that matter for inference
    numa_nodes: list[NumaNode] = field(default_factory=list)


@dataclass
class Disk:
    requested: str  # the models dir asked about
    measured: str  # the existing directory statvfs was called on
    free_bytes: int
    total_bytes: int


@dataclass
class Memory:
    total_bytes: int | None  # physical, MemTotal
    available_bytes: int | None  # MemAvailable
    cgroup: str | None  # the calling process's cgroup v2 path
    cgroup_limit_bytes: int | None  # lowest memory.max on the way up; None: unlimited

    @property
    def usable_bytes(self) -> int | None:
        """Physical memory, capped by the cgroup limit."""
        values = [v for v in (self.total_bytes, self.cgroup_limit_bytes) if v is not None]
        return min(values) if values else None


@dataclass
class AppleSilicon:
    model: str  # Mac Studio (M2 Max, 2023) or the chip name
    os: str  # "macos" or "linux" (Asahi)

    @property
    def metal(self) -> bool:
        """MLX's GPU backend needs Metal, which only macOS has."""
        return self.os == "macos"


@dataclass
class Inventory:
    root: str
    system: str  # Linux, Darwin
    cpu: Cpu
    memory: Memory
    gpus: list[Gpu] = field(default_factory=list)
    apple: AppleSilicon | None = None
    disk: Disk | None = None
    nvml: str = "not needed"  # what happened with NVML, one line
    nvidia_driver: str | None = None  # the loaded nvidia kernel module's version, else NVML's
    warnings: list[str] = field(default_factory=list)

    def gpus_for(self, accelerator: Accelerator) -> list[Gpu]:
        return [g for g in self.gpus if g.accelerator is accelerator]


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def to_json(inventory: Inventory) -> dict[str, Any]:
    """The inventory as JSON-ready data, with each GPU's derived fields added."""
    data: dict[str, Any] = _plain(dataclasses.asdict(inventory))
    for gpu, entry in zip(inventory.gpus, data["gpus"], strict=True):
        entry["accelerator"] = gpu.accelerator.value if gpu.accelerator else None
        entry["usable"] = gpu.usable
    data["memory"]["usable_bytes"] = inventory.memory.usable_bytes
    return data
