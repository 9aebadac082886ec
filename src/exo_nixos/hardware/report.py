"""``exo-nixos detect`` output: human text, JSON, and KEY=VALUE lines for an EnvironmentFile."""

from __future__ import annotations

import re
from typing import Any

from exo_nixos.hardware.decide import Decision
from exo_nixos.hardware.instances import NodePlan
from exo_nixos.hardware.model import Inventory, to_json
from exo_nixos.units import gib

_PLAIN = re.compile(r"^[A-Za-z0-9_@%+=:,./-]*$")


def decision_json(decision: Decision) -> dict[str, Any]:
    return {
        "accelerator": decision.accelerator.value,
        "executable": str(decision.executable) if decision.executable else None,
        "devices": decision.devices,
        "memoryLimitBytes": decision.memory_limit_bytes,
        "env": decision.env,
        "reasons": decision.reasons,
        "findings": [f.to_json() for f in decision.findings],
        "cpuReason": decision.cpu_reason.value if decision.cpu_reason else None,
    }


def nodes_json(nodes: NodePlan) -> dict[str, Any]:
    return {
        "count": nodes.nodes,
        "instances": [{"name": i.name, "gpuMinors": list(i.minors)} for i in nodes.instances],
        "findings": [f.to_json() for f in nodes.findings],
    }


def full_json(
    inventory: Inventory, decision: Decision, nodes: NodePlan | None = None
) -> dict[str, Any]:
    data = {"inventory": to_json(inventory), "decision": decision_json(decision)}
    if nodes is not None:
        data["nodes"] = nodes_json(nodes)
    return data


def node_lines(nodes: NodePlan) -> list[str]:
    """How many EXO nodes this host runs, and why."""
    lines = [f"EXO nodes on this host: {nodes.nodes}"]
    lines.extend(f"  {finding.severity}: {finding.line()}" for finding in nodes.findings)
    return lines


def _quote(value: str) -> str:
    if _PLAIN.match(value):
        return value
    escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return f'"{escaped}"'


def env_lines(decision: Decision) -> list[str]:
    """systemd EnvironmentFile lines: the decision, then the variables exo should get."""
    values = {"EXO_NIXOS_ACCELERATOR": decision.accelerator.value}
    if decision.executable is not None:
        values["EXO_NIXOS_EXECUTABLE"] = str(decision.executable)
    values.update(decision.env)
    return [f"{key}={_quote(value)}" for key, value in values.items()]


def text_lines(inventory: Inventory, decision: Decision) -> list[str]:
    cpu = inventory.cpu
    memory = inventory.memory
    lines = [
        f"CPU: {cpu.model} ({cpu.architecture}, {cpu.sockets} socket(s), {cpu.cores} cores, "
        f"{cpu.threads} threads)",
        f"  inference flags: {' '.join(cpu.flags) or 'none'}",
    ]
    if cpu.numa_nodes:
        nodes = ", ".join(f"node{n.id} cpus {n.cpus} {gib(n.memory_bytes)}" for n in cpu.numa_nodes)
        lines.append(f"  NUMA: {nodes}")
    limit = gib(memory.cgroup_limit_bytes) if memory.cgroup_limit_bytes else "none"
    lines.append(
        f"Memory: {gib(memory.total_bytes)} physical, {gib(memory.available_bytes)} "
        f"available, cgroup limit {limit}"
    )
    if inventory.disk is not None:
        disk = inventory.disk
        lines.append(
            f"Disk: {gib(disk.free_bytes)} free of {gib(disk.total_bytes)} at {disk.measured}"
            f" (models dir {disk.requested})"
        )
    if inventory.apple is not None:
        lines.append(f"Apple Silicon: {inventory.apple.model} under {inventory.apple.os}")
    if not inventory.gpus:
        lines.append("GPUs: none")
    for gpu in inventory.gpus:
        details = [gpu.kind.value, f"driver {gpu.driver or 'none'}"]
        if gpu.memory_bytes is not None:
            details.append(f"{gib(gpu.memory_bytes)} ({gpu.memory_source})")
        if gpu.compute_capability:
            details.append(f"compute {gpu.compute_capability}")
        if gpu.gfx_target:
            details.append(gpu.gfx_target)
        if gpu.responding is not None:
            details.append("answers NVML" if gpu.responding else "NOT answering")
        if gpu.mig:
            details.append("MIG on")
        lines.append(f"GPU {gpu.address} {gpu.vendor_id}:{gpu.device_id} {gpu.name}")
        lines.append(f"  {', '.join(details)}")
        lines.extend(f"  problem: {p}" for p in gpu.problems)
    if inventory.nvidia_driver is not None:
        lines.append(f"NVIDIA driver: {inventory.nvidia_driver}")
    lines.append(f"NVML: {inventory.nvml}")
    lines.extend(f"warning: {w}" for w in inventory.warnings)
    lines.append(f"Accelerator: {decision.accelerator}")
    if decision.executable is not None:
        lines.append(f"  executable: {decision.executable}")
    lines.extend(f"  because: {r}" for r in decision.reasons)
    lines.extend(f"  env: {k}={v}" for k, v in decision.env.items())
    return lines
