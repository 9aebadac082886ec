"""One EXO node per GPU group: names, each instance's GPUs, decision, memory and directories.

Multi-GPU trees: the DGX H100 fixture (8 GPUs) and hosts grown from the real H100 capture
(``tests/hardware/multigpu.py``).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.basetypes import Accelerator
from exo_nixos.config import Config, parse_config
from exo_nixos.errors import UserError
from exo_nixos.hardware import detect
from exo_nixos.hardware.decide import CpuReason, MemoryBasis
from exo_nixos.hardware.instances import (
    Code,
    instance_for,
    instance_name,
    instances,
    parse_instance,
    plan,
)
from exo_nixos.supervisor import oom
from exo_nixos.supervisor.environment import (
    build_launch,
    instance_dirs,
    select_executable,
    snapshot_path,
    state_paths,
)
from tests.hardware.conftest import fixture
from tests.hardware.multigpu import h100_host, uuid

GiB = 1 << 30
MiB = 1 << 20
H100_OFFER_MB = int(85520809984 * 0.80) // MiB


def variant(root: Path, name: str) -> str:
    exe = root / "pkgs" / name / "bin" / "exo"
    exe.parent.mkdir(parents=True, exist_ok=True)
    exe.write_text("#!/bin/sh\n")
    exe.chmod(0o755)
    return str(exe.parent.parent)


def config(tmp: Path, groups: list[list[int]] | None, **hardware: Any) -> Config:
    packages = {"cuda": variant(tmp, "cuda"), "cpu": variant(tmp, "cpu")}
    node_per_gpu = {"enable": groups is not None, "groups": groups or []}
    node_per_gpu.update(hardware.pop("nodePerGpu", {}))
    return parse_config(
        {
            "schemaVersion": 1,
            "networking": {"bondInterface": "bond0"},
            "hardware": {"packages": packages, "nodePerGpu": node_per_gpu, **hardware},
        }
    )


def test_names_are_the_device_minors():
    assert instance_name([0]) == "gpu0"
    assert instance_name([2, 3]) == "gpu2-3"
    assert parse_instance("gpu2-3") == (2, 3)
    for bad in ("gpu", "gpu-1", "cpu0", "gpu1-", "gpu0;rm", "gpu1234"):
        with pytest.raises(UserError, match="not an instance name"):
            parse_instance(bad)


def test_an_instance_must_be_configured(tmp_path):
    cfg = config(tmp_path, [[0], [1]])
    assert instance_for(cfg, "gpu1").minors == (1,)
    with pytest.raises(UserError, match=r"not a configured instance \(configured: gpu0, gpu1\)"):
        instance_for(cfg, "gpu2")
    with pytest.raises(UserError, match="nodePerGpu is off"):
        instance_for(config(tmp_path, None), "gpu0")


def test_off_is_one_node_and_says_the_other_gpus_idle():
    result = plan([], detect(fixture("nvidia-dgx-h100")))
    assert result.nodes == 1
    (one,) = result.findings
    assert one.code == Code.ONE_NODE
    assert "one of the 8 NVIDIA GPUs" in one.text and one.fix


def test_eight_gpus_eight_nodes(tmp_path):
    cfg = config(tmp_path, [[n] for n in range(8)])
    result = plan(instances(cfg.hardware.node_per_gpu), detect(fixture("nvidia-dgx-h100")))
    assert result.nodes == 8
    assert [f.code for f in result.findings] == [Code.NODE_PER_GPU]


def test_a_gpu_in_no_group_and_a_group_without_its_gpu_are_named(tmp_path):
    cfg = config(tmp_path, [[0], [9]])
    result = plan(instances(cfg.hardware.node_per_gpu), detect(h100_host(tmp_path, 2)))
    codes = [f.code for f in result.findings]
    assert codes == [Code.NODE_PER_GPU, Code.GPU_ABSENT, Code.GPU_UNCLAIMED]
    assert "gpu9" in result.findings[1].text and "stays down" in result.findings[1].text


@pytest.mark.parametrize("gpus", [2, 4])
def test_each_instance_gets_its_own_gpu_by_uuid_and_its_memory(tmp_path, gpus):
    root = h100_host(tmp_path, gpus)
    cfg = config(tmp_path, [[n] for n in range(gpus)])
    for instance in instances(cfg.hardware.node_per_gpu):
        (minor,) = instance.minors
        sel = select_executable(cfg, root, instance)
        assert sel.accelerator is Accelerator.CUDA
        assert sel.env["CUDA_VISIBLE_DEVICES"] == uuid(minor)
        assert sel.memory.basis is MemoryBasis.GPU
        assert sel.env["OVERRIDE_MEMORY_MB"] == str(H100_OFFER_MB)
        assert not any(f.code == "one-gpu-computes" for f in sel.findings)


def test_a_group_of_two_sees_both_and_plans_with_the_first(tmp_path):
    root = h100_host(tmp_path, 4)
    cfg = config(tmp_path, [[0, 1], [2, 3]])
    second = instance_for(cfg, "gpu2-3")
    sel = select_executable(cfg, root, second)
    assert sel.env["CUDA_VISIBLE_DEVICES"] == f"{uuid(2)},{uuid(3)}"


def test_the_host_memory_limit_is_split_between_the_instances(tmp_path):
    root = h100_host(tmp_path, 4)
    cfg = config(tmp_path, [[n] for n in range(4)], memoryLimit="64G")
    sel = select_executable(cfg, root, instance_for(cfg, "gpu1"))
    assert sel.memory.basis is MemoryBasis.LIMIT
    assert sel.memory.limit_bytes == 16 * GiB


def _lose(root: Path, minor: int) -> None:
    """GPU ``minor`` falls off the bus: NVML no longer lists it, its node goes."""
    document = json.loads((root / "nvml.json").read_text())
    document["devices"][minor] = {"error": "GPU is lost"}
    (root / "nvml.json").write_text(json.dumps(document))


def test_a_vanished_gpu_takes_down_only_its_instance(tmp_path):
    root = h100_host(tmp_path, 3)
    _lose(root, 1)
    cfg = config(tmp_path, [[0], [1], [2]])
    with pytest.raises(UserError, match=r"gpu1: cuda unusable .*stays down"):
        select_executable(cfg, root, instance_for(cfg, "gpu1"))
    for name, minor in (("gpu0", 0), ("gpu2", 2)):
        sel = select_executable(cfg, root, instance_for(cfg, name))
        assert sel.accelerator is Accelerator.CUDA
        assert sel.env["CUDA_VISIBLE_DEVICES"] == uuid(minor)


def test_a_gpu_gone_from_the_bus_with_cpu_fallback_runs_that_instance_on_the_cpu(tmp_path):
    root = h100_host(tmp_path, 2)
    shutil.rmtree(root / "proc/driver/nvidia/gpus/0000:00:07.0")
    (root / "sys/bus/pci/devices/0000:00:07.0").unlink()
    (root / "dev/nvidia1").unlink()
    cfg = config(tmp_path, [[0], [1]], nodePerGpu={"cpuFallback": True})
    sel = select_executable(cfg, root, instance_for(cfg, "gpu1"))
    assert sel.accelerator is Accelerator.CPU
    assert sel.fallback_reason is CpuReason.VISIBLE_DEVICES_NONE
    assert sel.env["CUDA_VISIBLE_DEVICES"] == ""
    assert select_executable(cfg, root, instance_for(cfg, "gpu0")).accelerator is Accelerator.CUDA


def test_each_instance_has_its_own_directories_and_shares_the_models(tmp_path):
    root = h100_host(tmp_path, 2)
    cfg = config(tmp_path, [[0], [1]])
    first, second = instances(cfg.hardware.node_per_gpu)
    one, two = state_paths(cfg, first), state_paths(cfg, second)
    assert one["XDG_CACHE_HOME"] == "/var/cache/exo/instances/gpu0"
    assert one["XDG_DATA_HOME"] == "/var/lib/exo/instances/gpu0"
    assert one["EXO_RUNTIME_DIR"] == "/run/exo/gpu0"
    assert all(one[key] != two[key] for key in one)
    assert snapshot_path(cfg, first) != snapshot_path(cfg, second) != snapshot_path(cfg)
    launch = build_launch(cfg, "worker", base_env={}, root=root, instance=second)
    assert launch.env["EXO_DEFAULT_MODELS_DIR"] == "/var/lib/exo/models"
    assert launch.env["XDG_CACHE_HOME"] == two["XDG_CACHE_HOME"]


@pytest.mark.parametrize(
    ("document", "message"),
    [
        ({"hardware": {"nodePerGpu": {"enable": True}}}, "enable needs groups"),
        (
            {"hardware": {"nodePerGpu": {"enable": True, "groups": [[0], [1, 0]]}}},
            "GPU 0 is in two groups",
        ),
        ({"hardware": {"nodePerGpu": {"enable": True, "groups": [[]]}}}, "a group names no GPU"),
        ({"hardware": {"nodePerGpu": {"enable": True, "groups": [[256]]}}}, "less than or equal"),
        (
            {"mode": "master", "hardware": {"nodePerGpu": {"enable": True, "groups": [[0]]}}},
            "needs mode 'worker' or 'auto'",
        ),
        (
            {
                "networking": {"bondInterface": "bond0", "networkNamespace": "exo"},
                "hardware": {"nodePerGpu": {"enable": True, "groups": [[0]]}},
            },
            "remove networking.networkNamespace",
        ),
        (
            {"hardware": {"nodePerGpu": {"enable": True, "groups": [[0]], "addresses": ["a"]}}},
            "is not an IPv4 address with a prefix",
        ),
        (
            {
                "hardware": {
                    "nodePerGpu": {
                        "enable": True,
                        "groups": [[0], [1]],
                        "addresses": ["10.0.0.1/24"],
                    }
                }
            },
            "give one per group",
        ),
        (
            {
                "hardware": {
                    "nodePerGpu": {"enable": True, "groups": [[0]], "addresses": ["10.0.0.0/24"]}
                }
            },
            "not a host address",
        ),
        (
            {
                "hardware": {"nodePerGpu": {"enable": True, "groups": [[0]]}},
                "models": {"mlx-community/Llama-3.2-1B-Instruct-4bit": {}},
            },
            "modelReconciler.enable = false",
        ),
        (
            {
                "hardware": {"nodePerGpu": {"enable": True, "groups": [[0]]}},
                "exporter": {"enable": True},
            },
            "cannot be combined with exporter.enable",
        ),
    ],
)
def test_node_per_gpu_config_rules(document, message):
    base: dict[str, Any] = {"schemaVersion": 1, "networking": {"bondInterface": "bond0"}}
    with pytest.raises(UserError, match=message):
        parse_config({**base, **document})


def test_node_per_gpu_needs_the_cluster_interface():
    document = {"schemaVersion": 1, "hardware": {"nodePerGpu": {"enable": True, "groups": [[0]]}}}
    with pytest.raises(UserError, match=r"needs networking\.bondInterface"):
        parse_config(document)


def test_run_dry_run_of_one_instance(tmp_path, capsys):
    from exo_nixos.cli import main

    root = h100_host(tmp_path, 2)
    cfg = config(tmp_path, [[0], [1]])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_json()))
    common = ["run", "--config", str(path), "--host-root", str(root), "--dry-run"]
    assert main([*common, "--instance", "gpu1"]) == 0
    out = capsys.readouterr().out
    assert f"CUDA_VISIBLE_DEVICES={uuid(1)}" in out
    assert "XDG_CACHE_HOME=/var/cache/exo/instances/gpu1" in out
    assert main([*common, "--instance", "gpu7"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not a configured instance" in err


def test_preflight_of_an_instance_checks_its_gpu(tmp_path, capsys):
    from exo_nixos.cli import main

    root = h100_host(tmp_path, 2)
    _lose(root, 1)
    cfg = config(tmp_path, [[0], [1]])
    path = tmp_path / "config.json"
    path.write_text(json.dumps(cfg.to_json()))
    common = ["preflight", "--config", str(path), "--root", str(root), "--json"]
    main([*common, "--instance", "gpu0"])
    first = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert first["gpu0 GPU"]["status"] == "ok"
    assert uuid(0) in first["gpu0 GPU"]["reason"]
    assert "gpu0 namespace" not in first, "the namespace is only looked at on the live host"
    assert main([*common, "--instance", "gpu1"]) == 1
    second = {r["check"]: r for r in json.loads(capsys.readouterr().out)}
    assert second["gpu1 GPU"]["status"] == "fail"
    assert "cpuFallback" in second["gpu1 GPU"]["fix"]


def test_each_instance_keeps_its_own_oom_record(tmp_path):
    root = h100_host(tmp_path, 2)
    packages = {"cuda": variant(tmp_path, "cuda"), "cpu": variant(tmp_path, "cpu")}
    cfg = parse_config(
        {
            "schemaVersion": 1,
            "networking": {"bondInterface": "bond0"},
            "security": {"dataDir": str(tmp_path / "data")},
            "hardware": {
                "packages": packages,
                "nodePerGpu": {"enable": True, "groups": [[0], [1]]},
            },
        }
    )
    first, second = instances(cfg.hardware.node_per_gpu)
    data_dir = instance_dirs(cfg, first)[0]
    assert data_dir.startswith(str(tmp_path))
    # the first node was killed for lack of memory: only its next start offers less
    oom.record_stop(oom.record_path(data_dir), oom.OOM_RESULT)
    one = build_launch(cfg, "worker", base_env={}, root=root, instance=first)
    two = build_launch(cfg, "worker", base_env={}, root=root, instance=second)
    assert one.memory_mb is not None and two.memory_mb is not None
    assert one.memory_mb < two.memory_mb
