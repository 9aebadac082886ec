"""Detection on sysfs/proc/dev trees modelled on real machines."""

import json
import os

import pytest

from exo_nixos.basetypes import Accelerator
from exo_nixos.hardware import GpuKind, GpuVendor, detect, to_json
from exo_nixos.hardware import cpu as cpu_module
from exo_nixos.hardware import detection as detect_module
from exo_nixos.hardware.amd import gfx_name
from exo_nixos.hardware.model import AppleSilicon, Cpu
from exo_nixos.hardware.pci import normalize_address
from tests.hardware.conftest import fixture

GiB = 1 << 30


def test_dgx_h100_gpus_from_sysfs_proc_and_recorded_nvml():
    inv = detect(fixture("nvidia-dgx-h100"))
    nvidia = inv.gpus_for(Accelerator.CUDA)
    assert [g.address for g in nvidia] == [
        "0000:1b:00.0",
        "0000:43:00.0",
        "0000:52:00.0",
        "0000:61:00.0",
        "0000:9d:00.0",
        "0000:c3:00.0",
        "0000:d1:00.0",
        "0000:df:00.0",
    ]
    assert all(g.usable and g.responding for g in nvidia)
    first = nvidia[0]
    assert first.name == "NVIDIA H100 80GB HBM3"
    assert first.compute_capability == "9.0"
    assert first.memory_bytes == 85520809984
    assert first.memory_source == "nvml"
    assert first.uuid == "GPU-4c2b7a0e-6f1d-2b93-5e1a-0f3c9d7e81a4"
    assert [g.index for g in nvidia] == list(range(8))
    assert first.subsystem == "10de:16c1"
    assert first.numa_node == 0 and nvidia[-1].numa_node == 1
    assert "/dev/nvidia-uvm" in first.device_nodes and "/dev/nvidia0" in first.device_nodes
    assert inv.nvml.startswith("ok (driver 550.90.07, 8 device(s))")
    assert inv.nvidia_driver == "550.90.07"
    # NVSwitches are nvidia-bound but not display-class: not GPUs
    assert all(g.device_id != "22a3" for g in inv.gpus)
    (bmc,) = [g for g in inv.gpus if g.vendor is GpuVendor.OTHER]
    assert bmc.kind is GpuKind.DISPLAY and bmc.driver == "ast" and bmc.boot_vga
    assert bmc.accelerator is None
    assert inv.warnings == []


def test_dgx_h100_cpu_numa_and_memory():
    inv = detect(fixture("nvidia-dgx-h100"))
    assert inv.cpu.model == "Intel(R) Xeon(R) Platinum 8480C"
    assert (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads) == (2, 112, 224)
    for flag in ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16"):
        assert flag in inv.cpu.flags
    assert "sse2" not in inv.cpu.flags
    assert [(n.id, n.cpus) for n in inv.cpu.numa_nodes] == [
        (0, "0-55,112-167"),
        (1, "56-111,168-223"),
    ]
    assert inv.memory.total_bytes == 2113382472 * 1024
    assert inv.memory.cgroup == "/system.slice/exo-worker.service"
    assert inv.memory.cgroup_limit_bytes is None


def test_without_nvml_memory_is_nominal_and_health_unknown():
    inv = detect(fixture("nvidia-dgx-h100"), use_nvml=False)
    gpu = inv.gpus_for(Accelerator.CUDA)[0]
    assert gpu.responding is None
    assert (gpu.memory_bytes, gpu.memory_source) == (80 * GiB, "pci id")
    assert inv.nvml == "not asked (disabled)"
    assert gpu.usable


