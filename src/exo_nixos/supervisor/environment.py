"""From the config to EXO's command line and environment.

Upstream facts this relies on (exo's ``main.py`` and ``shared/constants.py``): state lives under
``$XDG_{CONFIG,DATA,CACHE}_HOME/exo``; models go to ``EXO_DEFAULT_MODELS_DIR`` plus the colon
lists ``EXO_MODELS_DIRS`` and ``EXO_MODELS_READ_ONLY_DIRS``; ``OVERRIDE_MEMORY_MB`` is the memory
EXO plans with; ``EXO_RUNTIME_DIR`` marks a service run; there is no log-level variable, only
``-v`` (any verbosity selects debug output); ``--legacy-daemon`` must never be used under systemd.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from exo_nixos.config import Accelerator, Config, MemoryLimit, Mode

MASTER = "master"
WORKER = "worker"
ROLES = (MASTER, WORKER)
SUPERVISOR_STATE = "exo-nixos"  # our own sub-directory of the state directory


@dataclass(frozen=True)
class Selection:
    """The EXO executable to run and why."""

    accelerator: Accelerator
    executable: str
    reasons: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None  # set when the wanted accelerator could not be used


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str]
    selection: Selection
    memory_mb: int | None


def role_for(config: Config) -> str:
    return MASTER if config.mode is Mode.MASTER else WORKER


def _xdg_home(directory: str) -> str:
    """The XDG base under which EXO's own ``exo`` sub-directory is ``directory`` itself.

    EXO appends ``/exo``: for ``/var/lib/exo`` the base is ``/var/lib``. Any other name gets
    EXO's files one level down (``/srv/ai`` -> ``/srv/ai/exo``).
    """
    path = Path(directory)
    return str(path.parent) if path.name == "exo" else str(path)


def state_paths(config: Config) -> dict[str, str]:
    sec = config.security
    return {
        "XDG_DATA_HOME": _xdg_home(sec.data_dir),
        "XDG_CACHE_HOME": _xdg_home(sec.cache_dir),
        # config.toml is touched at start; the configuration directory itself stays read-only
        "XDG_CONFIG_HOME": str(Path(sec.data_dir) / "config"),
        "EXO_RUNTIME_DIR": sec.runtime_dir,
    }


def snapshot_path(config: Config) -> Path:
    return Path(config.security.data_dir) / SUPERVISOR_STATE / "topology.json"


# ---------------------------------------------------------------------------------------------
# memory


def physical_memory_bytes(root: Path = Path("/")) -> int | None:
    try:
        for line in (root / "proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def cgroup_memory_limit(root: Path = Path("/")) -> int | None:
    """The tightest ``memory.max`` on this process's cgroup v2 path, or None if unlimited."""
    try:
        lines = (root / "proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    rel = next((line[3:] for line in lines if line.startswith("0::")), None)
    if rel is None:
        return None
    base = root / "sys/fs/cgroup"
    current = base / rel.lstrip("/")
    limits: list[int] = []
    while True:
        try:
            text = (current / "memory.max").read_text().strip()
        except OSError:
            text = "max"
        if text.isdigit():
            limits.append(int(text))
        if current == base or base not in current.parents:
            break
        current = current.parent
    return min(limits) if limits else None


def override_memory_mb(config: Config, root: Path = Path("/")) -> int | None:
    """What EXO should believe it has: the configured limit, capped by the cgroup's limit.

    None when neither a limit is configured nor the cgroup is tighter than physical memory
    (EXO then measures for itself).
    """
    total = physical_memory_bytes(root)
    candidates: list[int] = []
    if config.hardware.memory_limit is not None:
        limit = MemoryLimit.parse(config.hardware.memory_limit)
        if limit.percent is not None and total is None:
            pass  # a share of an unknown total: leave it to the cgroup limit
        else:
            candidates.append(limit.resolve(total or 0))
    cgroup = cgroup_memory_limit(root)
    if cgroup is not None and (total is None or cgroup < total):
        candidates.append(cgroup)
    if total is not None and candidates:
        candidates.append(total)
    if not candidates:
        return None
    return max(1, min(candidates) >> 20)


# ---------------------------------------------------------------------------------------------
# accelerator


def _device_present(accelerator: Accelerator, root: Path) -> tuple[bool, str]:
    dev = root / "dev"
    if accelerator is Accelerator.CUDA:
        if not (dev / "nvidiactl").exists():
            return False, "no /dev/nvidiactl (NVIDIA driver not loaded or GPU gone)"
        if not any(dev.glob("nvidia[0-9]*")):
            return False, "no /dev/nvidiaN device (no NVIDIA GPU visible)"
        return True, "NVIDIA device nodes present"
    if accelerator is Accelerator.ROCM:
        if not (dev / "kfd").exists():
            return False, "no /dev/kfd (amdgpu/ROCm driver not loaded or GPU gone)"
        return True, "/dev/kfd present"
    if accelerator is Accelerator.MLX:
        return False, "MLX on Metal needs Apple Silicon under macOS, not Linux"
    return True, "CPU is always available"


def select_executable(config: Config, root: Path = Path("/")) -> Selection:
    """Choose the EXO variant to start; fall back to the CPU variant when the GPU is unusable.

    Wanted: ``hardware.preferredAccelerator``, else the only GPU variant installed, else CPU.
    The wanted variant is used when its executable exists and its devices are present.
    """
    hw = config.hardware
    installed = [a for a in hw.packages if a is not Accelerator.CPU]
    wanted = hw.preferred_accelerator or (installed[0] if len(installed) == 1 else Accelerator.CPU)
    reasons: list[str] = []
    if wanted is not Accelerator.CPU:
        executable = hw.executable(wanted)
        usable, why = _device_present(wanted, root)
        if executable is None:
            problem = f"no {wanted.value} variant installed (hardware.packages)"
        elif not executable.exists():
            problem = f"{executable} does not exist"
        elif not usable:
            problem = why
        else:
            reasons.append(f"{wanted.value}: {why}")
            return Selection(wanted, str(executable), reasons, _accelerator_env(config, wanted))
        reasons.append(f"{wanted.value} unusable: {problem}")
        cpu = _cpu_executable(config)
        return Selection(
            Accelerator.CPU,
            cpu,
            [*reasons, f"cpu: falling back to {cpu}"],
            _accelerator_env(config, Accelerator.CPU),
            fallback=f"{wanted.value} unusable ({problem}); running on CPU",
        )
    cpu = _cpu_executable(config)
    return Selection(
        Accelerator.CPU, cpu, [f"cpu: {cpu}"], _accelerator_env(config, Accelerator.CPU)
    )


def _cpu_executable(config: Config) -> str:
    executable = config.hardware.executable(Accelerator.CPU)
    if executable is not None:
        return str(executable)
    found = shutil.which("exo")
    return found or "exo"


def _accelerator_env(config: Config, accelerator: Accelerator) -> dict[str, str]:
    env: dict[str, str] = {}
    hw = config.hardware
    if accelerator is Accelerator.CUDA and hw.visible_devices is not None:
        env["CUDA_VISIBLE_DEVICES"] = ",".join(hw.visible_devices)
    if accelerator is Accelerator.ROCM:
        if hw.visible_devices is not None:
            env["HIP_VISIBLE_DEVICES"] = ",".join(hw.visible_devices)
        if hw.rocm_gfx_override:
            env["HSA_OVERRIDE_GFX_VERSION"] = hw.rocm_gfx_override
    if accelerator is Accelerator.CPU:
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep a CPU run off a half-working GPU
    return env


# ---------------------------------------------------------------------------------------------
# argv and environment


def exo_argv(config: Config, role: str, executable: str) -> list[str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, not {role!r}")
    net = config.networking
    argv = [
        executable,
        "--api-port",
        str(config.api_port),
        "--zenoh-port",
        str(net.zenoh_port),
        "--discovery-port",
        str(net.discovery_port),
    ]
    if config.cluster_namespace:
        argv += ["--namespace", config.cluster_namespace]
    if role == MASTER:
        argv.append("--force-master")
        if config.no_worker:
            argv.append("--no-worker")
    if config.offline:
        argv.append("--offline")
    if config.log_level == "debug":
        argv.append("-v")
    argv += config.extra_args
    return argv


def build_launch(
    config: Config,
    role: str,
    *,
    base_env: Mapping[str, str] | None = None,
    root: Path = Path("/"),
    selection: Selection | None = None,
) -> Launch:
    """Everything needed to start EXO: argv, environment, the chosen variant, memory."""
    chosen = selection or select_executable(config, root)
    env = dict(os.environ if base_env is None else base_env)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EXO_HOME", "LISTEN_FDS"):
        env.pop(name, None)  # the supervisor talks to systemd, EXO does not
    env.update(state_paths(config))
    env["EXO_DEFAULT_MODELS_DIR"] = config.effective_models_dir
    if config.extra_model_dirs:
        env["EXO_MODELS_DIRS"] = ":".join(config.extra_model_dirs)
    else:
        env.pop("EXO_MODELS_DIRS", None)
    if config.read_only_model_dirs:
        env["EXO_MODELS_READ_ONLY_DIRS"] = ":".join(config.read_only_model_dirs)
    else:
        env.pop("EXO_MODELS_READ_ONLY_DIRS", None)
    if config.offline:
        env["EXO_OFFLINE"] = "true"
    memory = override_memory_mb(config, root)
    if memory is not None:
        env["OVERRIDE_MEMORY_MB"] = str(memory)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(chosen.env)
    env.update(config.environment_variables)
    return Launch(exo_argv(config, role, chosen.executable), env, chosen, memory)
