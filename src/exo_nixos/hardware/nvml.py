"""NVIDIA GPUs as the driver sees them, through NVML (``nvidia-ml-py``, imported lazily).

The rest of detection only needs :class:`NvmlLibrary`, the few NVML calls used here, so tests
run with a fake and a machine without ``libnvidia-ml.so.1`` gets a warning, not a crash.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from exo_nixos import jsonio
from exo_nixos.fsutil import read_bounded
from exo_nixos.hardware.model import Gpu, GpuKind, GpuVendor
from exo_nixos.hardware.pci import NVIDIA_DRIVER, normalize_address


class NvmlLibrary(Protocol):
    """The subset of pynvml's module interface detection calls."""

    def nvmlInit(self) -> None: ...
    def nvmlShutdown(self) -> None: ...
    def nvmlSystemGetDriverVersion(self) -> str | bytes: ...
    def nvmlDeviceGetCount(self) -> int: ...
    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any: ...
    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetName(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetUUID(self, handle: Any) -> str | bytes: ...
    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any: ...
    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]: ...
    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]: ...


NvmlLoader = Callable[[], NvmlLibrary]


def load_pynvml() -> NvmlLibrary:
    """Import nvidia-ml-py; the import itself does not load libnvidia-ml (nvmlInit does)."""
    import pynvml

    library: NvmlLibrary = pynvml
    return library


@dataclass
class NvmlDevice:
    index: int
    address: str | None
    name: str | None = None
    uuid: str | None = None
    memory_total: int | None = None
    memory_free: int | None = None
    compute_capability: str | None = None
    unified_memory: bool = False  # NVML has no memory figure: the GPU shares system memory
    mig: bool | None = None  # MIG mode on; None: GPU without MIG or not asked
    error: str | None = None  # set when the device did not answer


@dataclass
class NvmlReport:
    status: str
    devices: list[NvmlDevice]
    warnings: list[str]
    driver: str | None = None  # the driver version NVML reports
    # Set when NVML's failure means no NVIDIA GPU can run CUDA here either: every GPU bound to
    # the nvidia driver gets this as a problem.
    blocking: str | None = None


# NVML return codes (nvml.h) whose failure in nvmlInit also rules CUDA out: the kernel module
# and the user-space libraries come from different driver releases (on NixOS: a switch to a
# new driver without a reboot), or the driver is not running at all.
NVML_ERROR_DRIVER_NOT_LOADED = 9
NVML_ERROR_LIB_RM_VERSION_MISMATCH = 18
# What a unified-memory GPU (GB10) answers to the memory query; values of nvml.h as well.
NVML_ERROR_NOT_SUPPORTED = 3
NVML_DEVICE_MIG_ENABLE = 1


def _text(value: str | bytes) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _reason(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:200]


def _code(exc: BaseException) -> int | None:
    """The NVML return code pynvml's NVMLError carries as ``value``."""
    value = getattr(exc, "value", None)
    return value if isinstance(value, int) else None


def _blocking(code: int | None, reason: str, module_version: str | None) -> str | None:
    if code == NVML_ERROR_LIB_RM_VERSION_MISMATCH:
        loaded = f" ({module_version})" if module_version else ""
        return (
            f"the loaded nvidia kernel module{loaded} is not the release of the NVIDIA "
            f"libraries (NVML: {reason}): reboot, so the driver of the current system "
            "generation is loaded"
        )
    if code == NVML_ERROR_DRIVER_NOT_LOADED:
        return f"the NVIDIA driver is not running (NVML: {reason})"
    return None


