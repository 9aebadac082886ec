from __future__ import annotations

from pathlib import Path

import pytest

from exo_nixos.config import Accelerator, Config, parse_config
from exo_nixos.hardware.decide import CpuReason, MemoryBasis
from exo_nixos.supervisor.environment import (
    build_launch,
    exo_argv,
    role_for,
    select_executable,
    snapshot_path,
)

FIXTURES = Path(__file__).parent / "fixtures" / "hardware"


def cfg(**doc: object) -> Config:
    return parse_config({"schemaVersion": 1, **doc})


def fake_host(root: Path, mem_kib: int = 16 * 1024 * 1024, memory_max: str | None = None) -> Path:
    (root / "proc/self").mkdir(parents=True)
    (root / "proc/meminfo").write_text(f"MemTotal:       {mem_kib} kB\nMemFree: 1 kB\n")
    (root / "proc/self/cgroup").write_text("0::/system.slice/exo-worker.service\n")
    unit = root / "sys/fs/cgroup/system.slice/exo-worker.service"
    unit.mkdir(parents=True)
    (root / "sys/fs/cgroup/system.slice/memory.max").write_text("max\n")
    (unit / "memory.max").write_text(f"{memory_max or 'max'}\n")
    (root / "dev").mkdir()
    return root


def variant(root: Path, name: str) -> str:
    exe = root / "pkgs" / name / "bin" / "exo"
    exe.parent.mkdir(parents=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe.parent.parent)


def test_master_argv_carries_every_flag() -> None:
    config = cfg(
        mode="master",
        noWorker=True,
        apiPort=6000,
        clusterNamespace="lab",
        offline=True,
        logLevel="debug",
        extraArgs=["--no-batch"],
        networking={"zenohPort": 6001, "discoveryPort": 6002},
    )
    assert role_for(config) == "master"
    assert exo_argv(config, "master", "/x/bin/exo") == [
        "/x/bin/exo",
        "--api-port",
        "6000",
        "--zenoh-port",
        "6001",
        "--discovery-port",
        "6002",
        "--namespace",
        "lab",
        "--force-master",
        "--no-worker",
        "--offline",
        "-v",
        "--no-batch",
    ]


@pytest.mark.parametrize("mode", ["worker", "auto"])
def test_worker_and_auto_run_a_plain_node(mode: str) -> None:
    config = cfg(mode=mode)
    assert role_for(config) == "worker"
    argv = exo_argv(config, "worker", "exo")
    assert "--force-master" not in argv
    assert "--no-worker" not in argv
    assert "-v" not in argv  # info: exo's default sink
    assert "--legacy-daemon" not in argv


def test_environment_points_exo_at_the_service_directories(tmp_path) -> None:
    root = fake_host(tmp_path)
    config = cfg(
        offline=True,
        extraModelDirs=["/srv/models", "/mnt/more"],
        readOnlyModelDirs=["/nfs/models"],
        environmentVariables={"HF_ENDPOINT": "https://hf.example"},
    )
    base = {"PATH": "/bin", "NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "1", "EXO_HOME": "x"}
    launch = build_launch(config, "worker", base_env=base, root=root)
    env = launch.env
    assert env["XDG_DATA_HOME"] == "/var/lib"  # exo appends /exo
    assert env["XDG_CACHE_HOME"] == "/var/cache"
    assert env["XDG_CONFIG_HOME"] == "/var/lib/exo/config"
    assert env["EXO_RUNTIME_DIR"] == "/run/exo"
    assert env["EXO_DEFAULT_MODELS_DIR"] == "/var/lib/exo/models"
    assert env["EXO_MODELS_DIRS"] == "/srv/models:/mnt/more"
    assert env["EXO_MODELS_READ_ONLY_DIRS"] == "/nfs/models"
    assert env["EXO_OFFLINE"] == "true"
    assert env["HF_ENDPOINT"] == "https://hf.example"
    assert env["PATH"] == "/bin"
    for private in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "EXO_HOME"):
        assert private not in env
    assert snapshot_path(config) == Path("/var/lib/exo/exo-nixos/topology.json")


