"""``exo-nixos status`` as tables (rich): nodes, instances, downloads, then what is wrong."""

from __future__ import annotations

from rich.console import Group, RenderableType
from rich.table import Table
from rich.text import Text

from exo_nixos import exoapi
from exo_nixos.monitoring.cluster import ClusterView, NodeRow
from exo_nixos.units import GIB


def gib(value: int | None) -> str:
    """A number of GiB for a table whose column says the unit."""
    return "?" if value is None else f"{value / GIB:.1f}"


def _memory(node: NodeRow) -> str:
    if node.memory_total_bytes is None:
        return "unknown"
    return f"{gib(node.memory_used_bytes)} / {gib(node.memory_total_bytes)} GiB"


def _master(value: bool | None) -> str:
    return "?" if value is None else ("yes" if value else "no")


def _accelerator(node: NodeRow) -> str:
    """Upstream's backends (``MlxCuda``...) and, on macOS, the chip: upstream publishes no
    GPU names (this host's are in ``exo-nixos detect``)."""
    parts = list(node.backends)
    if node.chip:
        parts.append(node.chip)
    return ", ".join(parts) or "unknown"


def _headline(view: ClusterView) -> Text:
    report = view.report
    text = Text()
    style = {"healthy": "green", "degraded": "yellow", "down": "red"}[view.verdict.value]
    text.append(f"cluster {view.verdict.value}", style=f"bold {style}")
    text.append(f" via {report.url}")
    if report.view is not None:
        text.append(f" (node {report.view.node_id}")
        master = report.view.master_id
        if master is None:
            text.append(", master unknown)")
        elif master == report.view.node_id:
            text.append(", the master)")
        else:
            text.append(f", master {exoapi.short_id(master)})")
        models = len(report.view.model_ids) if report.view.models_ok else "no"
        text.append(f"; {len(view.nodes)} nodes, {len(view.instances)} instances, {models} models")
    return text


def _local_line(view: ClusterView) -> Text | None:
    parts: list[str] = []
    facts = view.facts
    if facts is not None:
        accel = f"this host runs EXO on {facts.accelerator}"
        if facts.fallback:
            accel += f" (FALLBACK: {facts.fallback})"
        parts.append(accel)
        if facts.memory_offer_mb is not None:
            offer = f"offers EXO {facts.memory_offer_mb} MiB"
            if facts.memory_backoff_steps:
                offer += f" (lowered {facts.memory_backoff_steps} step(s) after OOM kills)"
            parts.append(offer)
    cgroup = view.cgroup
    if cgroup is not None and cgroup.pressure is not None:
        some = cgroup.pressure.some
        parts.append(f"memory pressure {some.avg10:.1f}% / {some.avg60:.1f}% (10 s / 60 s)")
        if cgroup.current_bytes is not None:
            limit = "" if cgroup.max_bytes is None else f" of {gib(cgroup.max_bytes)} GiB max"
            parts.append(f"unit uses {gib(cgroup.current_bytes)} GiB{limit}")
    return Text("; ".join(parts)) if parts else None


def _nodes(view: ClusterView) -> Table:
    table = Table(title="Nodes", title_justify="left", expand=False)
    for column in (
        "node",
        "name",
        "host",
        "master",
        "accelerator",
        "memory used / total",
        "instances",
        "reachable",
    ):
        table.add_column(column)
    for node in view.nodes:
        reach = "yes" if node.reach.reachable else Text("NO", style="bold red")
        table.add_row(
            exoapi.short_id(node.node_id) + (" *" if node.is_target else ""),
            node.name or "",
            node.host or "",
            _master(node.master),
            _accelerator(node),
            _memory(node),
            ", ".join(m.rsplit("/", 1)[-1] for m in node.instances) or "-",
            reach,
        )
    return table


def _instances(view: ClusterView) -> Table:
    table = Table(title="Instances", title_justify="left")
    for column in ("model", "sharding", "kind", "nodes", "state"):
        table.add_column(column)
    for i in view.instances:
        state: str | Text = i.state
        if i.state == "Failed":
            state = Text(f"Failed: {i.error}" if i.error else "Failed", style="bold red")
        table.add_row(
            i.model_id,
            i.sharding or "?",
            i.meta or "?",
            ", ".join(exoapi.short_id(n) for n in i.node_ids),
            state,
        )
    return table


def _downloads(view: ClusterView) -> Table:
    table = Table(title="Downloads", title_justify="left")
    for column in ("node", "model", "status", "progress", "size"):
        table.add_column(column)
    for d in view.downloads:
        size = f"{gib(d.downloaded_bytes)} / {gib(d.total_bytes)} GiB"
        progress = f"{d.fraction:.0%}"
        if d.status == "Ongoing" and d.speed_bytes_per_s > 0:
            progress += f" at {d.speed_bytes_per_s / (1 << 20):.0f} MiB/s"
            if d.eta_s is not None:
                progress += f", {d.eta_s:.0f} s left"
        status: str | Text = d.status
        if d.status == "Failed":
            status = Text(f"Failed: {d.error}", style="bold red")
        table.add_row(exoapi.short_id(d.node_id), d.model_id, status, progress, size)
    return table


def render(view: ClusterView) -> RenderableType:
    """Everything ``status`` shows, top to bottom."""
    parts: list[RenderableType] = [_headline(view)]
    if (local := _local_line(view)) is not None:
        parts.append(local)
    if view.nodes:
        parts.append(_nodes(view))
    if view.instances:
        parts.append(_instances(view))
    else:
        parts.append(Text("no instances"))
    if view.downloads:
        parts.append(_downloads(view))
    for problem in view.problems:
        parts.append(Text(f"problem: {problem}", style="yellow"))
    for note in view.notes:
        parts.append(Text(f"not seen: {note}", style="dim"))
    return Group(*parts)
