"""GPUs and display controllers from PCI sysfs, NVIDIA's /proc entries and /dev nodes."""

from __future__ import annotations

from dataclasses import dataclass

from exo_nixos.hardware.model import Gpu, GpuKind, GpuVendor
from exo_nixos.hardware.tree import Tree, key_values
from exo_nixos.units import GIB

PCI_DEVICES = "/sys/bus/pci/devices"
DISPLAY_CLASS = 0x03

VENDORS = {"10de": GpuVendor.NVIDIA, "1002": GpuVendor.AMD, "8086": GpuVendor.INTEL}
VENDOR_NAMES = {
    "10de": "NVIDIA",
    "1002": "AMD",
    "8086": "Intel",
    "1a03": "ASPEED",
    "102b": "Matrox",
    "1234": "QEMU",
    "1af4": "virtio",
    "1b36": "QEMU",
    "15ad": "VMware",
    "1414": "Microsoft",
    "1013": "Cirrus Logic",
    "19a2": "Emulex",
}


@dataclass(frozen=True)
class KnownDevice:
    name: str
    kind: GpuKind = GpuKind.DISCRETE
    memory_gib: int | None = None  # nominal, when every board with this id has the same
    compute: str | None = None  # CUDA compute capability or ROCm gfx target
    unified: bool = False  # no memory of its own: it uses the system's


# A few well-known ids for readable names without NVML or pci.ids; unknown ids still work.
KNOWN: dict[str, KnownDevice] = {
    # NVIDIA datacenter
    "10de:2330": KnownDevice("NVIDIA H100 80GB HBM3", memory_gib=80, compute="9.0"),
    "10de:2331": KnownDevice("NVIDIA H100 PCIe", memory_gib=80, compute="9.0"),
    "10de:2335": KnownDevice("NVIDIA H200", memory_gib=141, compute="9.0"),
    "10de:20b0": KnownDevice("NVIDIA A100-SXM4-40GB", memory_gib=40, compute="8.0"),
    "10de:20b2": KnownDevice("NVIDIA A100-SXM4-80GB", memory_gib=80, compute="8.0"),
    "10de:20b5": KnownDevice("NVIDIA A100 80GB PCIe", memory_gib=80, compute="8.0"),
    "10de:26b9": KnownDevice("NVIDIA L40S", memory_gib=48, compute="8.9"),
    "10de:27b8": KnownDevice("NVIDIA L4", memory_gib=24, compute="8.9"),
    "10de:1eb8": KnownDevice("Tesla T4", memory_gib=16, compute="7.5"),
    # NVIDIA Grace Blackwell SoC (DGX Spark): shares the system's memory
    "10de:2e12": KnownDevice("NVIDIA GB10", GpuKind.INTEGRATED, compute="12.1", unified=True),
    # NVIDIA consumer
    "10de:2684": KnownDevice("NVIDIA GeForce RTX 4090", memory_gib=24, compute="8.9"),
    "10de:2204": KnownDevice("NVIDIA GeForce RTX 3090", memory_gib=24, compute="8.6"),
    "10de:2b85": KnownDevice("NVIDIA GeForce RTX 5090", memory_gib=32, compute="12.0"),
    # AMD Instinct (one PCI function per GCD on MI250/MI250X)
    "1002:738c": KnownDevice("AMD Instinct MI100", memory_gib=32, compute="gfx908"),
    "1002:7408": KnownDevice("AMD Instinct MI250X", memory_gib=64, compute="gfx90a"),
    "1002:740c": KnownDevice("AMD Instinct MI250X/MI250", memory_gib=64, compute="gfx90a"),
    "1002:740f": KnownDevice("AMD Instinct MI210", memory_gib=64, compute="gfx90a"),
    "1002:74a1": KnownDevice("AMD Instinct MI300X", memory_gib=192, compute="gfx942"),
    # AMD Radeon
    "1002:744c": KnownDevice("AMD Radeon RX 7900 XT/XTX (Navi 31)", compute="gfx1100"),
    "1002:73bf": KnownDevice("AMD Radeon RX 6800/6900 (Navi 21)", memory_gib=16, compute="gfx1030"),
    "1002:164e": KnownDevice("AMD Radeon Graphics (Raphael)", GpuKind.INTEGRATED, None, "gfx1036"),
    # Intel
    "8086:56a0": KnownDevice("Intel Arc A770"),
    "8086:56a1": KnownDevice("Intel Arc A750", memory_gib=8),
    "8086:e20b": KnownDevice("Intel Arc B580", memory_gib=12),
    "8086:a780": KnownDevice("Intel UHD Graphics 770 (Raptor Lake-S)", GpuKind.INTEGRATED),
    "8086:4680": KnownDevice("Intel UHD Graphics 770 (Alder Lake-S)", GpuKind.INTEGRATED),
    # Display-only controllers
    "1a03:2000": KnownDevice("ASPEED AST2400/AST2500/AST2600 BMC graphics", GpuKind.DISPLAY),
    "102b:0522": KnownDevice("Matrox G200e (BMC)", GpuKind.DISPLAY),
    "102b:0534": KnownDevice("Matrox G200eR2 (BMC)", GpuKind.DISPLAY),
    "102b:0536": KnownDevice("Matrox G200eW3 (BMC)", GpuKind.DISPLAY),
    "1234:1111": KnownDevice("QEMU standard VGA", GpuKind.DISPLAY),
    "1af4:1050": KnownDevice("virtio GPU", GpuKind.DISPLAY),
    "1414:5353": KnownDevice("Hyper-V video", GpuKind.DISPLAY),
    "15ad:0405": KnownDevice("VMware SVGA II", GpuKind.DISPLAY),
    "1013:00b8": KnownDevice("Cirrus Logic GD 5446 (emulated)", GpuKind.DISPLAY),
}