def query(library: NvmlLibrary, module_version: str | None = None) -> NvmlReport:
    """Ask NVML for every device. NVML errors of any kind become warnings or device errors.

    ``module_version`` is the loaded nvidia kernel module's version, named in the problem a
    driver/library version mismatch gives.
    """
    # pynvml raises NVMLError subclasses, but a broken driver install can also surface as
    # OSError or ctypes errors: nothing raised by NVML may stop detection.
    try:
        library.nvmlInit()
    except Exception as exc:
        reason = _reason(exc)
        blocking = _blocking(_code(exc), reason, module_version)
        # a blocking failure is said once, as every GPU's problem; any other is a warning
        said = (
            []
            if blocking is not None
            else [
                f"NVML could not start ({reason}): NVIDIA GPU memory, compute capability "
                "and health were not verified"
            ]
        )
        return NvmlReport(f"unavailable: {reason}", [], said, blocking=blocking)
    devices: list[NvmlDevice] = []
    warnings: list[str] = []
    try:
        driver: str | None
        try:
            driver = _text(library.nvmlSystemGetDriverVersion())
        except Exception:
            driver = None
        try:
            count = int(library.nvmlDeviceGetCount())
        except Exception as exc:
            warnings.append(f"NVML could not count devices ({_reason(exc)})")
            return NvmlReport(f"error: {_reason(exc)}", [], warnings)
        for index in range(count):
            devices.append(_device(library, index))
    finally:
        try:
            library.nvmlShutdown()
        except Exception as exc:
            warnings.append(f"NVML shutdown failed ({_reason(exc)})")
    status = f"ok (driver {driver or 'unknown'}, {count} device(s))"
    return NvmlReport(status, devices, warnings, driver)


def _device(library: NvmlLibrary, index: int) -> NvmlDevice:
    try:
        handle = library.nvmlDeviceGetHandleByIndex(index)
    except Exception as exc:
        return NvmlDevice(index, None, error=_reason(exc))
    device = NvmlDevice(index, None)
    try:
        pci = library.nvmlDeviceGetPciInfo(handle)
        device.address = normalize_address(_text(pci.busId))
    except Exception as exc:
        device.error = _reason(exc)
        return device
    try:
        device.name = _text(library.nvmlDeviceGetName(handle))
        device.uuid = _text(library.nvmlDeviceGetUUID(handle))
        try:
            memory = library.nvmlDeviceGetMemoryInfo(handle)
            device.memory_total = int(memory.total)
            # a recording may lack the free figure (it changes by the second)
            device.memory_free = None if memory.free is None else int(memory.free)
        except Exception as exc:
            # GB10 (DGX Spark) and other unified-memory GPUs answer every query but this one
            if _code(exc) != NVML_ERROR_NOT_SUPPORTED:
                raise
            device.unified_memory = True
        major, minor = library.nvmlDeviceGetCudaComputeCapability(handle)
        device.compute_capability = f"{major}.{minor}"
    except Exception as exc:
        device.error = _reason(exc)
        return device
    try:
        device.mig = int(library.nvmlDeviceGetMigMode(handle)[0]) == NVML_DEVICE_MIG_ENABLE
    except Exception:  # Not Supported on GPUs without MIG
        device.mig = None
    return device


def annotate(gpus: list[Gpu], report: NvmlReport) -> list[str]:
    """Merge NVML's answers into the nvidia-bound GPUs; return warnings."""
    warnings = list(report.warnings)
    if report.blocking is not None:
        for gpu in gpus:
            if gpu.vendor is GpuVendor.NVIDIA and gpu.driver == NVIDIA_DRIVER:
                gpu.responding = False
                gpu.problems.append(report.blocking)
        return warnings
    if not report.status.startswith("ok"):
        return warnings
    by_address = {d.address: d for d in report.devices if d.address}
    for device in report.devices:
        if device.address is None:
            warnings.append(f"NVML device {device.index} does not answer: {device.error}")
    for gpu in gpus:
        if gpu.vendor is not GpuVendor.NVIDIA or gpu.driver != NVIDIA_DRIVER:
            continue
        found = by_address.get(normalize_address(gpu.address))
        if found is None:
            gpu.responding = False
            gpu.problems.append("not listed by NVML (fallen off the bus or excluded)")
            continue
        gpu.index = found.index
        gpu.name = found.name or gpu.name
        gpu.uuid = found.uuid or gpu.uuid
        if found.memory_total is not None:
            gpu.memory_bytes = found.memory_total
            gpu.memory_source = "nvml"
        elif found.unified_memory and gpu.memory_source != "pci id":
            # no memory of its own (GB10 and its kin): integrated, using the system's memory,
            # which detection fills in; a board known to have its own keeps the nominal size
            gpu.kind = GpuKind.INTEGRATED
            gpu.memory_bytes = None
            gpu.memory_source = "unified"
        gpu.compute_capability = found.compute_capability or gpu.compute_capability
        gpu.mig = found.mig
        gpu.responding = found.error is None
        if found.error is not None:
            gpu.problems.append(f"does not answer NVML ({found.error})")
    return warnings


