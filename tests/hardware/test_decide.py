"""The accelerator decision: preference, capability, installed variants, CPU fallback."""

import json
import shutil
from pathlib import Path

import pytest

from exo_nixos.basetypes import Accelerator
from exo_nixos.config import parse_config
from exo_nixos.findings import Finding, Severity
from exo_nixos.hardware import (
    Cpu,
    Gpu,
    GpuKind,
    GpuVendor,
    HardwareSettings,
    Inventory,
    Memory,
    choose,
    decide,
    detect,
)
from exo_nixos.hardware.decide import Code, CpuReason, Decision, MemoryBasis
from exo_nixos.hardware.model import AppleSilicon
from tests.hardware.conftest import fixture

GiB = 1 << 30
MiB = 1 << 20
ALL = HardwareSettings()
CUDA = Accelerator.CUDA
CPU = Accelerator.CPU


def finding(decision: Decision, code: str) -> Finding:
    (found,) = [f for f in decision.findings if f.code == code]
    return found


def test_datacenter_node_chooses_cuda_with_every_gpu():
    decision = decide(ALL, detect(fixture("nvidia-dgx-h100")))
    assert decision.accelerator is CUDA
    assert len(decision.devices) == 8
    # EXO computes on the first GPU: it offers that GPU's memory, less the margin
    assert decision.env == {"CUDA_DEVICE_ORDER": "PCI_BUS_ID", "OVERRIDE_MEMORY_MB": "65247"}
    assert decision.memory.basis is MemoryBasis.GPU
    assert decision.findings[0].code == Code.ASSUMED_INSTALLED
    assert finding(decision, Code.CHOSEN).text.startswith("chose cuda: 8x NVIDIA H100 80GB HBM3")
    assert finding(decision, Code.ONE_GPU_COMPUTES).severity is Severity.WARNING
    assert decision.executable is None


def test_amd_instinct_falls_back_to_cpu_and_says_why():
    decision = decide(ALL, detect(fixture("amd-instinct-mi250x")))
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "8x AMD Instinct MI250X/MI250 (512 GiB) found, but EXO has no ROCm backend: using cpu"
    )


def test_rocm_would_be_chosen_by_a_backend_that_has_it():
    settings = HardwareSettings(rocm_gfx_override="9.0.10", visible_devices=["0", "1"])
    supported = frozenset({Accelerator.ROCM, CPU})
    decision = decide(settings, detect(fixture("amd-instinct-mi250x")), supported)
    assert decision.accelerator is Accelerator.ROCM
    assert decision.env == {"ROCR_VISIBLE_DEVICES": "0,1", "HSA_OVERRIDE_GFX_VERSION": "9.0.10"}


def test_radeon_decision_names_the_discrete_card_only():
    decision = decide(ALL, detect(fixture("amd-radeon-7900xtx")))
    assert decision.accelerator is CPU
    assert "Raphael" not in decision.reasons[-1]
    assert "RX 7900" in decision.reasons[-1]


def test_intel_arc_falls_back_to_cpu():
    decision = decide(ALL, detect(fixture("intel-arc-a770")))
    assert decision.accelerator is CPU
    assert decision.reasons[-1].endswith("EXO has no Intel GPU backend: using cpu")


def test_bmc_vga_is_not_an_accelerator():
    decision = decide(ALL, detect(fixture("bmc-only-server")))
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "no accelerator: only display controllers (Matrox G200eR2 (BMC)): using cpu"
    )


def test_asahi_linux_cannot_use_mlx():
    decision = decide(
        HardwareSettings(preferred=Accelerator.MLX), detect(fixture("apple-m2-max-asahi"))
    )
    assert decision.accelerator is CPU
    assert "MLX needs Metal" in decision.reasons[-1]
    assert decision.reasons[-1].startswith("preferred accelerator mlx cannot be used")


