"""The accelerator decision: preferred, else the most capable working and installed one, else CPU.

A decision is data: the accelerator, the memory EXO plans with in bytes, and its findings
(:class:`~exo_nixos.findings.Finding`, each with a stable ``code``). Where it ends on the CPU,
:attr:`Decision.cpu` is the finding that says why, its code a :class:`CpuReason`. The findings'
lines are what ``systemctl status``, the journal and ``exo-nixos detect`` show.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.basetypes import Accelerator, MemoryLimit
from exo_nixos.findings import Finding, Severity
from exo_nixos.hardware.model import Gpu, GpuKind, GpuVendor, Inventory
from exo_nixos.units import GIB, MIB, size

if TYPE_CHECKING:
    from exo_nixos.config import Config, Hardware

# The backends upstream EXO has (MLX on Metal, MLX on CUDA, MLX on the CPU). No ROCm, no Intel.
EXO_BACKENDS: frozenset[Accelerator] = frozenset(
    {Accelerator.CUDA, Accelerator.MLX, Accelerator.CPU}
)
BACKEND_NAMES = {Accelerator.CUDA: "CUDA", Accelerator.ROCM: "ROCm", Accelerator.MLX: "MLX"}
GPU_ACCELERATORS = (Accelerator.CUDA, Accelerator.ROCM, Accelerator.MLX)

# The share of a GPU's memory the node offers EXO for placement. EXO places a model where its
# weights fit the memory a node reports, and nothing more (master/placement_utils.py,
# filter_cycles_by_memory, compares the sum of ram_available with the model's storage_size);
# the GPU must also hold the CUDA context, the KV cache and activations. Upstream's own line for
# how full MLX lets a device get before it evicts KV caches (worker/engines/mlx/cache.py,
# _default_memory_threshold: 0.85 from 128 GB, 0.80 from 64 GB, 0.75 from 32 GB, else 0.70)
# is the share used here, applied to the GPU's memory rather than the host's: weights placed
# below that line leave the GPU the room upstream itself plans to keep free.
GPU_MEMORY_SHARE: tuple[tuple[int, float], ...] = (
    (128 * GIB, 0.85),
    (64 * GIB, 0.80),
    (32 * GIB, 0.75),
    (0, 0.70),
)


def gpu_memory_offer(memory_bytes: int) -> tuple[int, float]:
    """What a GPU of ``memory_bytes`` offers EXO, and the share that is."""
    share = next(share for floor, share in GPU_MEMORY_SHARE if memory_bytes >= floor)
    return int(memory_bytes * share), share


@dataclass(frozen=True)
class HardwareSettings:
    """``services.exo.hardware`` without pydantic; ``packages=None``: assume all installed."""

    auto_detect: bool = True
    preferred: Accelerator | None = None
    memory_limit: str | None = None
    packages: Mapping[Accelerator, str] | None = None
    visible_devices: Sequence[str] | None = None
    rocm_gfx_override: str | None = None
    # what the installed CUDA variant needs: the oldest driver and GPU generation it runs on
    cuda_minimum_driver: str | None = None
    cuda_minimum_compute_capability: str | None = None
    # nodes sharing the host (hardware.nodePerGpu): each plans with its share of memoryLimit
    memory_divisor: int = 1

    @classmethod
    def from_config(cls, hardware: Hardware) -> HardwareSettings:
        return cls(
            auto_detect=hardware.auto_detect,
            preferred=hardware.preferred_accelerator,
            memory_limit=hardware.memory_limit,
            packages=dict(hardware.packages),
            visible_devices=hardware.visible_devices,
            rocm_gfx_override=hardware.rocm_gfx_override,
            cuda_minimum_driver=hardware.cuda_minimum_driver,
            cuda_minimum_compute_capability=hardware.cuda_minimum_compute_capability,
        )

    def executable(self, accelerator: Accelerator) -> Path | None:
        if self.packages is None:
            return None
        package = self.packages.get(accelerator)
        return Path(package) / "bin" / "exo" if package else None


class CpuReason(StrEnum):
    """Why a decision ends on the CPU: the code of :attr:`Decision.cpu`."""

    PREFERRED = "preferred-cpu"  # preferredAccelerator is cpu: asked for, not a fallback
    PREFERRED_UNUSABLE = "preferred-unusable"  # the preferred accelerator cannot be used
    AUTO_DETECT_OFF = "auto-detect-off"  # autoDetect off, no preferredAccelerator
    NO_BACKEND = "no-backend"  # a GPU EXO has no backend for (ROCm, Intel)
    NO_METAL = "no-metal"  # Apple Silicon under Linux
    DRIVER_TOO_OLD = "driver-too-old"  # older than the installed CUDA variant needs
    NO_WORKING_DEVICE = "no-working-device"  # every device has problems
    VISIBLE_DEVICES_NONE = "visible-devices-none"  # visibleDevices names no working GPU
    VARIANT_NOT_INSTALLED = "variant-not-installed"  # works, but no variant of EXO for it
    DISPLAY_ONLY = "display-only"  # only display controllers (BMC VGA)
    NO_GPU = "no-gpu"
    NO_USABLE = "no-usable-accelerator"
    EXECUTABLE_MISSING = "executable-missing"  # the chosen variant's bin/exo is not there


class Code(StrEnum):
    """The codes of a decision's other findings."""

    ASSUMED_INSTALLED = "assumed-installed"  # no config: every variant assumed installed
    LEFT_OUT = "device-left-out"
    MIG = "mig-mode"
    NVML_UNVERIFIED = "nvml-unverified"
    PREFERRED_WORKS = "preferred-works"
    CHOSEN = "chosen"
    MEMORY_LIMIT = "memory-limit"  # memoryLimit sets what EXO plans with
    MEMORY_LIMIT_UNRESOLVED = "memory-limit-unresolved"
    MEMORY_CGROUP = "memory-cgroup"  # the cgroup limit caps it
    MEMORY_GPU = "memory-gpu"  # the GPU's own memory, less the margin, is what EXO plans with
    MEMORY_UNIFIED = "memory-unified"  # a unified-memory GPU: the system's memory
    MEMORY_GPU_UNKNOWN = "memory-gpu-unknown"  # NVML gave no figure: the system's memory
    MEMORY_LIMIT_ABOVE_GPU = "memory-limit-above-gpu"  # memoryLimit is not the cap
    ONE_GPU_COMPUTES = "one-gpu-computes"  # EXO uses one of several GPUs
    MISSING_VARIANT = "missing-variant"  # the decided accelerator has no installed variant


