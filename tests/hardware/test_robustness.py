"""Garbled, missing or hostile files give warnings, never exceptions; NVML failures too."""

import json
import shutil

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_nixos.basetypes import Accelerator
from exo_nixos.hardware import HardwareSettings, decide, detect
from exo_nixos.hardware.nvml import NvmlReport, RecordedNvml, load_pynvml, query
from tests.hardware.conftest import fixture


def test_empty_root_warns_about_what_is_missing(tmp_path):
    inventory = detect(tmp_path)
    assert f"{tmp_path}/proc/cpuinfo: missing" in inventory.warnings
    assert f"{tmp_path}/proc/meminfo: missing" in inventory.warnings
    assert inventory.gpus == [] and inventory.cpu.threads == 0
    assert decide(HardwareSettings(), inventory).accelerator is Accelerator.CPU


def test_garbled_files_become_warnings(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    gpu = root / "sys/bus/pci/devices/0000:43:00.0"
    (gpu / "class").write_text("display, probably\n")
    (root / "sys/bus/pci/devices/0000:52:00.0/vendor").write_text("0x10de0000\n")
    (root / "proc/driver/nvidia/gpus/0000:61:00.0/information").write_text(
        "Model: \t\t NVIDIA H100\nDevice Minor: \t seven\n"
    )
    (root / "proc/cpuinfo").write_bytes(b"\xff\xfe garbage \x00\x81")
    (root / "proc/meminfo").write_text("MemFree: lots\n")
    (root / "sys/fs/cgroup/system.slice/exo-worker.service/memory.max").write_text("lots\n")
    (root / "nvml.json").write_text("{not json")
    (root / "sys/devices/system/node/node1/meminfo").write_text("garbage")
    inventory = detect(root)
    shown = {w.split(":")[0] for w in inventory.warnings}
    assert f"{gpu}/class" in {w.split(": ")[0] for w in inventory.warnings}
    assert any("is out of range" in w for w in inventory.warnings)
    assert any("Device Minor 'seven' is not a number" in w for w in inventory.warnings)
    assert f"{root}/proc/cpuinfo: not text (garbled); ignored" in inventory.warnings
    assert any("no MemTotal line" in w for w in inventory.warnings)
    assert any("'lots' is neither a number nor 'max'" in w for w in inventory.warnings)
    assert any(w.startswith("NVML could not be loaded") for w in inventory.warnings)
    assert shown  # every warning names something
    # the GPUs that could be read are still there and still decide
    addresses = [g.address for g in inventory.gpus_for(Accelerator.CUDA)]
    assert "0000:43:00.0" not in addresses and "0000:52:00.0" not in addresses
    assert "0000:1b:00.0" in addresses
    minorless = next(g for g in inventory.gpus if g.address == "0000:61:00.0")
    assert minorless.usable  # /dev/nvidia<N> nodes exist, so the minor is not needed
    assert inventory.memory.total_bytes is None and inventory.memory.cgroup_limit_bytes is None
    decision = decide(HardwareSettings(memory_limit="80%"), inventory)
    assert decision.accelerator is Accelerator.CUDA
    assert "memoryLimit 80% not applied: physical memory unknown" in decision.reasons


def test_garbled_kfd_topology(tree_copy):
    root = tree_copy("amd-instinct-mi250x")
    nodes = root / "sys/class/kfd/kfd/topology/nodes"
    (nodes / "4/properties").write_text("gfx_target_version ninety\nlocation_id 49408\n")
    (nodes / "5/mem_banks/0/properties").write_text("heap_type 1\nsize_in_bytes many\n")
    shutil.rmtree(nodes / "6")
    inventory = detect(root)
    assert any("gfx_target_version 'ninety'" in w for w in inventory.warnings)
    assert any("size_in_bytes 'many'" in w for w in inventory.warnings)
    by_address = {g.address: g for g in inventory.gpus}
    # gfx target falls back to the PCI id table; VRAM to amdgpu's sysfs counter
    assert by_address["0000:c1:00.0"].gfx_target == "gfx90a"
    assert by_address["0000:c6:00.0"].memory_source == "sysfs"
    assert by_address["0000:c9:00.0"].memory_bytes == 68702699520


def test_cgroup_v1_host_is_noted(tree_copy):
    root = tree_copy("cpu-vm-cgroup")
    (root / "proc/self/cgroup").write_text(
        "12:memory:/system.slice/exo-worker.service\n1:name=systemd:/system.slice\n"
    )
    inventory = detect(root)
    assert inventory.memory.cgroup_limit_bytes is None
    assert any("no cgroup v2 entry" in w for w in inventory.warnings)


def test_unreadable_directory_is_a_warning(tree_copy):
    root = tree_copy("bmc-only-server")
    devices = root / "sys/bus/pci/devices"
    shutil.rmtree(devices)
    devices.write_text("not a directory")
    inventory = detect(root)
    assert inventory.gpus == []
    assert any("cannot list" in w for w in inventory.warnings)


TREES = ("cpu-vm-cgroup", "amd-radeon-7900xtx", "nvidia-rtx4090-desktop", "nvidia-dgx-spark-gb10")
FILES = sorted(
    (name, str(p.relative_to(fixture(name))))
    for name in TREES
    for p in fixture(name).rglob("*")
    if p.is_file() and not p.is_symlink()
)


@pytest.fixture
def trees(tmp_path):
    root = tmp_path / "trees"
    for name in TREES:
        shutil.copytree(fixture(name), root / name, symlinks=True)
    return root


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(target=st.sampled_from(FILES), content=st.binary(max_size=300))
def test_any_content_in_any_file_never_raises(trees, target, content):
    name, relative = target
    path = trees / name / relative
    original = path.read_bytes()
    path.write_bytes(content)
    try:
        inventory = detect(trees / name)
        decision = decide(HardwareSettings(memory_limit="80%"), inventory)
        json.dumps([inventory.warnings, decision.reasons])
    finally:
        path.write_bytes(original)


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4)
    ),
    max_leaves=12,
)
NVML_KEYS = st.sampled_from(
    [
        "busId",
        "name",
        "uuid",
        "memoryTotal",
        "memoryFree",
        "computeCapability",
        "migMode",
        "error",
    ]
)


@settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(
    document=JSON
    | st.fixed_dictionaries(
        {"devices": st.lists(st.dictionaries(NVML_KEYS, JSON, max_size=8), max_size=3)},
        optional={"driver": JSON, "initError": JSON, "initErrorCode": JSON},
    )
)
def test_any_recorded_nvml_document_never_raises(trees, document):
    root = trees / "nvidia-rtx4090-desktop"
    (root / "nvml.json").write_text(json.dumps(document))
    inventory = detect(root)
    decision = decide(HardwareSettings(), inventory)
    assert decision.accelerator in {Accelerator.CUDA, Accelerator.CPU}
    requiring = HardwareSettings(cuda_minimum_driver="580", cuda_minimum_compute_capability="7.5")
    assert decide(requiring, inventory).accelerator in {Accelerator.CUDA, Accelerator.CPU}


def _nvml_loads() -> bool:
    try:
        library = load_pynvml()
        library.nvmlInit()
    except Exception:
        return False
    library.nvmlShutdown()
    return True


@pytest.mark.skipif(_nvml_loads(), reason="libnvidia-ml loads here: this test is for hosts without")
def test_real_pynvml_without_the_driver_library_is_a_clean_warning():
    report = query(load_pynvml())
    assert isinstance(report, NvmlReport)
    assert report.status.startswith("unavailable: ")
    assert report.devices == []
    (warning,) = report.warnings
    assert warning.startswith("NVML could not start (")
    assert warning.endswith("NVIDIA GPU memory, compute capability and health were not verified")
    inventory = detect(fixture("nvidia-rtx4090-desktop"), nvml_loader=load_pynvml)
    assert inventory.nvml.startswith("unavailable: ")
    assert warning in inventory.warnings
    (rtx,) = inventory.gpus_for(Accelerator.CUDA)
    assert rtx.responding is None and rtx.usable
    decision = decide(HardwareSettings(), inventory)
    assert decision.accelerator is Accelerator.CUDA
    assert f"NVML {inventory.nvml}: the NVIDIA GPUs were not verified" in decision.reasons


def test_nvml_that_cannot_be_imported():
    def loader():
        raise ImportError("No module named 'pynvml'")

    inventory = detect(fixture("nvidia-rtx4090-desktop"), nvml_loader=loader)
    assert inventory.nvml == "unavailable: No module named 'pynvml'"
    assert inventory.warnings == [
        "NVML could not be loaded (No module named 'pynvml'): NVIDIA GPUs were not verified"
    ]