NVIDIA_DRIVER = "nvidia"
AMD_DRIVER = "amdgpu"
INTEL_DRIVERS = ("i915", "xe")
PASSTHROUGH_DRIVERS = ("vfio-pci", "pci-stub")


def _bus(address: str) -> int | None:
    try:
        return int(address.split(":")[-2], 16)
    except (IndexError, ValueError):
        return None


def _kind(vendor: GpuVendor, known: KnownDevice | None, address: str) -> GpuKind:
    if vendor is GpuVendor.OTHER:
        return GpuKind.DISPLAY
    if known is not None:
        return known.kind
    if vendor is GpuVendor.INTEL and _bus(address) == 0:
        return GpuKind.INTEGRATED  # Intel's integrated graphics sit on the root bus (00:02.0)
    return GpuKind.DISCRETE


def _nvidia_proc(tree: Tree, gpu: Gpu) -> int | None:
    """Name, UUID and device minor from the nvidia driver's /proc entry; the minor or None."""
    text = tree.text(f"/proc/driver/nvidia/gpus/{gpu.address}/information")
    if text is None:
        return None
    info = key_values(text, ":")
    if model := info.get("Model"):
        gpu.name = model
    uuid = info.get("GPU UUID", "")
    if uuid.startswith("GPU-"):
        gpu.uuid = uuid
    minor = info.get("Device Minor")
    if minor is not None:
        if minor.isdigit():
            return int(minor)
        tree.warn(
            f"{tree.shown(f'/proc/driver/nvidia/gpus/{gpu.address}/information')}: "
            f"Device Minor {minor[:20]!r} is not a number; ignored"
        )
    return None


def _nodes(tree: Tree, gpu: Gpu, wanted: list[str]) -> None:
    for node in wanted:
        (gpu.device_nodes if tree.exists(node) else gpu.missing_nodes).append(node)


def _nvidia_checks(tree: Tree, gpu: Gpu) -> None:
    if gpu.driver != NVIDIA_DRIVER:
        return
    minor = gpu.minor = _nvidia_proc(tree, gpu)
    wanted = ["/dev/nvidiactl", "/dev/nvidia-uvm"]
    if minor is not None:
        wanted.append(f"/dev/nvidia{minor}")
    _nodes(tree, gpu, wanted)
    if minor is None and not any(
        n.removeprefix("nvidia").isdigit() for n in tree.listdir("/dev", prefix="nvidia")
    ):
        gpu.missing_nodes.append("/dev/nvidia<N>")
    for node in gpu.missing_nodes:
        hint = " (the nvidia_uvm module is not loaded)" if node == "/dev/nvidia-uvm" else ""
        gpu.problems.append(f"{node} is missing{hint}")