def test_consumer_desktop_rtx_4090_with_integrated_intel():
    inv = detect(fixture("nvidia-rtx4090-desktop"))
    igpu, rtx = inv.gpus
    assert (igpu.vendor, igpu.kind, igpu.driver) == (GpuVendor.INTEL, GpuKind.INTEGRATED, "i915")
    assert rtx.name == "NVIDIA GeForce RTX 4090" and rtx.kind is GpuKind.DISCRETE
    assert rtx.drm == ["card1", "renderD129"] and rtx.boot_vga
    assert rtx.uuid == "GPU-7f3a1c2e-94b8-6d05-e2f1-3c8a9b0d4e57"
    assert inv.nvml == "not asked (captured tree without nvml.json)"
    assert (inv.cpu.cores, inv.cpu.threads) == (24, 32)
    assert "avx_vnni" in inv.cpu.flags and not any(f.startswith("avx512") for f in inv.cpu.flags)


def test_amd_instinct_from_kfd_topology():
    inv = detect(fixture("amd-instinct-mi250x"))
    amd = inv.gpus_for(Accelerator.ROCM)
    assert len(amd) == 8
    assert {g.gfx_target for g in amd} == {"gfx90a"}
    assert {(g.memory_bytes, g.memory_source) for g in amd} == {(68702699520, "kfd")}
    assert all("/dev/kfd" in g.device_nodes and g.usable for g in amd)
    assert amd[0].pci_class == "038000"
    assert len(inv.cpu.numa_nodes) == 4
    assert inv.warnings == []


def test_amd_radeon_and_its_integrated_sibling():
    inv = detect(fixture("amd-radeon-7900xtx"))
    radeon, raphael = inv.gpus
    assert (radeon.gfx_target, radeon.memory_bytes, radeon.kind) == (
        "gfx1100",
        25753026560,
        GpuKind.DISCRETE,
    )
    assert (raphael.gfx_target, raphael.kind) == ("gfx1036", GpuKind.INTEGRATED)
    assert "avx512_bf16" in inv.cpu.flags


def test_intel_arc_with_integrated_gpu():
    inv = detect(fixture("intel-arc-a770"))
    kinds = {g.name: g.kind for g in inv.gpus}
    assert kinds == {
        "Intel UHD Graphics 770 (Raptor Lake-S)": GpuKind.INTEGRATED,
        "Intel Arc A770": GpuKind.DISCRETE,
    }
    assert all(g.accelerator is None for g in inv.gpus)


def test_bmc_only_server_has_no_accelerator():
    inv = detect(fixture("bmc-only-server"))
    (matrox,) = inv.gpus
    assert (matrox.vendor_id, matrox.device_id, matrox.kind) == ("102b", "0534", GpuKind.DISPLAY)
    assert not matrox.usable
    assert (inv.cpu.sockets, inv.cpu.cores, inv.cpu.threads) == (2, 64, 128)


def test_vm_cgroup_limit_is_the_lowest_on_the_path():
    inv = detect(fixture("cpu-vm-cgroup"))
    assert inv.memory.cgroup_limit_bytes == 12 * GiB
    assert inv.memory.usable_bytes == 12 * GiB
    assert inv.cpu.model == "AMD EPYC-Milan Processor"
    assert inv.gpus[0].kind is GpuKind.DISPLAY


def test_apple_silicon_under_asahi_linux():
    inv = detect(fixture("apple-m2-max-asahi"))
    assert inv.apple == AppleSilicon(model="Apple Mac Studio (M2 Max, 2023)", os="linux")
    assert not inv.apple.metal
    assert inv.cpu.architecture == "aarch64"
    assert inv.cpu.model == "Apple M2 Max Blizzard + Apple M2 Max Avalanche"
    assert inv.cpu.threads == 12
    assert {"asimd", "asimddp", "i8mm", "bf16"} <= set(inv.cpu.flags)
    assert "sve" not in inv.cpu.flags
    assert inv.gpus == []  # the Wi-Fi card is PCI, but not display-class


