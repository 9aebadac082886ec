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

import aiohttp

from exo_nixos.addresses import local_api_url
from exo_nixos.basetypes import EXO_API_PORT
from exo_nixos.config import DEFAULT_CONFIG_PATH, Config, load_config
from exo_nixos.exoapi import (
    DEFAULT_URL,
    MASTER_HINT_FILE,
    ExoApiError,
    NodeView,
    normalize_url,
    probe,
    read_master_hint,
    run_coroutine,
)
from exo_nixos.fsutil import os_reason
from exo_nixos.supervisor.environment import role_for

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
    headers: tuple[tuple[str, str], ...] = ()
    """Sent with each request: ``Authorization`` when the URL is the gateway."""
    api_port: int = EXO_API_PORT
    """The cluster's API port (the peers' ``/node_id`` is asked there)."""
    node_unit: str | None = None
    """This host's node unit, when the config says this host runs one."""


def resolve_target(
    url: str | None,
    config_path: str | None,
    timeout_s: float | None = None,
    api_key: str | None = None,
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
    return target_for(config, url, timeout_s, api_key)


def target_for(
    config: Config | None,
    url: str | None = None,
    timeout_s: float | None = None,
    api_key: str | None = None,
) -> Target:
    """The target :func:`resolve_target` describes, from a config already loaded (or none)."""
    if url is None:
        url = local_api_url(config.api_port) if config else DEFAULT_URL
    if timeout_s is None:
        timeout_s = config.health_check.timeout_sec if config else DEFAULT_TIMEOUT_S
    hint_dir = Path(config.security.runtime_dir) if config else None
    return Target(
        url=url,
        timeout_s=timeout_s,
        hint_dir=hint_dir,
        headers=(("Authorization", f"Bearer {api_key}"),) if api_key else (),
        api_port=config.api_port if config else EXO_API_PORT,
        node_unit=f"exo-{role_for(config)}" if config else None,
    )


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
    return run_coroutine(assess_async(target))


async def assess_async(
    target: Target, session: aiohttp.ClientSession | None = None
) -> HealthReport:
    """:func:`assess` for callers with an event loop (the exporter)."""
    url = normalize_url(target.url)
    try:
        view = await probe(url, target.timeout_s, session, headers=dict(target.headers) or None)
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