def test_unusual_directory_names_keep_exo_one_level_down() -> None:
    config = cfg(security={"dataDir": "/srv/ai", "cacheDir": "/srv/cache"})
    env = build_launch(config, "worker", base_env={}, root=Path("/nonexistent")).env
    assert "OVERRIDE_MEMORY_MB" not in env
    assert env["XDG_DATA_HOME"] == "/srv/ai"
    assert env["XDG_CACHE_HOME"] == "/srv/cache"
    assert env["EXO_DEFAULT_MODELS_DIR"] == "/srv/ai/models"


def memory_mb(config: Config, root: Path) -> str | None:
    return build_launch(config, "worker", base_env={}, root=root).env.get("OVERRIDE_MEMORY_MB")


def test_memory_limit_share_of_physical_memory(tmp_path) -> None:
    root = fake_host(tmp_path, mem_kib=32 * 1024 * 1024)
    assert memory_mb(cfg(hardware={"memoryLimit": "50%"}), root) == str(16 * 1024)


def test_cgroup_limit_wins_when_tighter(tmp_path) -> None:
    root = fake_host(tmp_path, mem_kib=32 * 1024 * 1024, memory_max=str(4 << 30))
    assert memory_mb(cfg(hardware={"memoryLimit": "80%"}), root) == "4096"
    launch = build_launch(cfg(), "worker", base_env={}, root=root)
    assert launch.env["OVERRIDE_MEMORY_MB"] == "4096"
    assert launch.memory_mb == 4096


def test_no_limit_anywhere_leaves_exo_to_measure(tmp_path) -> None:
    root = fake_host(tmp_path)
    inherited = {"OVERRIDE_MEMORY_MB": "1"}
    launch = build_launch(cfg(), "worker", base_env=inherited, root=root)
    assert "OVERRIDE_MEMORY_MB" not in launch.env
    assert launch.memory_mb is None


def test_gpu_variant_when_detection_finds_a_working_gpu(tmp_path) -> None:
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    config = cfg(hardware={"packages": packages})
    sel = select_executable(config, FIXTURES / "nvidia-rtx4090-desktop")
    assert sel.accelerator is Accelerator.CUDA
    assert sel.executable == f"{packages['cuda']}/bin/exo"
    assert sel.fallback is None
    assert sel.env.get("CUDA_VISIBLE_DEVICES") != ""


def test_gpu_gone_falls_back_to_cpu_and_says_why(tmp_path) -> None:
    root = fake_host(tmp_path / "host")
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    config = cfg(hardware={"packages": packages, "preferredAccelerator": "cuda"})
    sel = select_executable(config, root)
    assert sel.accelerator is Accelerator.CPU
    assert sel.executable == f"{packages['cpu']}/bin/exo"
    assert sel.fallback is not None
    assert sel.fallback_reason is CpuReason.PREFERRED_UNUSABLE
    assert sel.fallback.startswith("cuda unusable (preferred accelerator cuda cannot be used")
    assert sel.env["CUDA_VISIBLE_DEVICES"] == ""


def test_driver_older_than_the_cuda_variant_needs_is_a_fallback_with_the_fix(tmp_path) -> None:
    # the RTX 4090 desktop runs driver 550.78; the CUDA 13 build needs 580
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    hardware = {"packages": packages, "cudaMinimumDriver": "580"}
    sel = select_executable(cfg(hardware=hardware), FIXTURES / "nvidia-rtx4090-desktop")
    assert sel.accelerator is Accelerator.CPU
    assert sel.executable == f"{packages['cpu']}/bin/exo"
    assert sel.fallback_reason is CpuReason.DRIVER_TOO_OLD
    assert sel.fallback == (
        "cuda unusable (NVIDIA GeForce RTX 4090 (24 GiB) found, but the NVIDIA driver 550.78 "
        "is older than 580, the oldest that EXO's CUDA variant runs on: install a newer driver "
        "(hardware.nvidia.package)); running on CPU"
    )
    assert sel.env["CUDA_VISIBLE_DEVICES"] == ""