def test_macos_apple_silicon_chooses_mlx():
    inventory = Inventory(
        root="/",
        system="Darwin",
        cpu=Cpu("arm64", "Apple M2 Ultra", 1, 24, 24, ["asimd"]),
        memory=Memory(192 * GiB, None, None, None),
        apple=AppleSilicon("Apple M2 Ultra", "macos"),
    )
    decision = decide(ALL, inventory)
    assert decision.accelerator is Accelerator.MLX
    assert decision.devices == ["apple-silicon"]
    assert "192 GiB unified memory" in decision.reasons[-1]


def test_vm_memory_limit_follows_the_cgroup():
    inventory = detect(fixture("cpu-vm-cgroup"))
    decision = decide(ALL, inventory)
    assert decision.accelerator is CPU
    assert decision.memory_limit_bytes == 12 * GiB
    assert decision.env["OVERRIDE_MEMORY_MB"] == "12288"
    assert any("cgroup memory limit (12 GiB)" in r for r in decision.reasons)
    larger = decide(HardwareSettings(memory_limit="80%"), inventory)
    assert larger.memory_limit_bytes == 12 * GiB
    smaller = decide(HardwareSettings(memory_limit="8G"), inventory)
    assert smaller.env["OVERRIDE_MEMORY_MB"] == "8192"


def test_memory_limit_percent_of_physical():
    inventory = detect(fixture("nvidia-rtx4090-desktop"))
    decision = decide(HardwareSettings(memory_limit="50%"), inventory)
    assert decision.memory_limit_bytes == 65695436 * 1024 // 2


def _config(**hardware):
    return parse_config({"schemaVersion": 1, "hardware": hardware})


PACKAGES = {"cpu": "/nix/store/aaaa-exo-1.0.71", "cuda": "/nix/store/bbbb-exo-cuda-1.0.71"}


def test_choose_uses_the_configs_installed_variants():
    decision = choose(_config(packages=PACKAGES), detect(fixture("nvidia-rtx4090-desktop")))
    assert decision.accelerator is CUDA
    assert decision.executable == Path("/nix/store/bbbb-exo-cuda-1.0.71/bin/exo")
    assert not any("assuming" in r for r in decision.reasons)


def test_gpu_without_an_installed_variant_means_cpu():
    config = _config(packages={"cpu": PACKAGES["cpu"]})
    decision = choose(config, detect(fixture("nvidia-rtx4090-desktop")))
    assert decision.accelerator is CPU
    assert decision.executable == Path("/nix/store/aaaa-exo-1.0.71/bin/exo")
    assert "no cuda variant of EXO is installed" in decision.reasons[-1]


def test_missing_cpu_variant_is_reported():
    config = _config(packages={"cuda": PACKAGES["cuda"]})
    decision = choose(config, detect(fixture("bmc-only-server")))
    assert decision.accelerator is CPU and decision.executable is None
    assert decision.reasons[-1] == (
        "no cpu variant of EXO is installed: set services.exo.hardware.packages.cpu"
    )


def test_preferred_cpu_wins_over_a_gpu():
    decision = choose(
        _config(preferredAccelerator="cpu", packages=PACKAGES),
        detect(fixture("nvidia-dgx-h100")),
    )
    assert decision.accelerator is CPU
    assert decision.reasons == ["preferredAccelerator is cpu"]


def test_preferred_that_is_absent_falls_back_to_automatic_choice():
    config = _config(preferredAccelerator="rocm", packages=PACKAGES)
    decision = choose(config, detect(fixture("nvidia-rtx4090-desktop")))
    assert decision.accelerator is CUDA
    assert decision.reasons[0] == "preferred accelerator rocm cannot be used: no AMD GPU found"


