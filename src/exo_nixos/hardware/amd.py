"""AMD GPUs as ROCm sees them: the KFD topology (gfx target, VRAM) and /dev/kfd."""

from __future__ import annotations

from exo_nixos.hardware.model import Gpu, GpuKind, GpuVendor
from exo_nixos.hardware.tree import Tree, key_values

KFD_NODES = "/sys/class/kfd/kfd/topology/nodes"
KFD_DEVICE = "/dev/kfd"
HEAP_FRAME_BUFFER = {"1", "2"}  # HSA_HEAPTYPE_FRAME_BUFFER_PUBLIC / _PRIVATE


def gfx_name(version: int) -> str | None:
    """KFD's gfx_target_version (major*10000 + minor*100 + stepping) as ROCm's ``gfx90a``."""
    if version <= 0:
        return None
    major, rest = divmod(version, 10000)
    minor, stepping = divmod(rest, 100)
    if minor > 15 or stepping > 15:
        return None
    return f"gfx{major}{minor:x}{stepping:x}"


def _address(props: dict[str, str]) -> str | None:
    """The PCI address of a KFD node: location_id is bus << 8 | device << 3 | function."""
    try:
        location = int(props["location_id"])
        domain = int(props.get("domain", "0"))
    except (KeyError, ValueError):
        return None
    bus, devfn = divmod(location, 256)
    return f"{domain:04x}:{bus:02x}:{devfn >> 3:02x}.{devfn & 7}"


def _vram(tree: Tree, node: str) -> int | None:
    total = 0
    for bank in tree.listdir(f"{KFD_NODES}/{node}/mem_banks"):
        text = tree.text(f"{KFD_NODES}/{node}/mem_banks/{bank}/properties")
        if text is None:
            continue
        props = key_values(text)
        if props.get("heap_type") in HEAP_FRAME_BUFFER:
            size = props.get("size_in_bytes", "")
            if size.isdigit():
                total += int(size)
            else:
                shown = tree.shown(f"{KFD_NODES}/{node}/mem_banks/{bank}/properties")
                tree.warn(f"{shown}: size_in_bytes {size[:20]!r} is not a number; ignored")
    return total or None


def annotate(tree: Tree, gpus: list[Gpu]) -> None:
    """Add gfx target and VRAM from KFD to amdgpu-bound GPUs; note a missing /dev/kfd."""
    amd = {g.address: g for g in gpus if g.vendor is GpuVendor.AMD and g.driver == "amdgpu"}
    if not amd:
        return
    for node in tree.listdir(KFD_NODES):
        text = tree.text(f"{KFD_NODES}/{node}/properties")
        if text is None:
            continue
        props = key_values(text)
        raw = props.get("gfx_target_version", "0")
        if not raw.isdigit():
            shown = tree.shown(f"{KFD_NODES}/{node}/properties")
            tree.warn(f"{shown}: gfx_target_version {raw[:20]!r} is not a number; ignored")
            continue
        address = _address(props)
        gpu = amd.get(address) if address else None
        if gpu is None or int(raw) == 0:
            continue  # a CPU node, or a GPU without a PCI device we saw
        gpu.gfx_target = gfx_name(int(raw)) or gpu.gfx_target
        if (vram := _vram(tree, node)) is not None:
            gpu.memory_bytes = vram
            gpu.memory_source = "kfd"
    for gpu in amd.values():
        if gpu.memory_source != "kfd":
            vram = tree.integer(f"/sys/bus/pci/devices/{gpu.address}/mem_info_vram_total")
            if vram:
                gpu.memory_bytes = vram
                gpu.memory_source = "sysfs"
        if gpu.kind is GpuKind.DISPLAY:
            continue
        if tree.exists(KFD_DEVICE):
            gpu.device_nodes.append(KFD_DEVICE)
        else:
            gpu.missing_nodes.append(KFD_DEVICE)
            gpu.problems.append(f"{KFD_DEVICE} is missing (amdgpu's compute interface, KFD)")
        if not any(n.startswith("renderD") for n in gpu.drm):
            gpu.problems.append("no DRM render node (renderD*)")
