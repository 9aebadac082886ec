"""The memory an accelerated node offers EXO: its GPU's, less a margin, capped by the host's.

The H100 tree is a real capture (``tests/fixtures/hardware/nvidia-h100-real``): one H100 80GB
in a VM with 128 GiB of RAM, so the host's memory and the GPU's differ as they do in the field.
"""

from __future__ import annotations

import json

import pytest

from exo_nixos.basetypes import Accelerator
from exo_nixos.hardware import HardwareSettings, decide, detect
from exo_nixos.hardware.decide import Code, CpuReason, Decision, MemoryBasis, gpu_memory_offer
from tests.hardware.conftest import fixture

GiB = 1 << 30
MiB = 1 << 20
H100 = "nvidia-h100-real"
H100_BYTES = 85520809984  # NVML's memory.total on the captured H100
ALL = HardwareSettings()


def codes(decision: Decision) -> list[str | None]:
    return [f.code for f in decision.findings]


def test_the_real_h100_capture_is_detected_as_captured():
    expected = json.loads((fixture(H100) / "expected.json").read_text())
    inventory = detect(fixture(H100))
    (gpu,) = inventory.gpus_for(Accelerator.CUDA)
    want = expected["gpus"][0]
    assert (gpu.address, gpu.name) == (want["pci"], want["name"])
    assert (gpu.memory_bytes, gpu.memory_source) == (want["memory_bytes_nvml"], "nvml")
    assert gpu.responding is True and gpu.usable
    assert gpu.uuid == "GPU-c159fef9-8185-a8d8-349e-7d57bf9f5a3b"
    assert inventory.memory.total_bytes == expected["mem_total_kib"] * 1024
    assert decide(ALL, inventory).accelerator == expected["accelerator"]


def test_a_cuda_node_offers_its_gpus_memory_not_the_hosts():
    decision = decide(ALL, detect(fixture(H100)))
    offer = int(H100_BYTES * 0.80)  # 80 GB: upstream's 0.80 line
    assert decision.memory.basis is MemoryBasis.GPU
    assert decision.memory_limit_bytes == offer
    assert decision.env["OVERRIDE_MEMORY_MB"] == str(offer // MiB)
    assert Code.MEMORY_GPU in codes(decision)
    assert decision.memory.label() == "plans with 64 GiB of GPU memory"


@pytest.mark.parametrize(
    ("limit", "basis", "code"),
    [
        ("32G", MemoryBasis.LIMIT, Code.MEMORY_LIMIT),  # below the GPU's share: the cap
        ("100G", MemoryBasis.GPU, Code.MEMORY_LIMIT_ABOVE_GPU),  # above it: the GPU's share
    ],
)
def test_memory_limit_caps_the_gpus_offer(limit, basis, code):
    decision = decide(HardwareSettings(memory_limit=limit), detect(fixture(H100)))
    assert decision.memory.basis is basis
    assert code in codes(decision)
    expected = 32 * GiB if basis is MemoryBasis.LIMIT else int(H100_BYTES * 0.80)
    assert decision.memory_limit_bytes == expected


def test_the_cgroup_caps_the_gpus_offer(tree_copy):
    root = tree_copy(H100)
    cgroup = (root / "proc/self/cgroup").read_text().strip().partition("::")[2]
    group = root / f"sys/fs/cgroup{cgroup}"
    group.mkdir(parents=True, exist_ok=True)
    (group / "memory.max").write_text(f"{16 * GiB}\n")
    decision = decide(ALL, detect(root))
    assert decision.memory.basis is MemoryBasis.CGROUP
    assert decision.memory_limit_bytes == 16 * GiB
    assert Code.MEMORY_CGROUP in codes(decision)


def test_the_cpu_variant_keeps_the_system_rule():
    decision = decide(HardwareSettings(preferred=Accelerator.CPU), detect(fixture(H100)))
    assert decision.cpu_reason is CpuReason.PREFERRED
    assert decision.memory.basis is MemoryBasis.SYSTEM
    assert "OVERRIDE_MEMORY_MB" not in decision.env
    assert Code.MEMORY_GPU not in codes(decision)


def test_gpu_memory_unknown_to_nvml_keeps_the_system_rule_and_says_so(tree_copy):
    root = tree_copy(H100)
    (root / "nvml.json").unlink()  # NVML not asked: the nominal size from the PCI id only
    decision = decide(ALL, detect(root))
    assert decision.accelerator is Accelerator.CUDA
    assert decision.memory.basis is MemoryBasis.SYSTEM
    assert Code.MEMORY_GPU_UNKNOWN in codes(decision)


@pytest.mark.parametrize(
    ("gib", "share"),
    [(16, 0.70), (24, 0.70), (32, 0.75), (48, 0.75), (64, 0.80), (79.6, 0.80), (141, 0.85)],
)
def test_the_margin_follows_upstreams_eviction_line(gib, share):
    memory = int(gib * GiB)
    assert gpu_memory_offer(memory) == (int(memory * share), share)
