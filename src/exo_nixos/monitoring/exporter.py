"""The Prometheus exporter: the cluster as this host's node sees it, at every scrape.

Each ``GET /metrics`` probes the local node's API (``/node_id``, ``/state``, ``/models``),
asks every peer's ``/node_id`` from here, and reads what the supervisor leaves behind (the
facts in the runtime directory, the run record in the state directory) and the node unit's
cgroup (PSI). Nothing is cached between scrapes: Prometheus's interval is the probe interval.

Label values are bounded: ``node`` is a node's friendly name (upstream's host name, stable
across restarts; a new node id is drawn at every EXO start, so ids appear only in
``exo_node_info``), ``model`` a model id, states and kinds are upstream's enumerations.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from exo_nixos.config import Config

from exo_nixos import exoapi
from exo_nixos.errors import UserError
from exo_nixos.fsutil import os_reason
from exo_nixos.monitoring.cluster import ClusterView, Local, NodeRow, gather_async, local_for
from exo_nixos.nodehealth import Target, Verdict, assess_async, target_for
from exo_nixos.supervisor import oom

log = logging.getLogger(__name__)

METRICS_PATH = "/metrics"
_STATES = tuple(v.value for v in Verdict)


@dataclass(frozen=True)
class Sources:
    """Where the exporter looks."""

    target: Target
    local: Local | None
    data_dir: Path


def node_label(node: NodeRow) -> str:
    return node.name or exoapi.short_id(node.node_id)


class _Families(Collector):
    """A collector that yields the families built for one scrape."""

    def __init__(self, families: Iterable[Metric]) -> None:
        self._families = list(families)

    def collect(self) -> Iterator[Metric]:
        yield from self._families


def _gauge(name: str, doc: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, labels=labels or [])


def families(view: ClusterView, record: oom.RunRecord, took_s: float) -> list[Metric]:
    """Every metric of one scrape, from the cluster view and the run record."""
    out: list[Metric] = []
    report = view.report
    up = _gauge("exo_up", "1 when this host's EXO node API answers /node_id, else 0.")
    up.add_metric([], 1.0 if report.view is not None else 0.0)
    status = _gauge(
        "exo_health_status",
        "The node's verdict as `exo-nixos health` gives it: 1 for the current one.",
        ["status"],
    )
    for value in _STATES:
        status.add_metric([value], 1.0 if view.verdict.value == value else 0.0)
    problems = _gauge("exo_problems", "Problems that make the cluster degraded (see status).")
    problems.add_metric([], float(len(view.problems)))
    probe = _gauge("exo_probe_duration_seconds", "Seconds the probe of the local API took.")
    probe.add_metric([], report.view.elapsed_s if report.view else took_s)
    scrape = _gauge("exo_exporter_scrape_duration_seconds", "Seconds this scrape took.")
    scrape.add_metric([], took_s)
    out += [up, status, problems, probe, scrape]

    out += _node_families(view)
    out += _instance_families(view)
    out += _download_families(view)
    out += _supervisor_families(view, record)
    out += _pressure_families(view)
    return out


def _node_families(view: ClusterView) -> list[Metric]:
    count = _gauge("exo_cluster_nodes", "Nodes in the cluster state of this host's node.")
    count.add_metric([], float(len(view.nodes)))
    info = InfoMetricFamily(
        "exo_node", "A node of the cluster: its current id, host and backends.", labels=["node"]
    )
    node_up = _gauge(
        "exo_node_up",
        "1 when the node's API answers /node_id with its id from this host, else 0.",
        ["node"],
    )
    master = _gauge("exo_node_master", "1 for the elected master (where known).", ["node"])
    total = _gauge("exo_node_memory_total_bytes", "The node's RAM as EXO reports it.", ["node"])
    available = _gauge(
        "exo_node_memory_available_bytes",
        "RAM EXO counts as available on the node (OVERRIDE_MEMORY_MB where set).",
        ["node"],
    )
    gpu = _gauge(
        "exo_node_gpu_utilization_ratio", "GPU use EXO reports for the node (0 to 1).", ["node"]
    )
    for node in view.nodes:
        label = node_label(node)
        info.add_metric(
            [label],
            {
                "node_id": node.node_id,
                "host": node.host or "",
                "backends": ",".join(node.backends),
            },
        )
        node_up.add_metric([label], 1.0 if node.reach.reachable else 0.0)
        if node.master is not None:
            master.add_metric([label], 1.0 if node.master else 0.0)
        if node.memory_total_bytes is not None:
            total.add_metric([label], float(node.memory_total_bytes))
        if node.memory_available_bytes is not None:
            available.add_metric([label], float(node.memory_available_bytes))
        if node.gpu_usage_ratio is not None:
            gpu.add_metric([label], node.gpu_usage_ratio)
    return [count, info, node_up, master, total, available, gpu]


def _instance_families(view: ClusterView) -> list[Metric]:
    instances = _gauge(
        "exo_instances",
        "Model instances by model, sharding and state (the least advanced runner's).",
        ["model", "sharding", "state"],
    )
    counts: dict[tuple[str, str, str], int] = {}
    runners: dict[str, int] = {}
    for i in view.instances:
        key = (i.model_id, i.sharding or "unknown", i.state)
        counts[key] = counts.get(key, 0) + 1
        for _, state in i.runners:
            runners[state] = runners.get(state, 0) + 1
    for key, n in sorted(counts.items()):
        instances.add_metric(list(key), float(n))
    runner_family = _gauge(
        "exo_runners", "Runners (one per node of an instance) by state.", ["state"]
    )
    for state, n in sorted(runners.items()):
        runner_family.add_metric([state], float(n))
    return [instances, runner_family]


def _download_families(view: ClusterView) -> list[Metric]:
    names = {n.node_id: node_label(n) for n in view.nodes}
    progress = _gauge(
        "exo_download_progress_ratio", "How much of a model a node has (0 to 1).", ["node", "model"]
    )
    size = _gauge("exo_download_size_bytes", "Size of a model being downloaded.", ["node", "model"])
    speed = _gauge(
        "exo_download_speed_bytes_per_second", "Current download speed.", ["node", "model"]
    )
    by_status = _gauge("exo_downloads", "Downloads by status.", ["status"])
    statuses: dict[str, int] = {}
    for d in view.downloads:
        labels = [names.get(d.node_id, exoapi.short_id(d.node_id)), d.model_id]
        progress.add_metric(labels, d.fraction)
        size.add_metric(labels, float(d.total_bytes))
        speed.add_metric(labels, d.speed_bytes_per_s)
        statuses[d.status] = statuses.get(d.status, 0) + 1
    for status, n in sorted(statuses.items()):
        by_status.add_metric([status], float(n))
    return [progress, size, speed, by_status]


def _supervisor_families(view: ClusterView, record: oom.RunRecord) -> list[Metric]:
    out: list[Metric] = []
    starts = CounterMetricFamily(
        "exo_node_starts", "Starts of this host's node unit (the supervisor) ever recorded."
    )
    starts.add_metric([], float(record.starts))
    kills = CounterMetricFamily(
        "exo_node_oom_kills", "Runs of this host's node unit that ended in an OOM kill."
    )
    kills.add_metric([], float(record.oom_kills))
    steps = _gauge(
        "exo_memory_backoff_steps",
        f"Steps of {oom.STEP:.0%} by which the memory offered to EXO is lowered after OOM kills.",
    )
    steps.add_metric([], float(record.steps_at(time.time())))
    out += [starts, kills, steps]
    facts = view.facts
    if facts is not None:
        accelerator = InfoMetricFamily(
            "exo_accelerator", "The accelerator EXO runs on here, and why it fell back to CPU."
        )
        accelerator.add_metric(
            [],
            {
                "accelerator": facts.accelerator,
                "role": facts.role,
                "fallback": "1" if facts.fallback else "0",
                "fallback_reason": facts.fallback or "",
            },
        )
        out.append(accelerator)
        if facts.memory_offer_mb is not None:
            offer = _gauge(
                "exo_memory_offer_bytes", "Memory offered to EXO at its start (OVERRIDE_MEMORY_MB)."
            )
            offer.add_metric([], float(facts.memory_offer_mb << 20))
            out.append(offer)
    return out


def _pressure_families(view: ClusterView) -> list[Metric]:
    cgroup = view.cgroup
    if cgroup is None or cgroup.pressure is None:
        return []
    p = cgroup.pressure
    ratio = _gauge(
        "exo_node_unit_memory_pressure_ratio",
        "Share of time tasks of the node unit stalled on memory (PSI averages, 0 to 1).",
        ["kind", "window"],
    )
    stalled = CounterMetricFamily(
        "exo_node_unit_memory_stalled_seconds",
        "Time tasks of the node unit stalled on memory (PSI total).",
        labels=["kind"],
    )
    for kind, stall in (("some", p.some), ("full", p.full)):
        for window, value in (("10s", stall.avg10), ("60s", stall.avg60), ("300s", stall.avg300)):
            ratio.add_metric([kind, window], value / 100)
        stalled.add_metric([kind], stall.total_us / 1e6)
    degraded = _gauge(
        "exo_node_unit_memory_pressure_degraded",
        "1 while memory pressure is sustained enough to count as degraded.",
    )
    degraded.add_metric([], 1.0 if p.degraded else 0.0)
    out: list[Metric] = [ratio, stalled, degraded]
    for name, doc, size in (
        (
            "exo_node_unit_memory_bytes",
            "Memory the node unit uses (memory.current).",
            cgroup.current_bytes,
        ),
        (
            "exo_node_unit_memory_high_bytes",
            "The node unit's MemoryHigh (memory.high).",
            cgroup.high_bytes,
        ),
        (
            "exo_node_unit_memory_max_bytes",
            "The node unit's MemoryMax (memory.max).",
            cgroup.max_bytes,
        ),
    ):
        if size is not None:
            family = _gauge(name, doc)
            family.add_metric([], float(size))
            out.append(family)
    return out


async def scrape(sources: Sources, session: aiohttp.ClientSession) -> bytes:
    """One scrape: probe, gather, render in the text exposition format."""
    started = time.monotonic()
    report = await assess_async(sources.target, session)
    target = sources.target
    view = await gather_async(
        report, local=sources.local, api_port=target.api_port, timeout_s=target.timeout_s
    )
    record = await asyncio.to_thread(oom.load, oom.record_path(sources.data_dir))
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families(view, record, time.monotonic() - started)))
    return generate_latest(registry)


def build_app(sources: Sources) -> web.Application:
    session_key = web.AppKey("session", aiohttp.ClientSession)
    app = web.Application()

    async def metrics(request: web.Request) -> web.Response:
        body = await scrape(sources, request.app[session_key])
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def index(_: web.Request) -> web.Response:
        return web.Response(text=f"exo-nixos exporter: metrics at {METRICS_PATH}\n")

    async def session_context(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession() as session:
            app[session_key] = session
            yield

    app.cleanup_ctx.append(session_context)
    app.router.add_get(METRICS_PATH, metrics)
    app.router.add_get("/", index)
    return app


def sources_for(config: Config, cgroup_root: Path) -> Sources:
    """The local node of ``config``: its API, runtime and state directories, its unit."""
    target = target_for(config)
    return Sources(target, local_for(target, cgroup_root), Path(config.security.data_dir))


async def serve(config: Config, cgroup_root: Path) -> None:
    """Serve ``/metrics`` on the configured address until SIGTERM or SIGINT."""
    import signal

    from exo_nixos.supervisor.notify import Notifier

    settings = config.exporter
    runner = web.AppRunner(build_app(sources_for(config, cgroup_root)), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.listen_address, settings.port, shutdown_timeout=1.0)
    where = exoapi.url_for(settings.listen_address, settings.port)
    try:
        await site.start()
    except OSError as exc:
        await runner.cleanup()
        raise UserError(
            f"cannot listen on {where}: {os_reason(exc)}; free the port or set exporter.port"
        ) from None
    log.info("serving metrics at %s%s", where, METRICS_PATH)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    notifier = Notifier.from_environ()
    notifier.ready(f"metrics at {where}{METRICS_PATH}")
    try:
        await stop.wait()
    finally:
        notifier.stopping("stopping")
        notifier.close()
        await runner.cleanup()
