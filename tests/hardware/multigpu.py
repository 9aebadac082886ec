"""Multi-GPU host trees for tests, grown from the real H100 capture.

``h100_host(tmp, n)`` copies ``nvidia-h100-real`` and adds GPUs 1..n-1 as more H100s at the
next PCI slots: each its own sysfs device, ``/proc/driver/nvidia`` entry (device minor, UUID),
``/dev/nvidia<N>`` and NVML answer. The first GPU is the captured one, unchanged.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tests.hardware.conftest import fixture

FIRST = "0000:00:06.0"


def address(index: int) -> str:
    return f"0000:00:{6 + index:02x}.0"


def uuid(index: int) -> str:
    return "GPU-c159fef9-8185-a8d8-349e-7d57bf9f5a3b" if index == 0 else f"GPU-test-{index:04d}"


def h100_host(tmp: Path, gpus: int) -> Path:
    root = tmp / f"h100x{gpus}"
    shutil.copytree(fixture("nvidia-h100-real"), root, symlinks=True)
    devices = root / "sys/devices/pci0000:00"
    proc = root / "proc/driver/nvidia/gpus"
    info = (proc / FIRST / "information").read_text()
    nvml = json.loads((root / "nvml.json").read_text())
    for index in range(1, gpus):
        addr = address(index)
        shutil.copytree(devices / FIRST, devices / addr, symlinks=True)
        (root / "sys/bus/pci/devices" / addr).symlink_to(f"../../../devices/pci0000:00/{addr}")
        (proc / addr).mkdir()
        (proc / addr / "information").write_text(
            info.replace(FIRST, addr)
            .replace(uuid(0), uuid(index))
            .replace("Device Minor: \t 0", f"Device Minor: \t {index}")
        )
        (root / f"dev/nvidia{index}").touch()
        device = dict(nvml["devices"][0])
        device.update(busId=f"0000{addr}", uuid=uuid(index))
        nvml["devices"].append(device)
    (root / "nvml.json").write_text(json.dumps(nvml))
    return root
