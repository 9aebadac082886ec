from __future__ import annotations

from pathlib import Path

import pytest

from exo_nixos.config import Accelerator, Config, parse_config
from exo_nixos.supervisor.environment import (
    build_launch,
    cgroup_memory_limit,
    exo_argv,
    override_memory_mb,
    role_for,
    select_executable,
    snapshot_path,
)


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
    assert "OVERRIDE_MEMORY_MB" not in env  # no limit anywhere: exo measures itself
    assert snapshot_path(config) == Path("/var/lib/exo/exo-nixos/topology.json")


def test_unusual_directory_names_keep_exo_one_level_down() -> None:
    config = cfg(security={"dataDir": "/srv/ai", "cacheDir": "/srv/cache"})
    env = build_launch(config, "worker", base_env={}, root=Path("/nonexistent")).env
    assert env["XDG_DATA_HOME"] == "/srv/ai"
    assert env["XDG_CACHE_HOME"] == "/srv/cache"
    assert env["EXO_DEFAULT_MODELS_DIR"] == "/srv/ai/models"


def test_memory_limit_share_of_physical_memory(tmp_path) -> None:
    root = fake_host(tmp_path, mem_kib=32 * 1024 * 1024)
    assert override_memory_mb(cfg(hardware={"memoryLimit": "50%"}), root) == 16 * 1024


def test_memory_limit_size_is_capped_by_physical_memory(tmp_path) -> None:
    root = fake_host(tmp_path, mem_kib=8 * 1024 * 1024)
    assert override_memory_mb(cfg(hardware={"memoryLimit": "48G"}), root) == 8 * 1024


def test_cgroup_limit_wins_when_tighter(tmp_path) -> None:
    root = fake_host(tmp_path, mem_kib=32 * 1024 * 1024, memory_max=str(4 << 30))
    assert cgroup_memory_limit(root) == 4 << 30
    assert override_memory_mb(cfg(hardware={"memoryLimit": "80%"}), root) == 4096
    assert override_memory_mb(cfg(), root) == 4096
    env = build_launch(cfg(), "worker", base_env={}, root=root).env
    assert env["OVERRIDE_MEMORY_MB"] == "4096"


def test_garbled_proc_files_mean_no_override(tmp_path) -> None:
    (tmp_path / "proc/self").mkdir(parents=True)
    (tmp_path / "proc/meminfo").write_text("garbage\n")
    (tmp_path / "proc/self/cgroup").write_text("12:cpu:/x\n")
    assert override_memory_mb(cfg(hardware={"memoryLimit": "80%"}), tmp_path) is None
    assert override_memory_mb(cfg(hardware={"memoryLimit": "2G"}), tmp_path) == 2048


def test_gpu_variant_when_its_devices_are_present(tmp_path) -> None:
    root = fake_host(tmp_path)
    (root / "dev/nvidiactl").touch()
    (root / "dev/nvidia0").touch()
    packages = {"cuda": variant(root, "cuda"), "cpu": variant(root, "cpu")}
    config = cfg(hardware={"packages": packages, "visibleDevices": ["0"]})
    sel = select_executable(config, root)
    assert sel.accelerator is Accelerator.CUDA
    assert sel.executable == f"{packages['cuda']}/bin/exo"
    assert sel.fallback is None
    assert sel.env == {"CUDA_VISIBLE_DEVICES": "0"}


def test_gpu_gone_falls_back_to_cpu_and_says_why(tmp_path) -> None:
    root = fake_host(tmp_path)
    packages = {"cuda": variant(root, "cuda"), "cpu": variant(root, "cpu")}
    config = cfg(hardware={"packages": packages, "preferredAccelerator": "cuda"})
    sel = select_executable(config, root)
    assert sel.accelerator is Accelerator.CPU
    assert sel.executable == f"{packages['cpu']}/bin/exo"
    assert sel.fallback is not None
    assert "nvidiactl" in sel.fallback
    assert sel.env["CUDA_VISIBLE_DEVICES"] == ""


def test_missing_gpu_executable_falls_back(tmp_path) -> None:
    root = fake_host(tmp_path)
    (root / "dev/kfd").touch()
    packages = {"rocm": str(root / "pkgs/absent"), "cpu": variant(root, "cpu")}
    sel = select_executable(cfg(hardware={"packages": packages}), root)
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback is not None
    assert "does not exist" in sel.fallback


def test_rocm_gets_its_overrides(tmp_path) -> None:
    root = fake_host(tmp_path)
    (root / "dev/kfd").touch()
    packages = {"rocm": variant(root, "rocm")}
    config = cfg(hardware={"packages": packages, "rocmGfxOverride": "10.3.0"})
    sel = select_executable(config, root)
    assert sel.accelerator is Accelerator.ROCM
    assert sel.env == {"HSA_OVERRIDE_GFX_VERSION": "10.3.0"}