def test_auto_detect_off_uses_only_the_preferred_accelerator():
    inventory = detect(fixture("nvidia-rtx4090-desktop"))
    off = choose(_config(autoDetect=False, packages=PACKAGES), inventory)
    assert off.accelerator is CPU
    assert off.reasons[-1].startswith("autoDetect is off")
    preferred = choose(
        _config(autoDetect=False, preferredAccelerator="cuda", packages=PACKAGES), inventory
    )
    assert preferred.accelerator is CUDA
    blocked = choose(
        _config(autoDetect=False, preferredAccelerator="cuda", packages=PACKAGES),
        detect(fixture("bmc-only-server")),
    )
    assert blocked.accelerator is CPU
    assert blocked.reasons == [
        "preferred accelerator cuda cannot be used: no NVIDIA GPU found: using cpu"
    ]


def test_visible_devices_become_uuids():
    inventory = detect(fixture("nvidia-dgx-h100"))
    settings = HardwareSettings(visible_devices=["1", "GPU-85c4f0a3-2b9e-4e7d-91f6-c3a0b5d8e247"])
    decision = decide(settings, inventory)
    assert decision.devices == ["0000:43:00.0", "0000:df:00.0"]
    assert decision.env["CUDA_VISIBLE_DEVICES"] == (
        "GPU-9e3f1c55-0b7a-4d2e-8c61-3a5f0e92d7b1,GPU-85c4f0a3-2b9e-4e7d-91f6-c3a0b5d8e247"
    )


def test_visible_devices_naming_nothing_present_means_cpu():
    decision = decide(
        HardwareSettings(visible_devices=["9"]), detect(fixture("nvidia-rtx4090-desktop"))
    )
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "hardware.visibleDevices (9) names no working NVIDIA GPU here: using cpu"
    )


def _gpu(address, vendor, memory_gib, name):
    return Gpu(
        address=address,
        vendor=vendor,
        vendor_id="10de" if vendor is GpuVendor.NVIDIA else "1002",
        device_id="0000",
        pci_class="030200",
        name=name,
        kind=GpuKind.DISCRETE,
        driver="nvidia" if vendor is GpuVendor.NVIDIA else "amdgpu",
        memory_bytes=memory_gib * GiB,
    )


@pytest.mark.parametrize(
    ("nvidia_gib", "amd_gib", "expected"), [(24, 192, "rocm"), (80, 64, "cuda")]
)
def test_several_accelerators_most_usable_memory_wins(nvidia_gib, amd_gib, expected):
    inventory = Inventory(
        root="/",
        system="Linux",
        cpu=Cpu("x86_64", "test", 1, 8, 16, []),
        memory=Memory(256 * GiB, None, None, None),
        gpus=[
            _gpu("0000:01:00.0", GpuVendor.NVIDIA, nvidia_gib, "NVIDIA"),
            _gpu("0000:02:00.0", GpuVendor.AMD, amd_gib, "AMD"),
        ],
    )
    supported = frozenset(Accelerator)
    decision = decide(ALL, inventory, supported)
    assert decision.accelerator == expected
    assert "(the most usable memory)" in finding(decision, Code.CHOSEN).text


# --- a GPU that vanished or stopped answering -------------------------------------------


def _recording(root):
    return json.loads((root / "nvml.json").read_text())


