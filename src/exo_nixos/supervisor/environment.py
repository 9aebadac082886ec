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
from typing import TYPE_CHECKING

from exo_nixos.config import Accelerator, Config, Mode
from exo_nixos.errors import UserError
from exo_nixos.findings import Finding, Severity
from exo_nixos.hardware.decide import SYSTEM_MEMORY, CpuReason, MemoryPlan
from exo_nixos.supervisor import oom

if TYPE_CHECKING:
    from exo_nixos.hardware import Decision
    from exo_nixos.hardware.instances import Instance

MASTER = "master"
WORKER = "worker"
ROLES = (MASTER, WORKER)
SUPERVISOR_STATE = "exo-nixos"  # our own sub-directory of the state directory


@dataclass(frozen=True)
class Selection:
    """The EXO executable to run and why."""

    accelerator: Accelerator
    executable: str
    findings: tuple[Finding, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    fallback: str | None = None  # set when the wanted accelerator could not be used
    fallback_reason: CpuReason | None = None  # the code of ``fallback``
    memory: MemoryPlan = SYSTEM_MEMORY  # OVERRIDE_MEMORY_MB and why

    @property
    def reasons(self) -> list[str]:
        return [f.line() for f in self.findings]

    @property
    def memory_limit_bytes(self) -> int | None:
        return self.memory.limit_bytes

    def label(self) -> str:
        """The accelerator and the memory EXO plans with, for STATUS."""
        memory = self.memory.label()
        return f"{self.accelerator.value}, {memory}" if memory else self.accelerator.value


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


INSTANCES = "instances"  # sub-directory of the state and cache directories, one per instance


def instance_dirs(config: Config, instance: Instance | None) -> tuple[str, str, str]:
    """The data, cache and runtime directories of a node: the configured ones, or an instance's
    own below them. EXO keeps one node per cache directory: its pid file and its node identity
    (``exo.pid``, ``node_zid``) live there (upstream ``shared/constants.py``)."""
    sec = config.security
    if instance is None:
        return sec.data_dir, sec.cache_dir, sec.runtime_dir
    return (
        str(Path(sec.data_dir) / INSTANCES / instance.name),
        str(Path(sec.cache_dir) / INSTANCES / instance.name),
        str(Path(sec.runtime_dir) / instance.name),
    )


def state_paths(config: Config, instance: Instance | None = None) -> dict[str, str]:
    data, cache, runtime = instance_dirs(config, instance)
    return {
        "XDG_DATA_HOME": _xdg_home(data),
        "XDG_CACHE_HOME": _xdg_home(cache),
        # config.toml is touched at start; the configuration directory itself stays read-only
        "XDG_CONFIG_HOME": str(Path(data) / "config"),
        "EXO_RUNTIME_DIR": runtime,
    }


def snapshot_path(config: Config, instance: Instance | None = None) -> Path:
    data, _, _ = instance_dirs(config, instance)
    return Path(data) / SUPERVISOR_STATE / "topology.json"


# ---------------------------------------------------------------------------------------------
# accelerator

_GPU_ENV = (
    "CUDA_VISIBLE_DEVICES",
    "CUDA_DEVICE_ORDER",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
)


def select_executable(
    config: Config, root: Path = Path("/"), instance: Instance | None = None
) -> Selection:
    """Detect the hardware below ``root`` and choose the EXO variant to start.

    The one place the supervisor depends on :mod:`exo_nixos.hardware`. An instance of a node
    per GPU sees its own GPUs only; when they cannot be used it stays down (a UserError, so
    the unit fails and systemd retries) unless ``nodePerGpu.cpuFallback`` lets it run on the
    CPU. The other instances are not touched.
    """
    from exo_nixos.hardware import HardwareSettings, decide, detect
    from exo_nixos.hardware.instances import settings_for

    inventory = detect(root, models_dir=config.effective_models_dir)
    settings = HardwareSettings.from_config(config.hardware)
    if instance is not None:
        settings = settings_for(settings, inventory, instance)
    selection = selection_for(config, decide(settings, inventory))
    if instance is not None and selection.fallback and not instance.cpu_fallback:
        raise UserError(
            f"{instance.name}: {selection.fallback.removesuffix('; running on CPU')}; "
            "hardware.nodePerGpu.cpuFallback is off, so this node stays down until its GPU "
            "works (systemd retries the start)"
        )
    return selection


def selection_for(config: Config, decision: Decision) -> Selection:
    """Turn the hardware decision into what to run; fall back to CPU when the GPU is unusable.

    "Wanted" is ``hardware.preferredAccelerator``, else any GPU variant that is installed.
    Ending on the CPU while a GPU was wanted is a fallback, logged and shown in STATUS; the CPU
    asked for by ``preferredAccelerator = "cpu"`` is none.
    """
    hw = config.hardware
    preferred = hw.preferred_accelerator
    if preferred is not None and preferred is not Accelerator.CPU:
        wanted = [preferred]
    else:
        wanted = [a for a in hw.packages if a is not Accelerator.CPU]
    findings = list(decision.findings)
    env = dict(decision.env)
    accelerator = decision.accelerator
    fallback: str | None = None
    reason: CpuReason | None = None
    memory = decision.memory
    executable = decision.executable
    if accelerator is not Accelerator.CPU and (executable is None or not executable.exists()):
        missing = f"{executable} does not exist" if executable else "no variant installed"
        fallback = f"{accelerator.value} unusable ({missing}); running on CPU"
        reason = CpuReason.EXECUTABLE_MISSING
        findings.append(Finding(Severity.PROBLEM, f"{accelerator.value}: {missing}", code=reason))
        accelerator = Accelerator.CPU
        # the GPU's memory no longer applies: what a CPU run of this host plans with
        memory = decision.cpu_memory
        env.pop("OVERRIDE_MEMORY_MB", None)
        env.update(memory.env)
    elif decision.cpu is not None and decision.cpu_reason is not CpuReason.PREFERRED and wanted:
        names = "/".join(a.value for a in wanted)
        fallback = f"{names} unusable ({decision.cpu.text}); running on CPU"
        reason = decision.cpu_reason
    if accelerator is Accelerator.CPU:
        for name in _GPU_ENV:
            env.pop(name, None)
        env["CUDA_VISIBLE_DEVICES"] = ""  # keep a CPU run off a half-working GPU
        cpu = hw.executable(Accelerator.CPU)
        executable = cpu if cpu is not None else Path(shutil.which("exo") or "exo")
    assert executable is not None
    return Selection(
        accelerator,
        str(executable),
        tuple(findings),
        env,
        fallback,
        reason,
        memory,
    )


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
    instance: Instance | None = None,
) -> Launch:
    """Everything needed to start EXO: argv, environment, the chosen variant, memory."""
    chosen = selection or select_executable(config, root, instance)
    env = dict(os.environ if base_env is None else base_env)
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "EXO_HOME", "LISTEN_FDS"):
        env.pop(name, None)  # the supervisor talks to systemd, EXO does not
    env.update(state_paths(config, instance))
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
    env.pop("OVERRIDE_MEMORY_MB", None)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(chosen.env)  # device selection, OVERRIDE_MEMORY_MB (limit and cgroup)
    oom.apply(env, instance_dirs(config, instance)[0], root)  # less memory after an OOM kill
    env.update(config.environment_variables)
    memory = env.get("OVERRIDE_MEMORY_MB")
    memory_mb = int(memory) if memory and memory.isdigit() else None
    return Launch(exo_argv(config, role, chosen.executable), env, chosen, memory_mb)