def test_installed_gpu_variant_on_a_gpu_less_host_is_a_fallback(tmp_path) -> None:
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    sel = select_executable(cfg(hardware={"packages": packages}), fake_host(tmp_path / "h"))
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback is not None
    assert sel.fallback_reason is CpuReason.NO_GPU
    assert sel.fallback.startswith("cuda unusable")


def test_missing_gpu_executable_falls_back(tmp_path) -> None:
    packages = {"cuda": str(tmp_path / "pkgs/absent"), "cpu": variant(tmp_path, "cpu")}
    sel = select_executable(
        cfg(hardware={"packages": packages}), FIXTURES / "nvidia-rtx4090-desktop"
    )
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback is not None
    assert sel.fallback_reason is CpuReason.EXECUTABLE_MISSING
    assert "does not exist" in sel.fallback
    assert sel.executable == f"{packages['cpu']}/bin/exo"


def test_cpu_only_config_is_no_fallback(tmp_path) -> None:
    packages = {"cpu": variant(tmp_path, "cpu")}
    sel = select_executable(cfg(hardware={"packages": packages}), fake_host(tmp_path / "h"))
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback is None


def test_cpu_asked_for_is_no_fallback_even_with_a_gpu_variant_installed(tmp_path) -> None:
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    config = cfg(hardware={"packages": packages, "preferredAccelerator": "cpu"})
    sel = select_executable(config, FIXTURES / "nvidia-rtx4090-desktop")
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback is None
    assert sel.fallback_reason is None
    assert sel.env["CUDA_VISIBLE_DEVICES"] == ""


@pytest.mark.parametrize(
    ("hardware", "expected"),
    [
        ({"autoDetect": False}, CpuReason.AUTO_DETECT_OFF),
        ({"cudaMinimumComputeCapability": "10.0"}, CpuReason.NO_WORKING_DEVICE),
        ({"visibleDevices": ["GPU-absent"]}, CpuReason.VISIBLE_DEVICES_NONE),
    ],
)
def test_each_way_to_the_cpu_has_its_code(tmp_path, hardware, expected) -> None:
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    config = cfg(hardware={"packages": packages, **hardware})
    sel = select_executable(config, FIXTURES / "nvidia-rtx4090-desktop")
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback_reason is expected


def test_a_cuda_run_plans_with_the_gpus_memory_and_says_so_in_status(tmp_path) -> None:
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    sel = select_executable(cfg(hardware={"packages": packages}), FIXTURES / "nvidia-h100-real")
    assert sel.accelerator is Accelerator.CUDA
    assert sel.memory.basis is MemoryBasis.GPU
    assert sel.memory.limit_bytes is not None
    assert sel.env["OVERRIDE_MEMORY_MB"] == str(sel.memory.limit_bytes // (1 << 20))
    assert sel.label() == "cuda, plans with 64 GiB of GPU memory"


def test_a_fallback_after_the_decision_drops_the_gpus_memory(tmp_path) -> None:
    packages = {"cuda": str(tmp_path / "pkgs/absent"), "cpu": variant(tmp_path, "cpu")}
    config = cfg(hardware={"packages": packages})
    sel = select_executable(config, FIXTURES / "nvidia-h100-real")
    assert sel.fallback_reason is CpuReason.EXECUTABLE_MISSING
    assert sel.memory.basis is MemoryBasis.SYSTEM
    assert "OVERRIDE_MEMORY_MB" not in sel.env
    assert sel.label() == "cpu"
    launch = build_launch(config, "worker", base_env={}, selection=sel)
    assert launch.memory_mb is None