def test_gpu_lost_to_nvml_is_left_out(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    document = _recording(root)
    document["devices"][3] = {"error": "GPU is lost"}
    (root / "nvml.json").write_text(json.dumps(document))
    inventory = detect(root)
    lost = next(g for g in inventory.gpus if g.address == "0000:61:00.0")
    assert lost.responding is False and not lost.usable
    assert "NVML device 3 does not answer: GPU is lost" in inventory.warnings
    decision = decide(ALL, inventory)
    assert decision.accelerator is CUDA
    assert len(decision.devices) == 7
    visible = decision.env["CUDA_VISIBLE_DEVICES"].split(",")
    assert len(visible) == 7 and lost.uuid not in visible
    assert any(
        r.startswith("NVIDIA H100 80GB HBM3 at 0000:61:00.0 left out") for r in decision.reasons
    )


def test_gpu_not_answering_memory_queries(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    document = {
        "driver": "550.54.15",
        "devices": [{"busId": "00000000:01:00.0", "error": "Unknown Error"}],
    }
    (root / "nvml.json").write_text(json.dumps(document))
    inventory = detect(root)
    (rtx,) = inventory.gpus_for(CUDA)
    assert rtx.problems == ["does not answer NVML (Unknown Error)"]
    decision = decide(ALL, inventory)
    assert decision.accelerator is CPU
    assert decision.reasons[-1].startswith("no working CUDA device (NVIDIA GeForce RTX 4090 at")
    assert decision.reasons[-1].endswith(": using cpu")


def test_gpu_gone_from_the_bus_means_cpu(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    shutil.rmtree(root / "sys/bus/pci/devices/0000:01:00.0")
    (root / "dev/nvidia0").unlink()
    decision = choose(_config(preferredAccelerator="cuda", packages=PACKAGES), detect(root))
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "preferred accelerator cuda cannot be used: no NVIDIA GPU found: using cpu"
    )


def test_nvidia_uvm_not_loaded_means_cpu(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    (root / "dev/nvidia-uvm").unlink()
    inventory = detect(root)
    (rtx,) = inventory.gpus_for(CUDA)
    assert rtx.problems == ["/dev/nvidia-uvm is missing (the nvidia_uvm module is not loaded)"]
    assert decide(ALL, inventory).accelerator is CPU


@pytest.mark.parametrize(
    ("driver", "problem"),
    [
        ("nouveau", "bound to nouveau; CUDA needs NVIDIA's driver (hardware.nvidia)"),
        ("vfio-pci", "bound to vfio-pci (reserved for a virtual machine)"),
    ],
)
def test_nvidia_gpu_on_another_driver(tree_copy, driver, problem):
    root = tree_copy("nvidia-rtx4090-desktop")
    link = root / "sys/bus/pci/devices/0000:01:00.0/driver"
    link.unlink()
    link.symlink_to(f"../../../../bus/pci/drivers/{driver}")
    inventory = detect(root)
    (rtx,) = inventory.gpus_for(CUDA)
    assert rtx.problems == [problem]
    assert inventory.nvml.startswith("not needed")
    assert decide(ALL, inventory).accelerator is CPU


def test_amd_without_kfd_is_not_usable(tree_copy):
    root = tree_copy("amd-instinct-mi250x")
    (root / "dev/kfd").unlink()
    inventory = detect(root)
    assert all(
        "/dev/kfd is missing (amdgpu's compute interface, KFD)" in g.problems
        for g in inventory.gpus_for(Accelerator.ROCM)
    )
    decision = decide(ALL, inventory, frozenset({Accelerator.ROCM, CPU}))
    assert decision.accelerator is CPU
    assert decision.reasons[-1].startswith("no working ROCm device")


# --- what the installed CUDA variant needs: a driver and a GPU generation -----------------

CUDA13 = HardwareSettings(cuda_minimum_driver="580", cuda_minimum_compute_capability="7.5")


def test_driver_older_than_the_cuda_variant_needs_means_cpu():
    inventory = detect(fixture("nvidia-dgx-h100"))  # driver 550.90.07
    decision = decide(CUDA13, inventory)
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "8x NVIDIA H100 80GB HBM3 (637 GiB) found, but the NVIDIA driver 550.90.07 is older "
        "than 580, the oldest that EXO's CUDA variant runs on: install a newer driver "
        "(hardware.nvidia.package): using cpu"
    )
    cuda12 = HardwareSettings(cuda_minimum_driver="550.54.14")
    assert decide(cuda12, inventory).accelerator is CUDA


def test_driver_version_unknown_is_not_held_against_the_gpus(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    (root / "sys/module/nvidia/version").unlink()
    recorded = json.loads((root / "nvml.json").read_text())
    recorded["driver"] = "unknown"
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    assert inventory.nvidia_driver is None
    assert decide(CUDA13, inventory).accelerator is CUDA


def test_gpus_older_than_the_cuda_variant_needs_are_left_out(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    (root / "sys/module/nvidia/version").write_text("580.95.05\n")
    recorded = json.loads((root / "nvml.json").read_text())
    for device in recorded["devices"][:2]:
        device["computeCapability"] = [7, 0]
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    decision = decide(CUDA13, inventory)
    assert decision.accelerator is CUDA
    assert decision.devices == [g.address for g in inventory.gpus_for(CUDA)][2:]
    assert len(decision.env["CUDA_VISIBLE_DEVICES"].split(",")) == 6
    assert (
        "NVIDIA H100 80GB HBM3 at 0000:1b:00.0 left out: compute capability 7.0 is below 7.5, "
        "the oldest that EXO's CUDA variant runs on"
    ) in decision.reasons
    # the inventory itself is unchanged: the GPU works, just not for this variant
    assert inventory.gpus_for(CUDA)[0].usable


def test_only_too_old_gpus_means_cpu(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")  # with a Volta card in the slot, as NVML says
    (root / "sys/module/nvidia/version").write_text("580.95.05\n")
    recorded = {
        "driver": "580.95.05",
        "devices": [
            {
                "busId": "00000000:01:00.0",
                "name": "Tesla V100-PCIE-32GB",
                "uuid": "GPU-1f0e2d3c-4b5a-6978-8a9b-0c1d2e3f4a5b",
                "memoryTotal": 34359738368,
                "memoryFree": 34000000000,
                "computeCapability": [7, 0],
            }
        ],
    }
    (root / "nvml.json").write_text(json.dumps(recorded))
    decision = decide(CUDA13, detect(root))
    assert decision.accelerator is CPU
    assert decision.reasons[-1] == (
        "no working CUDA device (Tesla V100-PCIE-32GB at 0000:01:00.0: compute capability 7.0 "
        "is below 7.5, the oldest that EXO's CUDA variant runs on): using cpu"
    )


def test_choose_takes_the_requirements_from_the_config():
    document = {
        "schemaVersion": 1,
        "hardware": {
            "packages": {"cpu": "/nix/store/x-exo-complete", "cuda": "/nix/store/x-exo-cuda"},
            "cudaMinimumDriver": "580",
            "cudaMinimumComputeCapability": "7.5",
        },
    }
    decision = choose(parse_config(document), detect(fixture("nvidia-dgx-h100")))
    assert decision.accelerator is CPU
    assert decision.executable == Path("/nix/store/x-exo-complete/bin/exo")
    assert "older than 580" in decision.reasons[-1]


def test_mig_mode_is_named_with_the_way_out(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    recorded = json.loads((root / "nvml.json").read_text())
    recorded["devices"][0]["migMode"] = [1, 1]
    recorded["devices"][1]["migMode"] = [0, 0]
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    first, second, third = inventory.gpus_for(CUDA)[:3]
    assert (first.mig, second.mig, third.mig) == (True, False, None)
    decision = decide(ALL, inventory)
    assert decision.accelerator is CUDA and len(decision.devices) == 8
    (mig,) = [f for f in decision.findings if f.code == Code.MIG]
    assert mig.severity is Severity.WARNING
    assert mig.text.startswith("NVIDIA H100 80GB HBM3 at 0000:1b:00.0 has MIG mode on")
    assert mig.fix == "to give EXO the whole GPU turn MIG off (nvidia-smi -i 0 -mig 0)"


def test_dgx_spark_runs_cuda_13_on_its_unified_memory():
    decision = decide(CUDA13, detect(fixture("nvidia-dgx-spark-gb10")))
    assert decision.accelerator is CUDA
    assert decision.devices == ["000f:01:00.0"]
    assert finding(decision, Code.CHOSEN).text == "chose cuda: NVIDIA GB10 (122 GiB)"
    # unified memory: the system's, measured by EXO itself
    assert finding(decision, Code.MEMORY_UNIFIED)
    assert decision.memory.basis is MemoryBasis.SYSTEM
    assert "OVERRIDE_MEMORY_MB" not in decision.env


def _memory_error(root, code, message):
    recorded = {
        "driver": "580.95.05",
        "devices": [
            {
                "busId": "00000000:01:00.0",
                "name": "NVIDIA GeForce RTX 4090",
                "uuid": "GPU-7f3a1c2e-94b8-6d05-e2f1-3c8a9b0d4e57",
                "memoryError": {"message": message, "code": code},
                "computeCapability": [8, 9],
            }
        ],
    }
    (root / "nvml.json").write_text(json.dumps(recorded))
    (rtx,) = detect(root).gpus_for(CUDA)
    return rtx


def test_a_board_with_its_own_memory_keeps_it_when_nvml_cannot_say(tree_copy):
    rtx = _memory_error(tree_copy("nvidia-rtx4090-desktop"), 3, "Not Supported")
    assert rtx.usable and rtx.responding is True
    assert (rtx.kind, rtx.memory_source, rtx.memory_bytes) == (
        GpuKind.DISCRETE,
        "pci id",
        24 * GiB,
    )


def test_an_unknown_gpu_without_memory_of_its_own_uses_the_systems(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    (root / "sys/bus/pci/devices/0000:01:00.0/device").write_text("0x2f00\n")  # not in the table
    gpu = _memory_error(root, 3, "Not Supported")
    assert gpu.usable and gpu.kind is GpuKind.INTEGRATED
    assert gpu.memory_source == "unified" and gpu.memory_bytes == 65695436 * 1024


def test_other_memory_query_failures_mean_the_gpu_does_not_answer(tree_copy):
    rtx = _memory_error(tree_copy("nvidia-rtx4090-desktop"), 15, "GPU is lost")
    assert not rtx.usable and rtx.problems == ["does not answer NVML (GPU is lost)"]


@pytest.mark.parametrize(
    ("tree", "settings", "expected"),
    [
        ("amd-instinct-mi250x", ALL, CpuReason.NO_BACKEND),
        ("intel-arc-a770", ALL, CpuReason.NO_BACKEND),
        ("bmc-only-server", ALL, CpuReason.DISPLAY_ONLY),
        ("apple-m2-max-asahi", ALL, CpuReason.NO_METAL),
        ("nvidia-rtx4090-desktop", HardwareSettings(preferred=CPU), CpuReason.PREFERRED),
        ("nvidia-rtx4090-desktop", HardwareSettings(packages={}), CpuReason.VARIANT_NOT_INSTALLED),
        (
            "nvidia-rtx4090-desktop",
            HardwareSettings(cuda_minimum_driver="580"),
            CpuReason.DRIVER_TOO_OLD,
        ),
        ("cpu-vm-cgroup", HardwareSettings(preferred=CUDA), CpuReason.PREFERRED_UNUSABLE),
        # the preferred accelerator's failure is the reason, not the last blocker listed
        ("amd-instinct-mi250x", HardwareSettings(preferred=CUDA), CpuReason.PREFERRED_UNUSABLE),
    ],
)
def test_the_way_to_the_cpu_travels_as_a_code(tree, settings, expected):
    decision = decide(settings, detect(fixture(tree)))
    assert decision.accelerator is CPU
    assert decision.cpu_reason is expected
    assert decision.cpu is not None
    assert any(line.startswith(decision.cpu.text) for line in decision.reasons)


def test_a_chosen_accelerator_has_no_cpu_reason():
    decision = decide(ALL, detect(fixture("nvidia-rtx4090-desktop")))
    assert decision.accelerator is CUDA
    assert decision.cpu is None and decision.cpu_reason is None
