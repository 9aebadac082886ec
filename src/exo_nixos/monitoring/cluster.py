"""The whole cluster as one node (or the gateway) sees it, with peers checked from here.

:func:`gather` probes the target (``/node_id``, ``/state``, ``/models``), then asks every
peer's API for ``/node_id`` from this host (reachable only when it answers with the id the
cluster state gives it: checked, not assumed), and, for this host's own node, reads what the
supervisor left in the runtime directory, the master hint and the node unit's memory
pressure. ``exo-nixos status`` renders the result; the exporter turns it into metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import aiohttp

from exo_nixos import exoapi
from exo_nixos.errors import describe_value
from exo_nixos.exoapi.state import Instance, State
from exo_nixos.monitoring.facts import SupervisorFacts, read_facts
from exo_nixos.monitoring.psi import CGROUP_ROOT, CgroupMemory, read_cgroup_memory, unit_cgroup
from exo_nixos.nodehealth import HealthReport, Target, Verdict

# Upstream's runner states in lifecycle order (src/exo/shared/types/worker/runners.py); an
# instance is as far as its least advanced runner, and failed when any runner failed.
RUNNER_ORDER = (
    "Idle",
    "Connecting",
    "Connected",
    "Loading",
    "Loaded",
    "WarmingUp",
    "Ready",
    "Running",
    "ShuttingDown",
    "Shutdown",
)
SERVING = ("Ready", "Running")


@dataclass(frozen=True)
class Local:
    """This host's node: where the supervisor leaves its files, which unit runs it."""

    runtime_dir: Path
    unit: str
    api_port: int
    cgroup_root: Path = CGROUP_ROOT


def local_for(target: Target, cgroup_root: Path = CGROUP_ROOT) -> Local | None:
    """This host's node behind ``target``; None when no config named its runtime dir and unit."""
    if target.node_unit is None or target.hint_dir is None:
        return None
    return Local(target.hint_dir, target.node_unit, target.api_port, cgroup_root)


@dataclass(frozen=True)
class Reach:
    reachable: bool
    detail: str
    """The URL that answered, or why none did."""


@dataclass(frozen=True)
class NodeRow:
    node_id: str
    name: str | None
    host: str | None
    is_target: bool
    """The node that answered the probe (through a gateway: the one it chose)."""
    master: bool | None
    backends: tuple[str, ...]
    chip: str | None
    memory_total_bytes: int | None
    memory_available_bytes: int | None
    gpu_usage_ratio: float | None
    instances: tuple[str, ...]
    """Model ids of the instances with a shard on this node."""
    reach: Reach

    @property
    def memory_used_bytes(self) -> int | None:
        if self.memory_total_bytes is None or self.memory_available_bytes is None:
            return None
        return max(0, self.memory_total_bytes - self.memory_available_bytes)


@dataclass(frozen=True)
class InstanceRow:
    instance_id: str
    model_id: str
    sharding: str
    meta: str
    node_ids: tuple[str, ...]
    state: str
    runners: tuple[tuple[str, str], ...]
    error: str | None = None


@dataclass(frozen=True)
class DownloadRow:
    node_id: str
    model_id: str
    status: str
    fraction: float
    downloaded_bytes: int
    total_bytes: int
    speed_bytes_per_s: float
    eta_s: float | None
    error: str | None


@dataclass(frozen=True)
class ClusterView:
    report: HealthReport
    nodes: tuple[NodeRow, ...] = ()
    instances: tuple[InstanceRow, ...] = ()
    downloads: tuple[DownloadRow, ...] = ()
    problems: tuple[str, ...] = ()
    """Everything that makes the cluster degraded, one line each (the probe's first)."""
    notes: tuple[str, ...] = ()
    """What could not be seen, and why (no permission, not this host's node...)."""
    facts: SupervisorFacts | None = None
    cgroup: CgroupMemory | None = None
    taken_at: float = field(default_factory=time.time)

    @property
    def verdict(self) -> Verdict:
        if self.report.view is None:
            return Verdict.DOWN
        return Verdict.DEGRADED if self.problems else Verdict.HEALTHY

    def to_json(self) -> dict[str, Any]:
        doc = self.report.to_json()
        doc["status"] = self.verdict.value
        doc["problems"] = list(self.problems)
        doc["notes"] = list(self.notes)
        doc["cluster"] = {
            "nodes": [_node_json(n) for n in self.nodes],
            "instances": [
                {
                    "instanceId": i.instance_id,
                    "modelId": i.model_id,
                    "sharding": i.sharding,
                    "kind": i.meta,
                    "nodeIds": list(i.node_ids),
                    "state": i.state,
                    "runners": dict(i.runners),
                    "error": i.error,
                }
                for i in self.instances
            ],
            "downloads": [
                {
                    "nodeId": d.node_id,
                    "modelId": d.model_id,
                    "status": d.status,
                    "progress": round(d.fraction, 4),
                    "downloadedBytes": d.downloaded_bytes,
                    "totalBytes": d.total_bytes,
                    "speedBytesPerSecond": d.speed_bytes_per_s,
                    "etaSeconds": d.eta_s,
                    "error": d.error,
                }
                for d in self.downloads
            ],
        }
        doc["supervisor"] = self.facts.to_json() if self.facts else None
        doc["memoryPressure"] = _cgroup_json(self.cgroup) if self.cgroup else None
        return doc


