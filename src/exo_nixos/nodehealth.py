"""Health verdicts and the target of ``exo-nixos health`` / ``status``.

healthy (exit 0): ``/node_id``, ``/state`` and ``/models`` answer and the node has applied
events from a master. degraded (exit 1): ``/node_id`` answers but something else does not
(see ``NodeView.problems``). down (exit 2): ``/node_id`` gives no id: nothing listens, a
timeout, an HTTP error or a garbled answer.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Any

from exo_nixos.addresses import local_api_url
from exo_nixos.config import DEFAULT_CONFIG_PATH, Config, load_config
from exo_nixos.exoapi import (
    DEFAULT_URL,
    MASTER_HINT_FILE,
    ExoApiError,
    NodeView,
    normalize_url,
    probe_sync,
    read_master_hint,
    short_id,
)
from exo_nixos.fsutil import os_reason

DEFAULT_TIMEOUT_S = 3.0


class Verdict(StrEnum):
    HEALTHY = "healthy"
    DEGRADED = "degraded"
    DOWN = "down"

    @property
    def exit_code(self) -> int:
        return {"healthy": 0, "degraded": 1, "down": 2}[self.value]


@dataclass(frozen=True)
class Target:
    """Where to probe and how patiently, from the command line and the config."""

    url: str
    timeout_s: float
    hint_dir: Path | None = None
    """Where the supervisor leaves the master it read from exo's log (the runtime dir)."""


def resolve_target(
    url: str | None, config_path: str | None, timeout_s: float | None = None
) -> Target:
    """``--url`` wins; else ``http://127.0.0.1:{apiPort}`` from the config; else port 52415.

    The config is ``--config FILE`` or, when neither it nor ``--url`` is given and it
    exists, ``/etc/exo/config.json``. The timeout defaults to ``healthCheck.timeoutSec``.
    """
    config: Config | None = None
    if config_path is not None:
        config = load_config(config_path)
    elif url is None and DEFAULT_CONFIG_PATH.exists():
        config = load_config(DEFAULT_CONFIG_PATH)
    if url is None:
        url = local_api_url(config.api_port) if config else DEFAULT_URL
    if timeout_s is None:
        timeout_s = config.health_check.timeout_sec if config else DEFAULT_TIMEOUT_S
    hint_dir = Path(config.security.runtime_dir) if config else None
    return Target(url=url, timeout_s=timeout_s, hint_dir=hint_dir)


@dataclass(frozen=True)
class HealthReport:
    verdict: Verdict
    url: str
    view: NodeView | None = None
    reason: str | None = None
    """Why the node is down (one line); ``None`` unless down."""
    master_unread: str | None = None
    """Why the supervisor's master hint could not be read (e.g. no permission), if so."""

    @property
    def problems(self) -> tuple[str, ...]:
        if self.view is not None:
            return self.view.problems
        return (self.reason,) if self.reason else ()

    def to_json(self) -> dict[str, Any]:
        return {
            "status": self.verdict.value,
            "url": self.url,
            "nodeId": self.view.node_id if self.view else None,
            "problems": list(self.problems),
            "node": self.view.to_json() if self.view else None,
        }


def assess(target: Target) -> HealthReport:
    """Probe the node once and give the verdict. Only a malformed URL raises (ExoApiError)."""
    url = normalize_url(target.url)
    try:
        view = probe_sync(url, target.timeout_s)
    except ExoApiError as exc:
        return HealthReport(verdict=Verdict.DOWN, url=url, reason=str(exc))
    unread = None
    if target.hint_dir is not None:
        master = read_master_hint(target.hint_dir, view.node_id)
        if master is not None:
            view = view.with_master(master)
        elif view.master_id is None:
            unread = _unreadable(target.hint_dir / MASTER_HINT_FILE)
    verdict = Verdict.HEALTHY if view.healthy else Verdict.DEGRADED
    return HealthReport(verdict=verdict, url=view.url, view=view, master_unread=unread)


def _unreadable(path: Path) -> str | None:
    """Why ``path`` cannot be read by this user, or None (readable, or simply absent)."""
    try:
        path.open("rb").close()
    except FileNotFoundError:
        return None
    except PermissionError:
        return f"cannot read {path} as this user; run as root or the service user"
    except OSError as exc:
        return f"cannot read {path}: {os_reason(exc)}"
    return None


def render_status(report: HealthReport) -> str:
    """The human text of ``exo-nixos status``: one fact per line, problems last."""
    lines = [f"status     {report.verdict.value} ({report.url})"]
    view = report.view
    if view is None:
        lines.append(f"problem    {report.reason}")
        return "\n".join(lines) + "\n"
    lines.append(f"node       {view.node_id}")
    if view.master_id is None and report.master_unread:
        lines.append(f"master     unknown ({report.master_unread})")
    elif view.master_id is None:
        lines.append("master     unknown (exo's API does not name the master)")
    elif view.is_master:
        lines.append("master     yes (this node)")
    else:
        lines.append(f"master     no (master is {view.master_id})")
    if not view.state_ok:
        lines.append("peers      unknown (/state did not answer)")
    elif not view.peers:
        lines.append("peers      none")
    else:
        lines.append(f"peers      {len(view.peers)}")
        for peer in view.peers:
            where = ", ".join(peer.api_urls or peer.addresses) or "address unknown"
            name = f" {peer.friendly_name}" if peer.friendly_name else ""
            lines.append(f"  {peer.node_id}{name} ({where})")
    if view.state_ok:
        lines.append(f"instances  {len(view.instances) or 'none'}")
        for instance in view.instances:
            nodes = ", ".join(short_id(n) for n in instance.node_ids) or "no nodes"
            states = sorted({s for _, s in instance.runner_status})
            state = f" [{', '.join(states)}]" if states else ""
            lines.append(f"  {instance.model_id or '(unknown model)'} on {nodes}{state}")
    lines.append(f"models     {len(view.model_ids) if view.models_ok else 'unavailable'}")
    lines.extend(f"problem    {p}" for p in view.problems)
    return "\n".join(lines) + "\n"