def _driver_problem(gpu: Gpu) -> str | None:
    if gpu.driver is None:
        return "no kernel driver is bound"
    if gpu.driver in PASSTHROUGH_DRIVERS:
        return f"bound to {gpu.driver} (reserved for a virtual machine)"
    if gpu.vendor is GpuVendor.NVIDIA and gpu.driver != NVIDIA_DRIVER:
        return f"bound to {gpu.driver}; CUDA needs NVIDIA's driver (hardware.nvidia)"
    if gpu.vendor is GpuVendor.AMD and gpu.driver != AMD_DRIVER:
        return f"bound to {gpu.driver}; ROCm needs amdgpu"
    if gpu.vendor is GpuVendor.INTEL and gpu.driver not in INTEL_DRIVERS:
        return f"bound to {gpu.driver}; Intel compute needs i915 or xe"
    return None


def scan(tree: Tree) -> list[Gpu]:
    """Every display-class PCI device, in PCI address order."""
    gpus: list[Gpu] = []
    if not tree.exists(PCI_DEVICES):
        if tree.exists("/sys"):
            tree.warn(f"{tree.shown(PCI_DEVICES)}: missing; no PCI GPU can be detected")
        return gpus
    for address in tree.listdir(PCI_DEVICES):
        base = f"{PCI_DEVICES}/{address}"
        pci_class = tree.hex_id(f"{base}/class", 6)
        if pci_class is None or int(pci_class, 16) >> 16 != DISPLAY_CLASS:
            continue
        vendor_id = tree.hex_id(f"{base}/vendor")
        device_id = tree.hex_id(f"{base}/device")
        if vendor_id is None or device_id is None:
            continue
        vendor = VENDORS.get(vendor_id, GpuVendor.OTHER)
        known = KNOWN.get(f"{vendor_id}:{device_id}")
        maker = VENDOR_NAMES.get(vendor_id, f"PCI vendor {vendor_id}")
        gpu = Gpu(
            address=address,
            vendor=vendor,
            vendor_id=vendor_id,
            device_id=device_id,
            pci_class=pci_class,
            name=known.name if known else f"{maker} device {vendor_id}:{device_id}",
            kind=_kind(vendor, known, address),
            driver=tree.link_name(f"{base}/driver"),
        )
        sub_vendor = tree.hex_id(f"{base}/subsystem_vendor", expected=False)
        sub_device = tree.hex_id(f"{base}/subsystem_device", expected=False)
        if sub_vendor and sub_device:
            gpu.subsystem = f"{sub_vendor}:{sub_device}"
        gpu.boot_vga = tree.line(f"{base}/boot_vga") == "1"
        numa = tree.integer(f"{base}/numa_node")
        gpu.numa_node = numa if numa is not None and numa >= 0 else None
        gpu.drm = [n for n in tree.listdir(f"{base}/drm") if n.startswith(("card", "renderD"))]
        if known and known.memory_gib:
            gpu.memory_bytes = known.memory_gib * GIB
            gpu.memory_source = "pci id"
        elif known and known.unified:
            gpu.memory_source = "unified"  # detection fills in the system's memory
        if known and known.compute:
            if vendor is GpuVendor.NVIDIA:
                gpu.compute_capability = known.compute
            else:
                gpu.gfx_target = known.compute
        if gpu.kind is not GpuKind.DISPLAY:
            if problem := _driver_problem(gpu):
                gpu.problems.append(problem)
            if vendor is GpuVendor.NVIDIA:
                _nvidia_checks(tree, gpu)
            elif gpu.driver is not None:
                _nodes(tree, gpu, [f"/dev/dri/{n}" for n in gpu.drm])
                gpu.problems.extend(f"{node} is missing" for node in gpu.missing_nodes)
        gpus.append(gpu)
    _index_nvidia(gpus)
    return gpus


def _index_nvidia(gpus: list[Gpu]) -> None:
    """nvidia-smi's (and CUDA_DEVICE_ORDER=PCI_BUS_ID's) index: PCI order of nvidia-bound GPUs."""
    bound = [g for g in gpus if g.vendor is GpuVendor.NVIDIA and g.driver == NVIDIA_DRIVER]
    for index, gpu in enumerate(bound):
        gpu.index = index


def normalize_address(address: str) -> str:
    """``00000000:1B:00.0`` (NVML) and ``0000:1b:00.0`` (sysfs) as the same string."""
    text = address.strip().lower()
    try:
        domain, bus, rest = text.split(":")
        return f"{int(domain, 16):04x}:{bus}:{rest}"
    except ValueError:
        return text
