"""scripts/check-nvidia-host: sysfs, NVML, nvidia-smi and the CUDA driver API compared.

nvidia-smi and libcuda are stand-ins here (a script printing nvidia-smi's CSV, and a C library
with the driver API calls the check makes, built with the system compiler): the real ones
need an NVIDIA host (docs/hardware.md, "Checking a real NVIDIA host").
"""

import importlib.util
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
from importlib.machinery import SourceFileLoader
from pathlib import Path

import pytest

from tests.hardware.conftest import fixture

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check-nvidia-host"
FAKE_LIBCUDA = Path(__file__).resolve().parent / "native" / "fake_libcuda.c"
MiB = 1 << 20


def _load_script():
    loader = SourceFileLoader("check_nvidia_host", str(SCRIPT))
    spec = importlib.util.spec_from_loader(loader.name, loader)
    assert spec is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[loader.name] = module  # dataclasses look their module up there
    loader.exec_module(module)
    return module


check = _load_script()


def run(*args, env=None):
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(REPO / "src"), **(env or {})},
        check=False,
    )


def dgx_devices():
    return json.loads((fixture("nvidia-dgx-h100") / "nvml.json").read_text())["devices"]


def dgx_views():
    sysfs, nvml, accelerator, _ = check.sysfs_and_nvml(fixture("nvidia-dgx-h100"))
    return {"sysfs": sysfs, "nvml": nvml}, accelerator


# --- the whole script on captured trees --------------------------------------------------


def test_dgx_tree_agrees(tmp_path):
    report = tmp_path / "check.json"
    done = run("--root", str(fixture("nvidia-dgx-h100")), "--json", str(report))
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[-1] == "agree: 8 GPU(s), cuda"
    assert "note: smi: not asked (only on the live root)" in done.stdout
    assert "sysfs  0000:1b:00.0" in done.stdout
    assert "nvml   0000:1b:00.0       81559  9.0   NVIDIA H100 80GB HBM3 / GPU-4c2b7a0e" in (
        done.stdout
    )
    document = json.loads(report.read_text())
    assert document["problems"] == [] and document["accelerator"] == "cuda"
    assert document["views"]["nvml"]["0000:df:00.0"]["memory_bytes"] == 85520809984


def test_gpu_lost_to_nvml_is_a_disagreement(tree_copy):
    root = tree_copy("nvidia-dgx-h100")
    recorded = json.loads((root / "nvml.json").read_text())
    recorded["devices"][3] = {"error": "GPU is lost"}
    (root / "nvml.json").write_text(json.dumps(recorded))
    done = run("--root", str(root))
    assert done.returncode == 1
    assert "DISAGREE: nvml does not list 0000:61:00.0" in done.stdout.splitlines()


def test_driver_library_mismatch_is_a_disagreement(tree_copy):
    root = tree_copy("nvidia-rtx4090-desktop")
    recorded = {"initError": "Driver/library version mismatch", "initErrorCode": 18}
    (root / "nvml.json").write_text(json.dumps({**recorded, "devices": []}))
    done = run("--root", str(root))
    assert done.returncode == 1
    lines = done.stdout.splitlines()
    assert "DISAGREE: detect chose cpu, not cuda" in lines
    assert "DISAGREE: nvml does not list 0000:01:00.0" in lines
    assert any(line.startswith("note: because: no working CUDA device (") for line in lines)


def test_a_root_that_is_not_a_directory(tmp_path):
    done = run("--root", str(tmp_path / "nowhere"))
    assert done.returncode == 2
    assert done.stderr == f"check-nvidia-host: {tmp_path / 'nowhere'} is not a directory\n"


def test_a_tree_without_nvidia_gpus_has_nothing_to_compare():
    done = run("--root", str(fixture("amd-radeon-7900xtx")))
    assert done.returncode == 1
    assert "DISAGREE: no GPU is bound to the nvidia driver: nothing to compare" in done.stdout


# --- nvidia-smi ---------------------------------------------------------------------------


def fake_smi(tmp_path, lines, code=0):
    script = tmp_path / "nvidia-smi"
    body = "".join(f"echo {shlex.quote(line)}\n" for line in lines)
    script.write_text(f"#!/bin/sh\n{body}exit {code}\n")
    script.chmod(0o755)
    return str(script)


