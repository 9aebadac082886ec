"""scripts/capture-hw-tree: a captured tree diagnoses the same as the machine it came from."""

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.hardware import HardwareSettings, decide, detect, to_json
from tests.hardware.conftest import fixture

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "capture-hw-tree"


def capture(source, out, *extra):
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(out), "--source", str(source), *extra],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )


def _comparable(root):
    inventory = detect(root)
    data = to_json(inventory)
    data.pop("root")
    data.pop("disk")
    return data, decide(HardwareSettings(), inventory).reasons


@pytest.mark.parametrize(
    "name",
    [
        "nvidia-rtx4090-desktop",
        "amd-instinct-mi250x",
        "amd-radeon-7900xtx",
        "intel-arc-a770",
        "cpu-vm-cgroup",
        "apple-m2-max-asahi",
        "bmc-only-server",
    ],
)
def test_capture_of_a_tree_detects_the_same(tmp_path, name):
    out = tmp_path / "captured"
    result = capture(fixture(name), out)
    assert f"files into {out}" in result.stdout
    assert _comparable(out) == _comparable(fixture(name))


def test_capture_records_nvml_failure_for_replay(tmp_path):
    out = tmp_path / "captured"
    capture(fixture("nvidia-rtx4090-desktop"), out, "--nvml")
    document = json.loads((out / "nvml.json").read_text())
    if "initError" not in document:
        pytest.skip("NVML answers on this machine; the replay test below covers success")
    inventory = detect(out)
    assert inventory.nvml == f"unavailable: {document['initError']}"


def test_capture_refuses_an_existing_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(tmp_path)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert "exists" in result.stderr


def test_capture_into_a_directory_that_cannot_be_made(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), str(blocker / "tree")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith(f"capture-hw-tree: cannot create {blocker / 'tree'}: ")
    assert len(result.stderr.splitlines()) == 1


def _seen(root: Path) -> dict[str, Any]:
    """What detection makes of ``root`` (NVML not asked), with the root cut from warnings."""
    data = to_json(detect(root, use_nvml=False))
    data.pop("root")
    data.pop("disk")
    data["warnings"] = [w.replace(str(root), "<root>") for w in data["warnings"]]
    return data


FIXTURE_NAMES = sorted(p.name for p in fixture("cpu-vm-cgroup").parent.iterdir() if p.is_dir())


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_capture_holds_what_detection_reads(tmp_path, name):
    """The capture is what the reader recorded: detection of the copy, warnings included,
    is detection of the original, for every fixture."""
    out = tmp_path / "captured"
    capture(fixture(name), out)
    assert _seen(out) == _seen(fixture(name))


def test_capture_of_entries_that_are_not_directories(tmp_path):
    """A sandbox's /sys can list PCI devices as plain files (seen on a real H100 host in
    gVisor): the copy lists them too, so it warns as the machine did."""
    source = tmp_path / "source"
    shutil.copytree(fixture("cpu-vm-cgroup"), source, symlinks=True)
    devices = source / "sys/bus/pci/devices"
    devices.mkdir(parents=True, exist_ok=True)
    (devices / "0000:7f:00.0").write_text("")
    out = tmp_path / "captured"
    capture(source, out)
    seen = _seen(out)
    assert any("0000:7f:00.0/class: unreadable" in w for w in seen["warnings"]), seen["warnings"]
    assert seen == _seen(source)