def _node_json(n: NodeRow) -> dict[str, Any]:
    return {
        "nodeId": n.node_id,
        "name": n.name,
        "host": n.host,
        "target": n.is_target,
        "master": n.master,
        "backends": list(n.backends),
        "chip": n.chip,
        "memoryTotalBytes": n.memory_total_bytes,
        "memoryUsedBytes": n.memory_used_bytes,
        "gpuUsage": n.gpu_usage_ratio,
        "instances": list(n.instances),
        "reachable": n.reach.reachable,
        "reachDetail": n.reach.detail,
    }


def _cgroup_json(c: CgroupMemory) -> dict[str, Any]:
    p = c.pressure
    return {
        "cgroup": str(c.path),
        "someAvg10": p.some.avg10 if p else None,
        "someAvg60": p.some.avg60 if p else None,
        "fullAvg60": p.full.avg60 if p else None,
        "degraded": p.degraded if p else None,
        "currentBytes": c.current_bytes,
        "highBytes": c.high_bytes,
        "maxBytes": c.max_bytes,
        "oomKills": c.oom_kills,
        "problem": c.problem,
    }


# -- peers, checked from here ------------------------------------------------------------------


def _candidate_urls(peer: exoapi.Peer, api_port: int) -> list[str]:
    """The peer's API: where the target reached it (edges), then its IPv4 addresses on the
    cluster's API port (upstream's API listens on IPv4 only)."""
    urls = list(peer.api_urls)
    for address in peer.addresses:
        try:
            if ipaddress.ip_address(address).version != 4:
                continue
        except ValueError:
            continue
        url = exoapi.url_for(address, api_port)
        if url not in urls:
            urls.append(url)
    return urls


async def _reach(
    session: aiohttp.ClientSession, node_id: str, urls: list[str], timeout_s: float
) -> Reach:
    if not urls:
        return Reach(False, "no address known for it in the cluster state")
    reasons: list[str] = []
    for url in urls:
        try:
            answer = await exoapi.get_json(session, url, "/node_id", timeout_s)
        except exoapi.ExoApiError as exc:
            reasons.append(str(exc))
            continue
        if answer == node_id:
            return Reach(True, url)
        reasons.append(f"{url} answers as node {describe_value(answer)}, not as this one")
    return Reach(False, "; ".join(reasons))


async def check_peers(
    peers: tuple[exoapi.Peer, ...], api_port: int, timeout_s: float
) -> dict[str, Reach]:
    """Ask every peer's API for ``/node_id`` at once, from this host."""
    async with aiohttp.ClientSession() as session:
        results = await asyncio.gather(
            *(_reach(session, p.node_id, _candidate_urls(p, api_port), timeout_s) for p in peers)
        )
    return {p.node_id: r for p, r in zip(peers, results, strict=True)}


# -- the state, in rows ------------------------------------------------------------------------


def instance_state(state: State, instance: Instance) -> tuple[str, str | None]:
    """``(state, error)`` of an instance from its runners: ``Failed`` when one failed, else
    the least advanced runner's state; ``Unknown`` without runners."""
    names: list[str] = []
    for node in instance.node_ids:
        runner = state.runner_of(node, instance)
        if runner is None or not runner.tag:
            continue
        if runner.name == "Failed":
            return "Failed", runner.error_message
        names.append(runner.name)
    known = [n for n in names if n in RUNNER_ORDER]
    if not known:
        return ("Unknown" if not names else names[0]), None
    return min(known, key=RUNNER_ORDER.index), None


def instance_rows(state: State) -> tuple[InstanceRow, ...]:
    rows: list[InstanceRow] = []
    for key, instance in state.instances.items():
        status, error = instance_state(state, instance)
        runners = tuple(
            (node, runner.name)
            for node in instance.node_ids
            if (runner := state.runner_of(node, instance)) is not None and runner.tag
        )
        rows.append(
            InstanceRow(
                instance_id=instance.instance_id or key,
                model_id=instance.model_id,
                sharding=instance.sharding,
                meta=instance.meta,
                node_ids=instance.node_ids,
                state=status,
                runners=runners,
                error=error,
            )
        )
    return tuple(rows)