def test_nvml_init_failure_is_recorded_and_replayed(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    (root / "nvml.json").write_text(json.dumps({"initError": "Driver Not Loaded", "devices": []}))
    inventory = detect(root)
    assert inventory.nvml == "unavailable: Driver Not Loaded"


# --- NVML failures that rule CUDA out too ---------------------------------------------


def _real_nvml_error(code: int) -> Exception:
    """pynvml's own exception for an NVML return code, as nvmlInit raises it."""
    import pynvml

    error: Exception = pynvml.NVMLError(code)
    return error


class _FailingInit(RecordedNvml):
    def __init__(self, error: Exception) -> None:
        super().__init__({"devices": []})
        self.error = error

    def nvmlInit(self) -> None:
        raise self.error


def test_driver_library_mismatch_falls_back_to_cpu_with_the_fix():
    # nixos-rebuild switch to a new NVIDIA driver without a reboot: the old module stays loaded
    error = _real_nvml_error(18)
    inventory = detect(fixture("nvidia-rtx4090-desktop"), nvml_loader=lambda: _FailingInit(error))
    (rtx,) = inventory.gpus_for(Accelerator.CUDA)
    assert rtx.responding is False and not rtx.usable
    assert rtx.problems == [
        "the loaded nvidia kernel module (550.78) is not the release of the NVIDIA libraries "
        f"(NVML: {error}): reboot, so the driver of the current system generation is loaded"
    ]
    assert inventory.warnings == []  # the problem is the GPU's, said once
    decision = decide(HardwareSettings(), inventory)
    assert decision.accelerator is Accelerator.CPU
    assert decision.reasons[-1].startswith("no working CUDA device (NVIDIA GeForce RTX 4090 at")
    assert (
        "reboot, so the driver of the current system generation is loaded" in decision.reasons[-1]
    )


def test_driver_not_loaded_rules_out_cuda(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    recorded = {"initError": "Driver Not Loaded", "initErrorCode": 9, "devices": []}
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    nvidia = inventory.gpus_for(Accelerator.CUDA)
    assert len(nvidia) == 8
    assert all(
        g.problems == ["the NVIDIA driver is not running (NVML: Driver Not Loaded)"] for g in nvidia
    )
    assert decide(HardwareSettings(), inventory).accelerator is Accelerator.CPU


@pytest.mark.parametrize(("code", "message"), [(4, "Insufficient Permissions"), (999, "Unknown")])
def test_other_init_failures_leave_the_gpus_unverified_not_unusable(tree_copy, code, message):
    root = tree_copy("nvidia-dgx-h100")
    recorded = {"initError": message, "initErrorCode": code, "devices": []}
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    nvidia = inventory.gpus_for(Accelerator.CUDA)
    assert all(g.responding is None and g.usable for g in nvidia)
    decision = decide(HardwareSettings(), inventory)
    assert decision.accelerator is Accelerator.CUDA
    assert f"NVML unavailable: {message}: the NVIDIA GPUs were not verified" in decision.reasons


def test_mismatch_without_a_readable_module_version(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    (root / "sys/module/nvidia/version").write_bytes(b"\xff\x00garbage")
    recorded = {"initError": "Driver/library version mismatch", "initErrorCode": 18, "devices": []}
    (root / "nvml.json").write_text(json.dumps(recorded))
    inventory = detect(root)
    assert inventory.nvidia_driver is None
    assert any(
        w.endswith("/sys/module/nvidia/version: not text (garbled); ignored")
        for w in inventory.warnings
    )
    (rtx,) = inventory.gpus_for(Accelerator.CUDA)
    assert rtx.problems[0].startswith(
        "the loaded nvidia kernel module is not the release of the NVIDIA libraries (NVML: "
        "Driver/library version mismatch)"
    )


def test_module_version_that_is_not_a_version_gives_way_to_nvmls(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    (root / "sys/module/nvidia/version").write_text("latest and greatest\n")
    inventory = detect(root)
    assert inventory.nvidia_driver == "550.90.07"  # what NVML reports
    assert f"{root}/sys/module/nvidia/version: 'latest and greatest' is not a version; ignored" in (
        inventory.warnings
    )
