"""CPU model, cores, inference-relevant flags and NUMA nodes; Apple Silicon under Linux."""

from __future__ import annotations

import os
import re

from exo_nixos.hardware.model import AppleSilicon, Cpu, NumaNode
from exo_nixos.hardware.tree import Tree, key_values

X86_FLAGS = ("avx", "avx2", "fma", "f16c", "avx_vnni", "avx_vnni_int8")
X86_PREFIXES = ("avx512", "amx_")
ARM_FLAGS = (
    "asimd",
    "asimdhp",
    "asimddp",
    "asimdfhm",
    "fphp",
    "i8mm",
    "bf16",
    "sve",
    "sve2",
    "svebf16",
    "svei8mm",
    "sme",
    "sme2",
)

# /proc/cpuinfo on arm64 names no model: implementer and part ids, as the kernel's cputype.h.
ARM_PARTS: dict[tuple[int, int], str] = {
    (0x41, 0xD0C): "Arm Neoverse-N1",
    (0x41, 0xD40): "Arm Neoverse-V1",
    (0x41, 0xD49): "Arm Neoverse-N2",
    (0x41, 0xD4F): "Arm Neoverse-V2",
    (0x41, 0xD8E): "Arm Neoverse-N3",
    (0x41, 0xD85): "Arm Cortex-X925",
    (0x41, 0xD87): "Arm Cortex-A725",
    (0x61, 0x022): "Apple M1 Icestorm",
    (0x61, 0x023): "Apple M1 Firestorm",
    (0x61, 0x024): "Apple M1 Pro Icestorm",
    (0x61, 0x025): "Apple M1 Pro Firestorm",
    (0x61, 0x028): "Apple M1 Max Icestorm",
    (0x61, 0x029): "Apple M1 Max Firestorm",
    (0x61, 0x032): "Apple M2 Blizzard",
    (0x61, 0x033): "Apple M2 Avalanche",
    (0x61, 0x034): "Apple M2 Pro Blizzard",
    (0x61, 0x035): "Apple M2 Pro Avalanche",
    (0x61, 0x038): "Apple M2 Max Blizzard",
    (0x61, 0x039): "Apple M2 Max Avalanche",
    (0xC0, 0xAC3): "Ampere-1",
}
_NODE_MEMORY = re.compile(r"MemTotal:\s*(\d+)\s*kB")


def _blocks(text: str) -> list[dict[str, str]]:
    return [key_values(block, ":") for block in re.split(r"\n\s*\n", text) if block.strip()]


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0)
    except ValueError:
        return None


def _arm_model(processors: list[dict[str, str]]) -> str:
    names: list[str] = []
    for proc in processors:
        implementer = _int(proc.get("CPU implementer"))
        part = _int(proc.get("CPU part"))
        if implementer is None or part is None:
            continue
        name = ARM_PARTS.get(
            (implementer, part), f"Arm implementer {implementer:#x} part {part:#x}"
        )
        if name not in names:
            names.append(name)
    return " + ".join(names) or "unknown arm64 CPU"


def read_cpu(tree: Tree) -> Cpu:
    text = tree.text("/proc/cpuinfo", expected=True) or ""
    blocks = _blocks(text)
    processors = [b for b in blocks if "processor" in b]
    threads = len(processors)
    first = processors[0] if processors else {}
    if "flags" in first:
        architecture = "x86_64"
        present = set(first["flags"].split())
        flags = [f for f in X86_FLAGS if f in present]
        flags += sorted(f for f in present if f.startswith(X86_PREFIXES))
        model = first.get("model name", "unknown x86_64 CPU")
    elif "Features" in first:
        architecture = "aarch64"
        present = set(first["Features"].split())
        flags = [f for f in ARM_FLAGS if f in present]
        model = _arm_model(processors)
    else:
        architecture = os.uname().machine if tree.is_live else "unknown"
        flags = []
        model = "unknown CPU"
        if text:
            tree.warn(f"{tree.shown('/proc/cpuinfo')}: no processor entries recognised")
    cores_seen = {(p.get("physical id"), p.get("core id")) for p in processors}
    sockets = len({p.get("physical id") for p in processors if "physical id" in p}) or 1
    cores = len(cores_seen) if all(k != (None, None) for k in cores_seen) else threads
    if threads == 0:
        threads = cores = (os.cpu_count() or 0) if tree.is_live else 0
    return Cpu(
        architecture=architecture,
        model=model,
        sockets=sockets,
        cores=cores,
        threads=threads,
        flags=flags,
        numa_nodes=read_numa(tree),
    )


def read_numa(tree: Tree) -> list[NumaNode]:
    nodes: list[NumaNode] = []
    base = "/sys/devices/system/node"
    for entry in tree.listdir(base):
        if not (entry.startswith("node") and entry[4:].isdigit()):
            continue
        cpus = tree.line(f"{base}/{entry}/cpulist") or ""
        meminfo = tree.text(f"{base}/{entry}/meminfo") or ""
        match = _NODE_MEMORY.search(meminfo)
        memory = int(match[1]) * 1024 if match else None
        nodes.append(NumaNode(int(entry[4:]), cpus, memory))
    return sorted(nodes, key=lambda n: n.id)


def _device_tree_strings(tree: Tree, name: str) -> list[str]:
    for base in ("/sys/firmware/devicetree/base", "/proc/device-tree"):
        text = tree.text(f"{base}/{name}")
        if text is not None:
            return [s for s in text.split("\0") if s]
    return []


def apple_on_linux(tree: Tree, cpu: Cpu) -> AppleSilicon | None:
    """Apple Silicon running Linux (Asahi): device tree says apple, or Apple CPU cores."""
    compatible = _device_tree_strings(tree, "compatible")
    apple_dt = any(c.startswith("apple,") for c in compatible)
    apple_cpu = cpu.model.startswith("Apple ")
    if not (apple_dt or apple_cpu):
        return None
    model = " ".join(_device_tree_strings(tree, "model")) or cpu.model
    return AppleSilicon(model=model, os="linux")


def macos_cpu_and_apple() -> tuple[Cpu, AppleSilicon | None, int | None]:
    """CPU, Apple Silicon and physical memory on macOS, from sysctl."""
    import subprocess

    values: dict[str, str] = {}
    keys = ["machdep.cpu.brand_string", "hw.physicalcpu", "hw.logicalcpu", "hw.memsize"]
    try:
        out = subprocess.run(
            ["/usr/sbin/sysctl", *keys], capture_output=True, text=True, timeout=5, check=False
        ).stdout
        values = key_values(out, ":")
    except (OSError, subprocess.SubprocessError):
        values = {}
    machine = os.uname().machine
    model = values.get("machdep.cpu.brand_string") or machine
    threads = _int(values.get("hw.logicalcpu")) or os.cpu_count() or 0
    cores = _int(values.get("hw.physicalcpu")) or threads
    cpu = Cpu(
        architecture=machine,
        model=model,
        sockets=1,
        cores=cores,
        threads=threads,
        flags=["asimd"] if machine == "arm64" else [],
    )
    apple = AppleSilicon(model=model, os="macos") if machine == "arm64" else None
    return cpu, apple, _int(values.get("hw.memsize"))