class RecordedNvml:
    """NVML answers replayed from a JSON capture (``scripts/capture-hw-tree --nvml``).

    The document: ``{"driver": "550.54.15", "devices": [DEVICE, ...]}``, each DEVICE either
    ``{"busId": ..., "name": ..., "uuid": ..., "memoryTotal": ..., "memoryFree": ...,
    "computeCapability": [9, 0], "migMode": [0, 0]}`` (``memoryFree`` may be left out) or
    ``{"error": "GPU is lost"}``. A unified-memory GPU has
    ``"memoryError": {"message": "Not Supported", "code": 3}`` in place of the memory; a GPU
    without MIG has no ``migMode``. An NVML that did not start:
    ``{"initError": "...", "initErrorCode": 18, "devices": []}``.
    """

    class Error(Exception):
        def __init__(self, message: str, value: int | None = None) -> None:
            super().__init__(message)
            self.value = value

    def __init__(self, document: dict[str, Any]) -> None:
        self.document = document

    @classmethod
    def from_file(cls, path: Path) -> RecordedNvml:
        return cls(jsonio.loads(read_bounded(path).decode("utf-8")))

    def _entry(self, handle: Any) -> dict[str, Any]:
        entry: dict[str, Any] = self.document["devices"][int(handle)]
        if "error" in entry:
            raise self.Error(entry["error"])
        return entry

    def nvmlInit(self) -> None:
        if "initError" in self.document:
            code = self.document.get("initErrorCode")
            message = str(self.document["initError"])
            raise self.Error(message, code if isinstance(code, int) else None)

    def nvmlShutdown(self) -> None:
        return None

    def nvmlSystemGetDriverVersion(self) -> str:
        return str(self.document.get("driver", "unknown"))

    def nvmlDeviceGetCount(self) -> int:
        return len(self.document["devices"])

    def nvmlDeviceGetHandleByIndex(self, index: int) -> Any:
        entry = self.document["devices"][index]
        if "error" in entry and "busId" not in entry:
            raise self.Error(entry["error"])
        return index

    def nvmlDeviceGetPciInfo(self, handle: Any) -> Any:
        entry = self.document["devices"][int(handle)]
        return _Record(busId=entry["busId"])

    def nvmlDeviceGetName(self, handle: Any) -> str:
        return str(self._entry(handle)["name"])

    def nvmlDeviceGetUUID(self, handle: Any) -> str:
        return str(self._entry(handle)["uuid"])

    def nvmlDeviceGetMemoryInfo(self, handle: Any) -> Any:
        entry = self._entry(handle)
        if "memoryError" in entry:
            failed = entry["memoryError"]
            raise self.Error(str(failed.get("message")), failed.get("code"))
        return _Record(total=entry["memoryTotal"], free=entry.get("memoryFree"))

    def nvmlDeviceGetCudaComputeCapability(self, handle: Any) -> tuple[int, int]:
        major, minor = self._entry(handle)["computeCapability"]
        return int(major), int(minor)

    def nvmlDeviceGetMigMode(self, handle: Any) -> Sequence[int]:
        entry = self._entry(handle)
        if "migMode" not in entry:  # recorded from a GPU without MIG, or before it was asked
            raise self.Error("Not Supported", NVML_ERROR_NOT_SUPPORTED)
        current, pending = entry["migMode"]
        return [int(current), int(pending)]


class _Record:
    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)