def download_rows(state: State) -> tuple[DownloadRow, ...]:
    rows: list[DownloadRow] = []
    for node, downloads in state.downloads.items():
        for d in downloads:
            progress = d.download_progress
            speed = progress.speed if progress else 0.0
            eta = progress.eta_ms / 1000 if progress and progress.eta_ms > 0 else None
            rows.append(
                DownloadRow(
                    node_id=d.node_id or node,
                    model_id=d.model_id,
                    status=d.status or "Unknown",
                    fraction=d.fraction,
                    downloaded_bytes=d.downloaded_bytes,
                    total_bytes=d.total_bytes,
                    speed_bytes_per_s=speed,
                    eta_s=eta,
                    error=d.error_message,
                )
            )
    return tuple(rows)


def _host_of(url: str) -> str | None:
    return urlsplit(url).hostname


def node_rows(
    view: exoapi.NodeView, state: State, reach: Mapping[str, Reach]
) -> tuple[NodeRow, ...]:
    peers = {p.node_id: p for p in view.peers}
    order = list(dict.fromkeys([view.node_id, *state.node_ids(), *peers]))
    placed: dict[str, list[str]] = {}
    for instance in state.instances.values():
        for node in instance.node_ids:
            placed.setdefault(node, []).append(instance.model_id)
    rows: list[NodeRow] = []
    for node in order:
        identity = state.node_identities.get(node)
        memory = state.node_memory.get(node)
        system = state.node_system.get(node)
        peer = peers.get(node)
        if node == view.node_id:
            host = _host_of(view.url)
            node_reach = Reach(True, view.url)
        else:
            answered = reach.get(node)
            node_reach = answered or Reach(False, "not checked")
            host = _host_of(answered.detail) if answered and answered.reachable else None
            if host is None and peer is not None and peer.addresses:
                host = peer.addresses[0]
        chip = identity.chip_id if identity else None
        rows.append(
            NodeRow(
                node_id=node,
                name=identity.friendly_name if identity else None,
                host=host,
                is_target=node == view.node_id,
                master=None if view.master_id is None else node == view.master_id,
                backends=tuple(state.node_backends.get(node, ())),
                chip=chip if chip and not chip.startswith("Unknown") else None,
                memory_total_bytes=memory.ram_total.in_bytes if memory else None,
                memory_available_bytes=memory.ram_available.in_bytes if memory else None,
                gpu_usage_ratio=system.gpu_usage / 100 if system else None,
                instances=tuple(placed.get(node, ())),
                reach=node_reach,
            )
        )
    return tuple(rows)


def _problems(
    view: exoapi.NodeView,
    nodes: tuple[NodeRow, ...],
    instances: tuple[InstanceRow, ...],
    downloads: tuple[DownloadRow, ...],
    cgroup: CgroupMemory | None,
) -> list[str]:
    problems = list(view.problems)
    for node in nodes:
        if not node.reach.reachable:
            problems.append(
                f"node {node.node_id} ({node.name or 'unnamed'}) not reachable from here: "
                f"{node.reach.detail}"
            )
    for instance in instances:
        if instance.state == "Failed":
            why = f": {instance.error}" if instance.error else ""
            problems.append(f"instance of {instance.model_id} failed{why}")
    for d in downloads:
        if d.status == "Failed":
            problems.append(f"download of {d.model_id} on {d.node_id} failed: {d.error}")
    if cgroup is not None and cgroup.pressure is not None and cgroup.pressure.degraded:
        problems.append(cgroup.pressure.degraded)
    return problems


# -- gathering ---------------------------------------------------------------------------------


async def gather_async(
    report: HealthReport,
    *,
    local: Local | None,
    api_port: int,
    timeout_s: float,
) -> ClusterView:
    """Complete a health report into the cluster view (peers checked, local files read)."""
    view = report.view
    notes: list[str] = []
    if report.master_unread:
        notes.append(f"master unknown: {report.master_unread}")
    facts, cgroup = None, None
    if local is not None:
        facts, why = read_facts(local.runtime_dir)
        if why:
            notes.append(f"accelerator and memory offer unknown: {why}")
        cgroup = read_cgroup_memory(unit_cgroup(local.unit, local.cgroup_root))
        if cgroup.problem:
            notes.append(f"memory pressure unknown: {cgroup.problem}")
    if view is None:
        return ClusterView(report, problems=report.problems, notes=tuple(notes), facts=facts)
    state = view.state or State()
    reach = await check_peers(view.peers, api_port, timeout_s) if view.peers else {}
    nodes = node_rows(view, state, reach)
    instances = instance_rows(state)
    downloads = download_rows(state)
    if not view.state_ok:
        notes.append("nodes, instances and downloads unknown: /state gave no usable answer")
    return ClusterView(
        report,
        nodes=nodes,
        instances=instances,
        downloads=downloads,
        problems=tuple(_problems(view, nodes, instances, downloads, cgroup)),
        notes=tuple(notes),
        facts=facts,
        cgroup=cgroup,
    )


def gather(
    report: HealthReport, *, local: Local | None, api_port: int, timeout_s: float
) -> ClusterView:
    return exoapi.run_coroutine(
        gather_async(report, local=local, api_port=api_port, timeout_s=timeout_s)
    )
