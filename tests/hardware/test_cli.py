"""``exo-nixos detect`` as a real process: output forms, config, start-up imports."""

import json
import subprocess
import sys

import pytest

from tests.hardware.conftest import fixture


def run(*args, check=True):
    result = subprocess.run(
        [sys.executable, "-m", "exo_nixos", "detect", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    if check:
        assert result.returncode == 0, result.stderr
    return result


def test_json_holds_inventory_and_decision():
    data = json.loads(run("--json", "--root", str(fixture("nvidia-dgx-h100"))).stdout)
    assert data["decision"]["accelerator"] == "cuda"
    assert len(data["decision"]["devices"]) == 8
    assert data["inventory"]["nvml"].startswith("ok")
    assert len(data["inventory"]["gpus"]) == 9


def test_env_lines_for_an_environment_file():
    out = run("--env", "--root", str(fixture("cpu-vm-cgroup"))).stdout
    assert out.splitlines() == ["EXO_NIXOS_ACCELERATOR=cpu", "OVERRIDE_MEMORY_MB=12288"]


def test_env_with_config_names_the_executable(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "schemaVersion": 1,
                "hardware": {
                    "packages": {
                        "cpu": "/nix/store/aaaa-exo-1.0.71",
                        "cuda": "/nix/store/bbbb-exo-cuda-1.0.71",
                    },
                    "visibleDevices": ["0"],
                },
            }
        )
    )
    root = str(fixture("nvidia-rtx4090-desktop"))
    out = run("--env", "--root", root, "--config", str(config)).stdout
    assert out.splitlines() == [
        "EXO_NIXOS_ACCELERATOR=cuda",
        "EXO_NIXOS_EXECUTABLE=/nix/store/bbbb-exo-cuda-1.0.71/bin/exo",
        "CUDA_DEVICE_ORDER=PCI_BUS_ID",
        "CUDA_VISIBLE_DEVICES=GPU-7f3a1c2e-94b8-6d05-e2f1-3c8a9b0d4e57",
    ]


def test_text_report_explains_the_choice():
    out = run("--root", str(fixture("amd-instinct-mi250x"))).stdout
    assert "GPU 0000:c1:00.0 1002:740c AMD Instinct MI250X/MI250" in out
    assert "gfx90a" in out
    assert "Accelerator: cpu" in out
    assert "EXO has no ROCm backend: using cpu" in out


def test_warnings_go_to_stderr_in_env_mode(tmp_path):
    result = run("--env", "--root", str(tmp_path))
    assert result.stdout == "EXO_NIXOS_ACCELERATOR=cpu\n"
    assert f"exo-nixos: warning: {tmp_path}/proc/cpuinfo: missing" in result.stderr


def test_bad_root_is_a_one_line_error(tmp_path):
    result = run("--root", str(tmp_path / "nope"), check=False)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0
    assert "not a directory" in result.stderr


def test_bad_config_is_a_one_line_error(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "hardware": {"preferredAccelerator": "tpu"}}')
    result = run("--config", str(config), "--root", str(fixture("bmc-only-server")), check=False)
    assert result.returncode == 2
    assert "hardware.preferredAccelerator" in result.stderr
    assert "Traceback" not in result.stderr


IMPORT_CHECK = """
import sys
from exo_nixos.cli import main
code = main(sys.argv[1:])
loaded = [m for m in ("pydantic", "pynvml") if m in sys.modules]
print("imported:" + ",".join(loaded), file=sys.stderr)
sys.exit(code)
"""


def imported(*args):
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_CHECK, "detect", "--json", *args],
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("imported:"), result.stderr
    return set(filter(None, last.removeprefix("imported:").split(",")))


@pytest.mark.parametrize(
    "name", ["amd-instinct-mi250x", "bmc-only-server", "nvidia-dgx-h100", "cpu-vm-cgroup"]
)
def test_start_path_imports_neither_pydantic_nor_pynvml_for_trees(name):
    assert imported("--root", str(fixture(name))) == set()


def test_live_detection_imports_pynvml_only_for_nvidia_bound_gpus():
    live = json.loads(run("--json").stdout)
    nvidia_bound = any(g["driver"] == "nvidia" for g in live["inventory"]["gpus"])
    assert ("pynvml" in imported()) == nvidia_bound
    assert "pynvml" not in imported("--no-nvml")


def test_config_imports_pydantic(tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1}')
    assert "pydantic" in imported(
        "--config", str(config), "--root", str(fixture("bmc-only-server"))
    )
