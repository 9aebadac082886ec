"""One EXO node per GPU group (``hardware.nodePerGpu``): the instances, their GPUs, their plan.

An EXO process computes on one device (MLX's default GPU), so a host with eight GPUs runs eight
EXO nodes to use them all. Each node is an instance of the node unit's template
(``exo-worker@gpu0.service``), named after its GPUs' NVIDIA device minors (``/dev/nvidia<N>``):
``gpu0``, or ``gpu0-1`` for a group. The minor is what the unit's device access names, so the
name is enough for the supervisor to find its GPUs again at every start, by the driver's
``/proc`` entry, whatever NVML's index or the PCI order say.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from exo_nixos.basetypes import Accelerator
from exo_nixos.errors import UserError
from exo_nixos.findings import Finding, Severity

if TYPE_CHECKING:
    from exo_nixos.config import Config, NodePerGpu
    from exo_nixos.hardware.decide import HardwareSettings
    from exo_nixos.hardware.model import Gpu, Inventory

PREFIX = "gpu"
_NAME = re.compile(r"gpu(\d{1,3}(?:-\d{1,3})*)")


class Code:
    """The codes of a node plan's findings."""

    ONE_NODE = "one-node"  # nodePerGpu off: one node for the host
    NODE_PER_GPU = "node-per-gpu"  # one node per configured group
    GPU_ABSENT = "instance-gpu-absent"  # a configured GPU is not on this host
    GPU_UNUSABLE = "instance-gpu-unusable"  # present, with problems
    GPU_UNCLAIMED = "gpu-unclaimed"  # a GPU no group names


def instance_name(group: Sequence[int]) -> str:
    """``[0]`` -> ``gpu0``, ``[2, 3]`` -> ``gpu2-3``."""
    return PREFIX + "-".join(str(minor) for minor in group)


def parse_instance(name: str) -> tuple[int, ...]:
    match = _NAME.fullmatch(name)
    if match is None:
        raise UserError(
            f"--instance {name!r}: not an instance name; expected gpu<N> or gpu<N>-<M>..., "
            "the NVIDIA device minors of its GPUs"
        )
    return tuple(int(part) for part in match.group(1).split("-"))


@dataclass(frozen=True)
class Instance:
    """One node of a host that runs a node per GPU group."""

    name: str
    minors: tuple[int, ...]
    count: int  # how many instances the host runs: the host's memory limit is split by it
    cpu_fallback: bool = False
    address: str | None = None  # IPv4 with prefix on the cluster link; None: link-local

    @property
    def device_nodes(self) -> list[str]:
        return [f"/dev/nvidia{minor}" for minor in self.minors]


def instances(node_per_gpu: NodePerGpu) -> list[Instance]:
    if not node_per_gpu.enable:
        return []
    count = len(node_per_gpu.groups)
    addresses: list[str | None] = [*node_per_gpu.addresses] or [None] * count
    return [
        Instance(instance_name(group), tuple(group), count, node_per_gpu.cpu_fallback, address)
        for group, address in zip(node_per_gpu.groups, addresses, strict=True)
    ]


def instance_for(config: Config, name: str) -> Instance:
    """The configured instance called ``name``; a UserError for any other name."""
    minors = parse_instance(name)
    configured = instances(config.hardware.node_per_gpu)
    for instance in configured:
        if instance.minors == minors:
            return instance
    names = ", ".join(i.name for i in configured) or "none: hardware.nodePerGpu is off"
    raise UserError(f"--instance {name}: not a configured instance (configured: {names})")


def gpus_of(inventory: Inventory, instance: Instance) -> tuple[list[Gpu], list[int]]:
    """The instance's GPUs found on the host, in its order, and the minors not found."""
    by_minor = {g.minor: g for g in inventory.gpus_for(Accelerator.CUDA) if g.minor is not None}
    found = [by_minor[m] for m in instance.minors if m in by_minor]
    missing = [m for m in instance.minors if m not in by_minor]
    return found, missing


def settings_for(
    settings: HardwareSettings, inventory: Inventory, instance: Instance
) -> HardwareSettings:
    """The host's hardware settings narrowed to the instance: its GPUs only (by UUID, which
    stays right when another GPU falls off the bus), its share of the host's memory limit."""
    found, missing = gpus_of(inventory, instance)
    # a GPU that is gone is named by its device node, which matches no GPU: when all of the
    # instance's GPUs are gone, the decision says visibleDevices names no working GPU
    visible = [g.uuid or g.address for g in found] + [f"/dev/nvidia{m}" for m in missing]
    return replace(settings, visible_devices=visible, memory_divisor=instance.count)


@dataclass(frozen=True)
class NodePlan:
    """How many EXO nodes this host runs, and why."""

    instances: tuple[Instance, ...]
    findings: tuple[Finding, ...]

    @property
    def nodes(self) -> int:
        return len(self.instances) or 1


def plan(configured: Sequence[Instance], inventory: Inventory) -> NodePlan:
    """For ``detect`` and ``doctor``: the nodes this host runs (``configured``, from
    :func:`instances`; none: one node) and what stands in their way."""
    cuda = inventory.gpus_for(Accelerator.CUDA)
    findings: list[Finding] = []
    if not configured:
        text = "hardware.nodePerGpu is off: one EXO node"
        fix = None
        if len(cuda) > 1:
            text += f", which computes on one of the {len(cuda)} NVIDIA GPUs"
            fix = "set services.exo.hardware.nodePerGpu.enable (one node per GPU)"
        findings.append(Finding(Severity.NOTE, text, fix, Code.ONE_NODE))
        return NodePlan((), tuple(findings))
    findings.append(
        Finding(
            Severity.NOTE,
            f"hardware.nodePerGpu: {len(configured)} EXO nodes, one per GPU group "
            f"({', '.join(i.name for i in configured)})",
            code=Code.NODE_PER_GPU,
        )
    )
    claimed: set[int] = set()
    for instance in configured:
        claimed.update(instance.minors)
        found, missing = gpus_of(inventory, instance)
        outcome = "runs on the CPU" if instance.cpu_fallback else "stays down"
        for minor in missing:
            findings.append(
                Finding(
                    Severity.WARNING,
                    f"{instance.name}: no NVIDIA GPU with device minor {minor} here; "
                    f"that node {outcome}",
                    "check hardware.nodePerGpu.groups against /proc/driver/nvidia/gpus",
                    Code.GPU_ABSENT,
                )
            )
        for gpu in found:
            if gpu.problems:
                findings.append(
                    Finding(
                        Severity.WARNING,
                        f"{instance.name}: {gpu.label}: {', '.join(gpu.problems)}; "
                        f"that node {outcome}",
                        code=Code.GPU_UNUSABLE,
                    )
                )
    unclaimed = [g for g in cuda if g.minor is not None and g.minor not in claimed]
    if unclaimed:
        findings.append(
            Finding(
                Severity.NOTE,
                f"{len(unclaimed)} NVIDIA GPU(s) in no group, unused: "
                + ", ".join(f"{g.label} (minor {g.minor})" for g in unclaimed),
                code=Code.GPU_UNCLAIMED,
            )
        )
    return NodePlan(tuple(configured), tuple(findings))