def smi_lines(devices, memory_shift_mib=0):
    return [
        f"{d['busId']}, {d['name']}, {d['uuid']}, "
        f"{d['memoryTotal'] // MiB + memory_shift_mib}, {d['computeCapability'][0]}."
        f"{d['computeCapability'][1]}"
        for d in devices
    ]


def test_nvidia_smi_that_agrees(tmp_path):
    views, accelerator = dgx_views()
    views["smi"] = check.smi_view(fake_smi(tmp_path, smi_lines(dgx_devices())))
    assert len(views["smi"]) == 8
    assert check.compare(views, accelerator) == []


def test_nvidia_smi_with_other_memory(tmp_path):
    views, accelerator = dgx_views()
    views["smi"] = check.smi_view(fake_smi(tmp_path, smi_lines(dgx_devices()[:1], -1024)))
    problems = check.compare(views, accelerator)
    assert "0000:1b:00.0: nvidia-smi says 80535 MiB, NVML 81559 MiB" in problems
    assert "smi does not list 0000:43:00.0, 0000:52:00.0, 0000:61:00.0, 0000:9d:00.0, " in (
        problems[0] + ", "
    )


def test_nvidia_smi_without_the_driver(tmp_path):
    said = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."
    smi = fake_smi(tmp_path, [said], code=9)
    with pytest.raises(
        check.ProbeError, match=r"/nvidia-smi exited 9: NVIDIA-SMI has failed because"
    ):
        check.smi_view(smi)


def test_nvidia_smi_output_that_is_not_the_csv_asked_for(tmp_path):
    with pytest.raises(check.ProbeError, match="unexpected line 'No devices were found'"):
        check.smi_view(fake_smi(tmp_path, ["No devices were found"]))


# --- the CUDA driver API ------------------------------------------------------------------


@pytest.fixture(scope="module")
def libcuda(tmp_path_factory):
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the libcuda stand-in (apt-get install gcc)")
    out = tmp_path_factory.mktemp("libcuda") / "libcuda.so.1"
    subprocess.run(
        [compiler, "-shared", "-fPIC", "-O1", "-o", str(out), str(FAKE_LIBCUDA)], check=True
    )
    return str(out)


def cuda_spec(devices, reserved_mib=554):
    return ";".join(
        f"{d['busId'][4:]}|{d['name']}|{d['uuid'][4:].replace('-', '')}|"
        f"{d['memoryTotal'] - reserved_mib * MiB}|{d['computeCapability'][0]}|"
        f"{d['computeCapability'][1]}"
        for d in devices
    )


