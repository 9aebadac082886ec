"""``exo-nixos status``: the cluster at a glance: nodes (checked from here), instances,
downloads, this host's accelerator and memory pressure. Exit codes as ``health``."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.commands.health import _positive_seconds, add_target_arguments
from exo_nixos.monitoring.psi import CGROUP_ROOT

if TYPE_CHECKING:
    from exo_nixos.monitoring.cluster import ClusterView
    from exo_nixos.nodehealth import Target


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)
    parser.add_argument(
        "--api-key-file",
        metavar="FILE",
        help="send the key in FILE (the key alone, or a gateway key file: its first key) "
        "as 'Authorization: Bearer': for --url pointing at the gateway",
    )
    parser.add_argument(
        "--watch",
        nargs="?",
        const=2.0,
        type=_positive_seconds,
        metavar="S",
        help="refresh in place every S seconds (default 2) until Ctrl-C",
    )
    parser.add_argument(
        "--cgroup-root",
        default=str(CGROUP_ROOT),
        metavar="DIR",
        help="where the node unit's cgroup is read (default %(default)s)",
    )


def _target(args: argparse.Namespace) -> Target:
    from exo_nixos.gateway.auth import read_client_key
    from exo_nixos.nodehealth import resolve_target

    key = read_client_key(args.api_key_file) if args.api_key_file else None
    return resolve_target(args.url, args.config, args.timeout, api_key=key)


def _view(target: Target, cgroup_root: str) -> ClusterView:
    from exo_nixos.monitoring.cluster import gather, local_for
    from exo_nixos.nodehealth import assess

    local = local_for(target, Path(cgroup_root))
    return gather(assess(target), local=local, api_port=target.api_port, timeout_s=target.timeout_s)


def main(args: argparse.Namespace) -> int:
    target = _target(args)
    if args.watch is not None:
        return _watch(target, args)
    view = _view(target, args.cgroup_root)
    if args.json:
        json.dump(view.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        from rich.console import Console

        from exo_nixos.monitoring.render import render

        Console(soft_wrap=True).print(render(view))
    return view.verdict.exit_code


def _watch(target: Target, args: argparse.Namespace) -> int:
    """Refresh until Ctrl-C: the tables in place, or with ``--json`` one object per line."""
    import time

    view = _view(target, args.cgroup_root)
    try:
        if args.json:
            while True:
                sys.stdout.write(json.dumps(view.to_json(), sort_keys=True) + "\n")
                sys.stdout.flush()
                time.sleep(args.watch)
                view = _view(target, args.cgroup_root)
        from rich.live import Live

        from exo_nixos.monitoring.render import render

        with Live(render(view), auto_refresh=False) as live:
            while True:
                time.sleep(args.watch)
                view = _view(target, args.cgroup_root)
                live.update(render(view), refresh=True)
    except KeyboardInterrupt:
        pass
    return view.verdict.exit_code
