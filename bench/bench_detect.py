"""Median wall time of ``exo-nixos detect`` (it runs at every service start).

Each run is a fresh process, timed from spawn to exit, so interpreter start-up and imports
count. Cases: this machine without NVML, this machine with NVML (only where a GPU is bound to
the nvidia driver), captured fixture trees, and the DGX tree through the real pynvml (its
import and nvmlInit: a failing one without libnvidia-ml.so.1, a real one on an NVIDIA host).
Usage: python bench/bench_detect.py [-n 30]
"""

from __future__ import annotations

import argparse
import json
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

FIXTURES = Path(__file__).resolve().parent.parent / "tests" / "fixtures" / "hardware"


def command() -> list[str]:
    script = Path(sys.executable).with_name("exo-nixos")
    if script.exists():
        return [str(script)]
    found = shutil.which("exo-nixos")
    return [found] if found else [sys.executable, "-m", "exo_nixos"]


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def medians_ms(cases: list[list[str]], runs: int) -> list[tuple[float, float]]:
    """Median wall and CPU (user + system) time per case, in milliseconds.

    Round-robin over the cases, so load changes on the machine hit every case alike. The CPU
    time of a single-threaded child hardly depends on other load, so it shows what the wall
    time would be on an idle machine (less I/O waits).
    """
    for argv in cases:
        subprocess.run(argv, capture_output=True, check=True)  # warm the page cache
    wall: list[list[float]] = [[] for _ in cases]
    cpu: list[list[float]] = [[] for _ in cases]
    for _ in range(runs):
        for index, argv in enumerate(cases):
            cpu_before = _cpu_seconds()
            start = time.perf_counter()
            subprocess.run(argv, capture_output=True, check=True)
            wall[index].append(time.perf_counter() - start)
            cpu[index].append(_cpu_seconds() - cpu_before)
    return [
        (statistics.median(w) * 1000, statistics.median(c) * 1000)
        for w, c in zip(wall, cpu, strict=True)
    ]


def compile_bytecode() -> None:
    """Write the package's bytecode, as a Nix-built package ships it."""
    import compileall
    import os

    import exo_nixos

    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(Path(exo_nixos.__file__).parent, quiet=1)


def nvidia_bound(base: list[str]) -> bool:
    out = subprocess.run([*base, "detect", "--json", "--no-nvml"], capture_output=True, check=True)
    gpus = json.loads(out.stdout)["inventory"]["gpus"]
    return any(g["driver"] == "nvidia" for g in gpus)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("-n", "--runs", type=int, default=30)
    args = parser.parse_args()
    base = command()
    cases: list[tuple[str, list[str]]] = [
        ("python -c pass (interpreter start, for scale)", [sys.executable, "-c", "pass"]),
        ("exo-nixos --version (CLI start, no command imported)", [*base, "--version"]),
        ("detect --env, this machine, --no-nvml", [*base, "detect", "--env", "--no-nvml"]),
    ]
    if nvidia_bound(base):
        cases.append(("detect --env, this machine, with NVML", [*base, "detect", "--env"]))
    else:
        print("# no GPU bound to the nvidia driver here: the with-NVML case is not measured")
    for name in ("nvidia-dgx-h100", "cpu-vm-cgroup"):
        root = str(FIXTURES / name)
        cases.append(
            (
                f"detect --env --root {name} --no-nvml",
                [*base, "detect", "--env", "--no-nvml", "--root", root],
            )
        )
    cases.append(
        (
            "detect --env --root nvidia-dgx-h100 (recorded NVML replayed)",
            [*base, "detect", "--env", "--root", str(FIXTURES / "nvidia-dgx-h100")],
        )
    )
    # The library call without the CLI, with and without the real pynvml: the difference is
    # what NVML costs on this machine (import and nvmlInit; a failing nvmlInit without a GPU).
    dgx = str(FIXTURES / "nvidia-dgx-h100")
    snippet = (
        "from pathlib import Path\n"
        "from exo_nixos.hardware import detect\n"
        "from exo_nixos.hardware.nvml import load_pynvml\n"
        f"detect(Path({dgx!r}), {{}})\n"
    )
    for label, arguments in (
        ("use_nvml=False", "use_nvml=False"),
        ("through the real pynvml", "nvml_loader=load_pynvml"),
    ):
        cases.append(
            (
                f"detect() on nvidia-dgx-h100, {label}",
                [sys.executable, "-c", snippet.replace("{}", arguments)],
            )
        )
    cases.append(
        (
            "detect --json --root nvidia-dgx-h100 --no-nvml",
            [*base, "detect", "--json", "--no-nvml", "--root", str(FIXTURES / "nvidia-dgx-h100")],
        )
    )
    compile_bytecode()
    print(f"# {args.runs} runs each, median wall time, {' '.join(base)}")
    print(f"# load average before: {Path('/proc/loadavg').read_text().split()[0]}")
    results = medians_ms([argv for _, argv in cases], args.runs)
    print("    wall ms    cpu ms  case")
    for (label, _), (wall, cpu) in zip(cases, results, strict=True):
        print(f"{wall:9.1f} {cpu:9.1f}  {label}")


if __name__ == "__main__":
    main()
