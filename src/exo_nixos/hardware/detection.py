"""``detect()``: the whole inventory of one machine, or of a captured tree under a root."""

from __future__ import annotations

import os
import re
from pathlib import Path

from exo_nixos.hardware import amd, cpu, memory, nvml, pci
from exo_nixos.hardware.model import Inventory, Memory
from exo_nixos.hardware.tree import Tree

DEFAULT_MODELS_DIR = "/var/lib/exo/models"
RECORDED_NVML = "nvml.json"  # NVML answers captured next to a tree (scripts/capture-hw-tree)
NVIDIA_MODULE_VERSION = "/sys/module/nvidia/version"
VERSION = re.compile(r"\d+(\.\d+)+")


def host_system() -> str:
    return os.uname().sysname


def detect(
    root: Path = Path("/"),
    use_nvml: bool = True,
    *,
    models_dir: str = DEFAULT_MODELS_DIR,
    nvml_loader: nvml.NvmlLoader | None = None,
) -> Inventory:
    """Detect GPUs, Apple Silicon, CPU, memory and disk; never raises for what it reads.

    NVML is asked only when an NVIDIA GPU is bound to the nvidia driver and ``use_nvml`` is
    set: on the live root through pynvml (or ``nvml_loader``), on a captured tree through the
    ``nvml.json`` recorded beside it, if any.
    """
    tree = Tree(root)
    if tree.is_live and host_system() == "Darwin":
        return _detect_macos(tree, models_dir)
    if not tree.is_live and not (tree.exists("/sys") or tree.exists("/proc")):
        tree.warn(
            f"{root} holds neither sys/ nor proc/: it does not look like a captured tree "
            "(scripts/capture-hw-tree or exo-nixos net --capture make one)"
        )
    cpu_info = cpu.read_cpu(tree)
    gpus = pci.scan(tree)
    amd.annotate(tree, gpus)
    inventory = Inventory(
        root=str(root),
        system="Linux",
        cpu=cpu_info,
        memory=memory.read_memory(tree),
        gpus=gpus,
        apple=cpu.apple_on_linux(tree, cpu_info),
        disk=memory.read_disk(tree, models_dir),
    )
    nvidia_bound = [g for g in gpus if g.driver == pci.NVIDIA_DRIVER]
    nvml_warnings: list[str] = []
    if not nvidia_bound:
        inventory.nvml = "not needed (no GPU bound to the nvidia driver)"
    else:
        inventory.nvidia_driver = _module_version(tree)
        if not use_nvml:
            inventory.nvml = "not asked (disabled)"
        elif (loader := nvml_loader or _default_loader(tree)) is None:
            inventory.nvml = "not asked (captured tree without nvml.json)"
        else:
            report = _query(loader, inventory.nvidia_driver)
            inventory.nvml = report.status
            if inventory.nvidia_driver is None and VERSION.fullmatch(report.driver or ""):
                inventory.nvidia_driver = report.driver
            nvml_warnings = nvml.annotate(gpus, report)
    for gpu in gpus:
        if gpu.memory_source == "unified":  # the GPU's memory is the system's
            gpu.memory_bytes = inventory.memory.total_bytes
    inventory.warnings = tree.warnings + nvml_warnings
    return inventory


def _module_version(tree: Tree) -> str | None:
    version = tree.line(NVIDIA_MODULE_VERSION)
    if version is None or VERSION.fullmatch(version):
        return version
    tree.warn(f"{tree.shown(NVIDIA_MODULE_VERSION)}: {version[:40]!r} is not a version; ignored")
    return None


def _default_loader(tree: Tree) -> nvml.NvmlLoader | None:
    if tree.is_live:
        return nvml.load_pynvml
    recorded = tree.path(RECORDED_NVML)
    if recorded.is_file():
        return lambda: nvml.RecordedNvml.from_file(recorded)
    return None


def _query(loader: nvml.NvmlLoader, module_version: str | None) -> nvml.NvmlReport:
    try:
        library = loader()
    except Exception as exc:  # ImportError, a garbled recording: report, never crash
        reason = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else repr(exc)
        return nvml.NvmlReport(
            f"unavailable: {reason}",
            [],
            [f"NVML could not be loaded ({reason}): NVIDIA GPUs were not verified"],
        )
    return nvml.query(library, module_version)


def _detect_macos(tree: Tree, models_dir: str) -> Inventory:
    cpu_info, apple, physical = cpu.macos_cpu_and_apple()
    return Inventory(
        root=str(tree.root),
        system="Darwin",
        cpu=cpu_info,
        memory=Memory(physical, None, None, None),
        apple=apple,
        disk=memory.read_disk(tree, models_dir),
        nvml="not needed (macOS)",
        warnings=tree.warnings,
    )