class MemoryBasis(StrEnum):
    """Where the memory EXO plans with comes from."""

    SYSTEM = "system"  # nothing set: EXO measures the host's memory itself
    GPU = "gpu"  # the GPU's memory less the margin (GPU_MEMORY_SHARE)
    LIMIT = "memoryLimit"
    CGROUP = "cgroup"


@dataclass(frozen=True)
class MemoryPlan:
    """The memory EXO plans placement with (``OVERRIDE_MEMORY_MB``), where it comes from, why."""

    limit_bytes: int | None  # None: EXO measures the host's memory itself
    basis: MemoryBasis
    findings: tuple[Finding, ...] = ()

    @property
    def env(self) -> dict[str, str]:
        return (
            {} if self.limit_bytes is None else {"OVERRIDE_MEMORY_MB": str(self.limit_bytes // MIB)}
        )

    def label(self) -> str | None:
        """For STATUS: ``64 GiB of GPU memory``; None where EXO measures itself."""
        if self.limit_bytes is None:
            return None
        source = {
            MemoryBasis.GPU: "of GPU memory",
            MemoryBasis.LIMIT: "by memoryLimit",
            MemoryBasis.CGROUP: "by the cgroup limit",
        }.get(self.basis, "")
        return f"plans with {_size(self.limit_bytes)} {source}".rstrip()


SYSTEM_MEMORY = MemoryPlan(None, MemoryBasis.SYSTEM)  # nothing set: EXO measures itself


@dataclass(frozen=True)
class Decision:
    accelerator: Accelerator
    executable: Path | None  # the chosen variant's bin/exo; None: not known or not installed
    findings: tuple[Finding, ...]
    env: dict[str, str]  # for exo's environment: CUDA_VISIBLE_DEVICES, OVERRIDE_MEMORY_MB...
    devices: list[str] = field(default_factory=list)  # PCI addresses used, or "apple-silicon"
    memory: MemoryPlan = SYSTEM_MEMORY
    cpu: Finding | None = None  # on the CPU: why (its code a CpuReason)
    # what a CPU run of this host plans with, for a fallback after the decision
    cpu_memory: MemoryPlan = SYSTEM_MEMORY

    @property
    def memory_limit_bytes(self) -> int | None:
        """What EXO plans with; None: EXO measures itself."""
        return self.memory.limit_bytes

    @property
    def reasons(self) -> list[str]:
        """The findings as lines, in order."""
        return [f.line() for f in self.findings]

    @property
    def cpu_reason(self) -> CpuReason | None:
        if self.cpu is None or self.cpu.code is None:
            return None
        return CpuReason(self.cpu.code)


@dataclass
class _Option:
    accelerator: Accelerator
    devices: list[Gpu]
    memory_bytes: int
    summary: str


def _size(value: int | None) -> str:
    return "memory unknown" if value is None else size(value, 0)


def _describe(gpus: list[Gpu]) -> str:
    names: dict[str, int] = {}
    for gpu in gpus:
        names[gpu.name] = names.get(gpu.name, 0) + 1
    parts = [f"{count}x {name}" if count > 1 else name for name, count in names.items()]
    known = [g.memory_bytes for g in gpus if g.memory_bytes is not None]
    total = _size(sum(known)) if known else "memory unknown"
    return f"{', '.join(parts)} ({total})"


def _preferring_discrete(gpus: list[Gpu]) -> list[Gpu]:
    """The discrete GPUs when there are any; integrated ones only on their own."""
    discrete = [g for g in gpus if g.kind is GpuKind.DISCRETE]
    return discrete or gpus


def _older(version: str, minimum: str) -> bool:
    """``"550.90.07"`` older than ``"580"``, ``"7.0"`` older than ``"7.5"``; False if unparsable."""
    try:
        have = tuple(int(part) for part in version.split("."))
        need = tuple(int(part) for part in minimum.split("."))
    except ValueError:
        return False
    return have < need


def _visible(gpus: list[Gpu], wanted: Sequence[str]) -> list[Gpu]:
    """GPUs named by index (nvidia-smi / PCI order) or UUID, in the order given."""
    chosen: list[Gpu] = []
    for entry in wanted:
        for gpu in gpus:
            names = {gpu.address, gpu.uuid, None if gpu.index is None else str(gpu.index)}
            if entry in names and gpu not in chosen:
                chosen.append(gpu)
    return chosen


class _Evaluation:
    def __init__(
        self, settings: HardwareSettings, inventory: Inventory, supported: frozenset[Accelerator]
    ) -> None:
        self.settings = settings
        self.inventory = inventory
        self.supported = supported
        self.options: dict[Accelerator, _Option] = {}
        self.blockers: dict[Accelerator, Finding] = {}
        for accelerator in GPU_ACCELERATORS:
            self._evaluate(accelerator)

    def installed(self, accelerator: Accelerator) -> bool:
        packages = self.settings.packages
        return packages is None or accelerator in packages

    def _block(self, accelerator: Accelerator, code: CpuReason, reason: str) -> None:
        self.blockers[accelerator] = Finding(Severity.REASON, reason, code=code)

    def problems(self, gpu: Gpu) -> list[str]:
        """The GPU's own problems, and a GPU generation the installed variant cannot run on."""
        minimum = self.settings.cuda_minimum_compute_capability
        capability = gpu.compute_capability
        too_old = (
            gpu.accelerator is Accelerator.CUDA
            and minimum is not None
            and capability is not None
            and _older(capability, minimum)
        )
        if not too_old:
            return gpu.problems
        return [
            *gpu.problems,
            f"compute capability {capability} is below {minimum}, the oldest that EXO's CUDA "
            "variant runs on",
        ]

    def usable(self, gpu: Gpu) -> bool:
        """:attr:`Gpu.usable` for the installed variant (display controllers never get here)."""
        return not self.problems(gpu)

    def _old_driver(self) -> str | None:
        minimum = self.settings.cuda_minimum_driver
        driver = self.inventory.nvidia_driver
        if minimum is None or driver is None or not _older(driver, minimum):
            return None
        return (
            f"the NVIDIA driver {driver} is older than {minimum}, the oldest that EXO's CUDA "
            "variant runs on: install a newer driver (hardware.nvidia.package)"
        )

    def _evaluate(self, accelerator: Accelerator) -> None:
        backend = BACKEND_NAMES[accelerator]
        if accelerator is Accelerator.MLX:
            apple = self.inventory.apple
            if apple is None:
                return
            if not apple.metal:
                self._block(
                    accelerator,
                    CpuReason.NO_METAL,
                    f"Apple Silicon ({apple.model}) runs Linux: MLX "
                    "needs Metal, which only macOS has",
                )
                return
            devices: list[Gpu] = []
            memory = self.inventory.memory.total_bytes or 0
            summary = f"Apple Silicon {apple.model} ({_size(memory)} unified memory)"
        else:
            present = _preferring_discrete(self.inventory.gpus_for(accelerator))
            if not present:
                return
            if accelerator not in self.supported:
                self._block(
                    accelerator,
                    CpuReason.NO_BACKEND,
                    f"{_describe(present)} found, but EXO has no {backend} backend",
                )
                return
            if accelerator is Accelerator.CUDA and (old_driver := self._old_driver()):
                self._block(
                    accelerator,
                    CpuReason.DRIVER_TOO_OLD,
                    f"{_describe(present)} found, but {old_driver}",
                )
                return
            working = _preferring_discrete([g for g in present if self.usable(g)])
            if not working:
                problems = "; ".join(f"{g.label}: {', '.join(self.problems(g))}" for g in present)
                self._block(
                    accelerator,
                    CpuReason.NO_WORKING_DEVICE,
                    f"no working {backend} device ({problems})",
                )
                return
            if self.settings.visible_devices is not None and accelerator is Accelerator.CUDA:
                named = _visible(present, self.settings.visible_devices)
                working = [g for g in named if self.usable(g)]
                if not working:
                    wanted = ", ".join(self.settings.visible_devices) or "none"
                    self._block(
                        accelerator,
                        CpuReason.VISIBLE_DEVICES_NONE,
                        f"hardware.visibleDevices ({wanted}) names no working NVIDIA GPU here",
                    )
                    return
            devices = working
            memory = sum(g.memory_bytes or 0 for g in working)
            summary = _describe(working)
        if not self.installed(accelerator):
            self._block(
                accelerator,
                CpuReason.VARIANT_NOT_INSTALLED,
                f"{summary} works here, but no {accelerator} variant "
                f"of EXO is installed (services.exo.hardware.packages.{accelerator})",
            )
            return
        self.options[accelerator] = _Option(accelerator, devices, memory, summary)

    def unsupported(self) -> list[Finding]:
        """GPUs of a kind no EXO backend (and no accelerator choice) exists for."""
        intel = [
            g
            for g in self.inventory.gpus
            if g.vendor is GpuVendor.INTEL and g.kind is GpuKind.DISCRETE
        ]
        if not intel:
            return []
        return [
            Finding(
                Severity.REASON,
                f"{_describe(intel)} found, but EXO has no Intel GPU backend",
                code=CpuReason.NO_BACKEND,
            )
        ]

    def notes(self) -> list[Finding]:
        """Usable accelerators' devices that are left out, each with its problems."""
        lines: list[Finding] = []
        for accelerator in GPU_ACCELERATORS:
            option = self.options.get(accelerator)
            if option is None:
                continue
            broken = [
                g
                for g in self.inventory.gpus_for(accelerator)
                if not self.usable(g) and g not in option.devices
            ]
            lines.extend(
                Finding(
                    Severity.WARNING,
                    f"{g.label} left out: {', '.join(self.problems(g))}",
                    code=Code.LEFT_OUT,
                )
                for g in broken
            )
            lines.extend(
                Finding(
                    Severity.WARNING,
                    f"{g.label} has MIG mode on: CUDA sees its MIG instances, not the whole GPU, "
                    "and EXO uses one of them",
                    f"to give EXO the whole GPU turn MIG off (nvidia-smi -i {g.index} -mig 0)",
                    Code.MIG,
                )
                for g in option.devices
                if g.mig
            )
            status = self.inventory.nvml
            unverified = any(g.responding is None for g in option.devices)
            if (
                accelerator is Accelerator.CUDA
                and unverified
                and status.startswith(("unavailable", "error"))
            ):
                lines.append(
                    Finding(
                        Severity.WARNING,
                        f"NVML {status}: the NVIDIA GPUs were not verified",
                        code=Code.NVML_UNVERIFIED,
                    )
                )
        return lines


def decide(
    settings: HardwareSettings,
    inventory: Inventory,
    supported: frozenset[Accelerator] = EXO_BACKENDS,
) -> Decision:
    """Preferred accelerator > automatic choice by capability > CPU, with reasons."""
    evaluation = _Evaluation(settings, inventory, supported)
    findings: list[Finding] = []
    if settings.packages is None:
        findings.append(
            _reason(
                "no config given: assuming every EXO variant is installed", Code.ASSUMED_INSTALLED
            )
        )
    findings.extend(evaluation.notes())
    unsupported = evaluation.unsupported()
    findings.extend(unsupported)
    chosen: _Option | None = None
    preferred = settings.preferred
    if preferred is Accelerator.CPU:
        why = _reason("preferredAccelerator is cpu", CpuReason.PREFERRED)
        return _finish(settings, inventory, None, [*findings, why], why)
    cpu: Finding | None = None  # the preferred accelerator's failure outranks any other why
    if preferred is not None:
        chosen = evaluation.options.get(preferred)
        if chosen is not None:
            findings.append(
                _reason(
                    f"preferred accelerator {preferred} works here: {chosen.summary}",
                    Code.PREFERRED_WORKS,
                )
            )
        else:
            blocker = evaluation.blockers.pop(preferred, None)
            because = blocker.text if blocker else _absent(preferred)
            cpu = _reason(
                f"preferred accelerator {preferred} cannot be used: {because}",
                CpuReason.PREFERRED_UNUSABLE,
            )
            findings.append(cpu)
    explained = preferred is not None or bool(unsupported)
    if chosen is None and settings.auto_detect:
        explained = explained or bool(evaluation.blockers)
        findings.extend(evaluation.blockers.values())
        if evaluation.options:
            chosen = max(evaluation.options.values(), key=lambda o: o.memory_bytes)
            several = " (the most usable memory)" if len(evaluation.options) > 1 else ""
            findings.append(
                _reason(f"chose {chosen.accelerator}{several}: {chosen.summary}", Code.CHOSEN)
            )
    elif chosen is None and preferred is None:
        findings.append(
            _reason(
                "autoDetect is off and no preferredAccelerator is set", CpuReason.AUTO_DETECT_OFF
            )
        )
        explained = True
    if chosen is not None:
        return _finish(settings, inventory, chosen, findings, None)
    if not explained:
        findings.append(_no_accelerator(inventory))
    last = findings[-1]
    cpu = cpu or last
    findings[-1] = replace(last, text=f"{last.text}: using cpu")
    return _finish(settings, inventory, None, findings, cpu)


def _reason(text: str, code: str) -> Finding:
    return Finding(Severity.REASON, text, code=code)


def _absent(accelerator: Accelerator) -> str:
    return {
        Accelerator.CUDA: "no NVIDIA GPU found",
        Accelerator.ROCM: "no AMD GPU found",
        Accelerator.MLX: "not Apple Silicon under macOS",
    }.get(accelerator, "not available")


def _finish(
    settings: HardwareSettings,
    inventory: Inventory,
    option: _Option | None,
    findings: list[Finding],
    cpu: Finding | None,
) -> Decision:
    accelerator = option.accelerator if option else Accelerator.CPU
    env: dict[str, str] = {}
    devices: list[str] = []
    if option is not None:
        devices = [g.address for g in option.devices] or ["apple-silicon"]
        env.update(_device_env(settings, inventory, option))
    cpu_memory = _memory_plan(settings, inventory, None)
    memory = _memory_plan(settings, inventory, option) if option is not None else cpu_memory
    findings.extend(memory.findings)
    env.update(memory.env)
    executable = settings.executable(accelerator)
    if settings.packages is not None and executable is None:
        findings.append(
            Finding(
                Severity.PROBLEM,
                f"no {accelerator} variant of EXO is installed",
                f"set services.exo.hardware.packages.{accelerator}",
                Code.MISSING_VARIANT,
            )
        )
    return Decision(accelerator, executable, tuple(findings), env, devices, memory, cpu, cpu_memory)


def _no_accelerator(inventory: Inventory) -> Finding:
    displays = [g for g in inventory.gpus if g.kind is GpuKind.DISPLAY]
    others = [g for g in inventory.gpus if g.kind is not GpuKind.DISPLAY]
    if displays and not others:
        names = ", ".join(sorted({g.name for g in displays}))
        return _reason(
            f"no accelerator: only display controllers ({names})", CpuReason.DISPLAY_ONLY
        )
    if not inventory.gpus and inventory.apple is None:
        return _reason("no GPU found", CpuReason.NO_GPU)
    return _reason("no usable accelerator", CpuReason.NO_USABLE)


def _device_env(
    settings: HardwareSettings, inventory: Inventory, option: _Option
) -> dict[str, str]:
    env: dict[str, str] = {}
    if option.accelerator is Accelerator.CUDA:
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
        every = [g for g in inventory.gpus_for(Accelerator.CUDA) if g.index is not None]
        if settings.visible_devices is not None or len(option.devices) < len(every):
            # UUIDs stay right when a GPU disappears and the indices shift
            env["CUDA_VISIBLE_DEVICES"] = ",".join(g.uuid or str(g.index) for g in option.devices)
    elif option.accelerator is Accelerator.ROCM:
        if settings.visible_devices is not None:
            env["ROCR_VISIBLE_DEVICES"] = ",".join(settings.visible_devices)
        if settings.rocm_gfx_override:
            env["HSA_OVERRIDE_GFX_VERSION"] = settings.rocm_gfx_override
    return env


def _gpu_memory(option: _Option | None) -> tuple[int | None, list[Finding]]:
    """What the GPU EXO computes on offers, for the CUDA variant; None: the system's rule.

    EXO computes on one device, MLX's default GPU: the first the CUDA runtime lists, which is
    the first of the chosen devices (PCI order, or the order of ``visibleDevices``).
    """
    if option is None or option.accelerator is not Accelerator.CUDA or not option.devices:
        return None, []
    gpu = option.devices[0]
    findings: list[Finding] = []
    if len(option.devices) > 1:
        findings.append(
            Finding(
                Severity.WARNING,
                f"EXO computes on one GPU, {gpu.label}; the other {len(option.devices) - 1} "
                "sit idle",
                code=Code.ONE_GPU_COMPUTES,
            )
        )
    if gpu.memory_source == "unified":
        findings.append(
            Finding(
                Severity.NOTE,
                f"{gpu.label} shares the system's memory: EXO plans with the system's",
                code=Code.MEMORY_UNIFIED,
            )
        )
        return None, findings
    if gpu.memory_source != "nvml" or not gpu.memory_bytes:
        findings.append(
            Finding(
                Severity.WARNING,
                f"{gpu.label}: memory not known from NVML; EXO plans with the system's memory, "
                "which may be more than the GPU holds",
                code=Code.MEMORY_GPU_UNKNOWN,
            )
        )
        return None, findings
    offer, share = gpu_memory_offer(gpu.memory_bytes)
    findings.append(
        _reason(
            f"EXO plans with {_size(offer)}: {share:.0%} of the {_size(gpu.memory_bytes)} of "
            f"{gpu.label}, the GPU it computes on (the rest for the CUDA context, KV cache "
            "and activations)",
            Code.MEMORY_GPU,
        )
    )
    return offer, findings


def _memory_plan(
    settings: HardwareSettings, inventory: Inventory, option: _Option | None
) -> MemoryPlan:
    """The GPU's memory for CUDA, else none; capped by memoryLimit, then the cgroup limit."""
    physical = inventory.memory.total_bytes
    cgroup = inventory.memory.cgroup_limit_bytes
    limit, findings = _gpu_memory(option)
    basis = MemoryBasis.SYSTEM if limit is None else MemoryBasis.GPU
    divisor = max(settings.memory_divisor, 1)
    if settings.memory_limit is not None:
        parsed = MemoryLimit.parse(settings.memory_limit)
        share = parsed.resolve(physical or 0) // divisor
        if parsed.percent is not None and physical is None:
            findings.append(
                Finding(
                    Severity.WARNING,
                    f"memoryLimit {settings.memory_limit} not applied: physical memory unknown",
                    code=Code.MEMORY_LIMIT_UNRESOLVED,
                )
            )
        elif limit is not None and share >= limit:
            findings.append(
                Finding(
                    Severity.NOTE,
                    f"memoryLimit {settings.memory_limit} ({_size(share)}) is above what the "
                    "GPU offers",
                    code=Code.MEMORY_LIMIT_ABOVE_GPU,
                )
            )
        else:
            limit, basis = share, MemoryBasis.LIMIT
            split = f" (its share of {divisor} nodes)" if divisor > 1 else ""
            findings.append(
                _reason(
                    f"memoryLimit {settings.memory_limit}: EXO plans with {_size(limit)}{split}",
                    Code.MEMORY_LIMIT,
                )
            )
    below_physical = cgroup is not None and (physical is None or cgroup < physical)
    if cgroup is not None and below_physical and (limit is None or cgroup < limit):
        findings.append(
            _reason(
                f"the cgroup memory limit ({_size(cgroup)}) caps what EXO plans with",
                Code.MEMORY_CGROUP,
            )
        )
        limit, basis = cgroup, MemoryBasis.CGROUP
    return MemoryPlan(limit, basis, tuple(findings))


def choose(
    config: Config, inventory: Inventory, supported: frozenset[Accelerator] = EXO_BACKENDS
) -> Decision:
    """The decision for a loaded config: its preferences and its installed variants."""
    return decide(HardwareSettings.from_config(config.hardware), inventory, supported)