def test_apple_silicon_on_macos(monkeypatch, tmp_path):
    cpu = Cpu("arm64", "Apple M2 Ultra", 1, 24, 24, ["asimd"])
    monkeypatch.setattr(detect_module, "host_system", lambda: "Darwin")
    monkeypatch.setattr(
        cpu_module,
        "macos_cpu_and_apple",
        lambda: (cpu, AppleSilicon("Apple M2 Ultra", "macos"), 192 * GiB),
    )
    inv = detect(models_dir=str(tmp_path))
    assert inv.system == "Darwin"
    assert inv.apple is not None and inv.apple.metal
    assert inv.memory.total_bytes == 192 * GiB
    assert inv.disk is not None and inv.disk.measured == str(tmp_path)


def test_live_detection_on_this_machine_does_not_fail():
    inv = detect(use_nvml=False)
    assert inv.cpu.threads >= 1
    assert inv.memory.total_bytes
    json.dumps(to_json(inv))


def test_disk_is_measured_under_root_when_the_models_dir_exists_there(tree_copy):
    root = tree_copy("cpu-vm-cgroup")
    (root / "srv" / "models").mkdir(parents=True)
    inv = detect(root, models_dir="/srv/models")
    assert inv.disk is not None
    assert inv.disk.measured == str(root / "srv" / "models")
    assert inv.disk.requested == "/srv/models"
    assert inv.disk.free_bytes > 0


def test_disk_walks_up_to_an_existing_directory(tmp_path):
    inv = detect(fixture("cpu-vm-cgroup"), models_dir=str(tmp_path / "not" / "yet"))
    assert inv.disk is not None and inv.disk.measured == str(tmp_path)


def test_json_form_is_complete():
    data = to_json(detect(fixture("nvidia-dgx-h100")))
    gpu = data["gpus"][0]
    assert gpu["vendor"] == "nvidia" and gpu["kind"] == "discrete"
    assert gpu["accelerator"] == "cuda" and gpu["usable"] is True
    assert data["memory"]["usable_bytes"] == data["memory"]["total_bytes"]
    assert data["cpu"]["numa_nodes"][0]["cpus"] == "0-55,112-167"


@pytest.mark.parametrize(
    ("version", "name"),
    [(90010, "gfx90a"), (110000, "gfx1100"), (100300, "gfx1030"), (90402, "gfx942"), (0, None)],
)
def test_gfx_names(version, name):
    assert gfx_name(version) == name


def test_nvml_and_sysfs_addresses_compare_equal():
    assert normalize_address("00000000:1B:00.0") == normalize_address("0000:1b:00.0")


def test_fixture_driver_links_are_symlinks():
    link = fixture("nvidia-dgx-h100") / "sys/bus/pci/devices/0000:1b:00.0/driver"
    assert os.path.islink(link)


def test_dgx_spark_gb10_unified_memory_gpu():
    inv = detect(fixture("nvidia-dgx-spark-gb10"))
    assert inv.cpu.architecture == "aarch64"
    assert inv.cpu.model == "Arm Cortex-X925 + Arm Cortex-A725"
    assert inv.cpu.threads == 20 and "sve2" in inv.cpu.flags
    (gb10,) = inv.gpus_for(Accelerator.CUDA)
    assert gb10.address == "000f:01:00.0"  # PCI domain 15: NVML's 0000000F:01:00.0
    assert (gb10.name, gb10.kind, gb10.compute_capability) == (
        "NVIDIA GB10",
        GpuKind.INTEGRATED,
        "12.1",
    )
    # NVML answers every query but the memory one: "Not Supported", the system's memory counts
    assert gb10.responding is True and gb10.usable
    assert gb10.memory_source == "unified"
    assert gb10.memory_bytes == inv.memory.total_bytes == 127598748 * 1024
    assert inv.nvidia_driver == "580.126.09"
    assert inv.warnings == []
    # ConnectX-7 ports bound to mlx5_core are not display-class: not GPUs
    assert [g.address for g in inv.gpus] == ["000f:01:00.0"]


def test_gb10_without_nvml_is_known_by_its_pci_id():
    (gb10,) = detect(fixture("nvidia-dgx-spark-gb10"), use_nvml=False).gpus
    assert gb10.memory_source == "unified" and gb10.memory_bytes == 127598748 * 1024
    assert gb10.responding is None and gb10.usable