def test_cuda_driver_api_that_agrees(libcuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_DEVICES", cuda_spec(dgx_devices()))
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")  # the probe must see every GPU anyway
    views, accelerator = dgx_views()
    views["cuda"] = check.cuda_view(libcuda)
    first = views["cuda"]["0000:1b:00.0"]
    assert first.uuid == "GPU-4c2b7a0e-6f1d-2b93-5e1a-0f3c9d7e81a4"
    assert first.compute == "9.0" and first.memory_bytes == 85520809984 - 554 * MiB
    assert check.compare(views, accelerator) == []


def test_cuda_total_above_nvml_or_far_below_disagrees(libcuda, monkeypatch):
    devices = dgx_devices()
    spec = ";".join(
        [cuda_spec(devices[:1], -1), cuda_spec(devices[1:2], 4096), cuda_spec(devices[2:])]
    )
    monkeypatch.setenv("FAKE_CUDA_DEVICES", spec)
    views, accelerator = dgx_views()
    views["cuda"] = check.cuda_view(libcuda)
    problems = check.compare(views, accelerator)
    assert problems == [
        "0000:1b:00.0: CUDA's total 81560 MiB is not within 3% below NVML's 81559 MiB",
        "0000:43:00.0: CUDA's total 77463 MiB is not within 3% below NVML's 81559 MiB",
    ]


def test_cuda_names_a_gpu_differently(libcuda, monkeypatch):
    devices = dgx_devices()
    renamed = [{**devices[0], "uuid": "GPU-00000000-0000-0000-0000-000000000000"}, *devices[1:]]
    monkeypatch.setenv("FAKE_CUDA_DEVICES", cuda_spec(renamed))
    views, accelerator = dgx_views()
    views["cuda"] = check.cuda_view(libcuda)
    (problem,) = check.compare(views, accelerator)
    assert problem.startswith("0000:1b:00.0: uuid differs: sysfs 'GPU-4c2b7a0e-")
    assert problem.endswith("cuda 'GPU-00000000-0000-0000-0000-000000000000'")


def test_cuda_that_finds_no_device(libcuda, monkeypatch):
    monkeypatch.setenv("FAKE_CUDA_INIT_ERROR", "100")
    with pytest.raises(check.ProbeError) as error:
        check.cuda_view(libcuda)
    assert str(error.value) == (
        "cuInit failed with CUDA error 100 (no CUDA-capable device is detected)"
    )


def test_cuda_library_that_is_not_there(tmp_path):
    with pytest.raises(check.ProbeError, match=r"libcuda\.so\.1 could not be loaded: "):
        check.cuda_view(str(tmp_path / "libcuda.so.1"))


# --- scripts/nvidia-host-report: the one run on a real host --------------------------------


def test_host_report_writes_every_file_and_each_step_status(tmp_path):
    out = tmp_path / "report"
    done = subprocess.run(
        [str(REPO / "scripts" / "nvidia-host-report"), str(out), "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "PYTHON": sys.executable},
        check=False,
    )
    names = {"tree.tar.gz", "check.txt", "check.json", "detect.json", "bench.txt", "summary.txt"}
    assert {p.name for p in out.iterdir()} == names
    summary = (out / "summary.txt").read_text().splitlines()
    steps = dict(line.split(": exit ") for line in summary if ": exit " in line)
    assert list(steps) == ["capture", "archive", "check", "detect", "bench"]
    assert steps["capture"] == steps["archive"] == steps["detect"] == steps["bench"] == "0"
    detected = json.loads((out / "detect.json").read_text())
    nvidia_here = any(g["driver"] == "nvidia" for g in detected["inventory"]["gpus"])
    assert done.returncode == (0 if steps["check"] == "0" else 1)
    if not nvidia_here:
        assert steps["check"] == "1"
        assert "DISAGREE: no GPU is bound to the nvidia driver" in (out / "check.txt").read_text()
    with tarfile.open(out / "tree.tar.gz") as archive:
        members = archive.getnames()
    assert "tree/proc/cpuinfo" in members and "tree/nvml.json" in members
    assert "wall ms" in (out / "bench.txt").read_text()


def test_host_report_needs_an_outdir():
    done = subprocess.run(
        [str(REPO / "scripts" / "nvidia-host-report")], capture_output=True, text=True, check=False
    )
    assert done.returncode == 2
    assert done.stderr.startswith("usage: scripts/nvidia-host-report OUTDIR")


def test_unified_memory_gpu_agrees_with_nvidia_smi_and_cuda(tmp_path, libcuda, monkeypatch):
    # DGX Spark: nvidia-smi prints [N/A] for memory, CUDA's total is the system's memory
    sysfs, nvml, accelerator, _ = check.sysfs_and_nvml(fixture("nvidia-dgx-spark-gb10"))
    uuid = "GPU-5b8e2f41-0c7d-4a93-b6e1-d29f3a70c846"
    line = f"0000000F:01:00.0, NVIDIA GB10, {uuid}, [N/A], 12.1"
    system = 127598748 * 1024
    monkeypatch.setenv(
        "FAKE_CUDA_DEVICES", f"000F:01:00.0|NVIDIA GB10|{uuid[4:].replace('-', '')}|{system}|12|1"
    )
    views = {
        "sysfs": sysfs,
        "nvml": nvml,
        "smi": check.smi_view(fake_smi(tmp_path, [line])),
        "cuda": check.cuda_view(libcuda),
    }
    assert views["smi"]["000f:01:00.0"].memory_bytes is None
    assert views["cuda"]["000f:01:00.0"].memory_bytes == nvml["000f:01:00.0"].memory_bytes
    assert check.compare(views, accelerator) == []


def test_a_json_report_into_a_missing_directory(tmp_path):
    target = tmp_path / "nowhere" / "check.json"
    done = run("--root", str(fixture("nvidia-dgx-h100")), "--json", str(target))
    assert done.returncode == 2
    assert done.stderr == f"check-nvidia-host: {target.parent} is not a directory\n"
