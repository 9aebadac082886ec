"""scripts/check-node-per-gpu against multi-GPU trees (its plan part; --live needs a real host)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from tests.hardware.multigpu import h100_host

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "check-node-per-gpu"


def _check(tmp: Path, root: Path, groups: list[list[int]]) -> subprocess.CompletedProcess[str]:
    packages = {}
    for name in ("cuda", "cpu"):
        exe = tmp / name / "bin" / "exo"
        exe.parent.mkdir(parents=True, exist_ok=True)
        exe.write_text("#!/bin/sh\n")
        exe.chmod(0o755)
        packages[name] = str(exe.parent.parent)
    config = tmp / "config.json"
    config.write_text(
        json.dumps(
            {
                "schemaVersion": 1,
                "networking": {"bondInterface": "bond0"},
                "hardware": {
                    "packages": packages,
                    "nodePerGpu": {"enable": True, "groups": groups},
                },
            }
        )
    )
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--config", str(config), "--root", str(root)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=60,
    )


def test_every_gpu_its_own_node(tmp_path: Path) -> None:
    done = _check(tmp_path, h100_host(tmp_path, 3), [[0], [1], [2]])
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.count("cuda, plans with 64 GiB of GPU memory") == 3


def test_a_group_naming_an_absent_gpu_disagrees(tmp_path: Path) -> None:
    done = _check(tmp_path, h100_host(tmp_path, 2), [[0], [5]])
    assert done.returncode == 1
    assert "DISAGREE: gpu5: no GPU with device minor(s) [5] on this host" in done.stdout
