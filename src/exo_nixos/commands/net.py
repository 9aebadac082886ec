"""``exo-nixos net``: interfaces, bonds, Thunderbolt, RDMA and the cluster interface choice.

``--watch`` follows the cluster interface(s) through netlink and prints every up/down change
with the resulting link health, until interrupted.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH
from exo_nixos.commands.rootarg import add_root_argument, checked_root
from exo_nixos.fsutil import os_reason

if TYPE_CHECKING:
    from exo_nixos.config import Config
    from exo_nixos.network import LinkMonitor


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON instead of text")
    add_root_argument(parser, "sysfs and procfs")
    parser.add_argument(
        "--config",
        metavar="FILE",
        help=f"the exo-nixos config (default {DEFAULT_CONFIG_PATH} when it exists)",
    )
    parser.add_argument(
        "--watch",
        action="store_true",
        help="follow the cluster interface(s) and the backup through netlink; print changes",
    )
    parser.add_argument(
        "--capture",
        metavar="DIR",
        help="copy the files this command reads into DIR (new or empty), for --root elsewhere",
    )
    parser.add_argument(
        "--interface",
        "-i",
        action="append",
        default=[],
        metavar="NAME",
        help="with --watch: watch NAME (repeat for more) instead of the configured interfaces",
    )


def _config(path: str | None) -> Config | None:
    """The config when one is given or installed; pydantic is imported only then."""
    if path is None and not DEFAULT_CONFIG_PATH.exists():
        return None
    from exo_nixos.config import load_config

    return load_config(path or DEFAULT_CONFIG_PATH)


def main(args: argparse.Namespace) -> int:
    from exo_nixos.network import choose_cluster_interface, inspect
    from exo_nixos.network.report import to_json, to_text

    config = _config(args.config)
    root = checked_root(args.root)
    if args.watch:
        return _watch(args, config)
    if args.capture:
        return _capture(Path(args.capture), root)
    inv = inspect(root)
    choice = choose_cluster_interface(config, inv)
    if args.json:
        json.dump(to_json(inv, choice), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(to_text(inv, choice))
    return 0 if choice.ok else 1


def _capture(dest: Path, root: Path) -> int:
    from exo_nixos.errors import UserError
    from exo_nixos.network.capture import capture

    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise UserError(f"--capture {dest}: exists and is not an empty directory; name a new one")
    try:
        inv, written = capture(dest, root)
    except OSError as exc:
        raise UserError(f"--capture {dest}: cannot write: {os_reason(exc)}") from None
    names = ", ".join(i.name for i in inv.interfaces) or "no interfaces"
    print(
        f"captured {written} files ({names}) to {dest}; read it with: exo-nixos net --root {dest}"
    )
    return 0


def _watch(args: argparse.Namespace, config: Config | None) -> int:
    import asyncio

    from exo_nixos.config import default_config
    from exo_nixos.errors import UserError
    from exo_nixos.network import LinkMonitor

    if Path(args.root).resolve() != Path("/"):
        raise UserError(
            f"--watch follows this kernel's links through netlink; it cannot watch the tree "
            f"under --root {args.root} (run `exo-nixos net --root {args.root}` for its report)"
        )
    monitor: LinkMonitor | None
    if args.interface:
        backup = config.networking.backup_interface if config else None
        monitor = LinkMonitor(args.interface, backup)
    else:
        monitor = LinkMonitor.for_config(config or default_config(), root=Path(args.root))
    if monitor is None:
        raise UserError("no cluster interface to watch; pass --interface NAME")
    return asyncio.run(_follow(monitor, as_json=args.json))


async def _follow(monitor: LinkMonitor, as_json: bool) -> int:
    import asyncio
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with monitor:
        events = aiter(monitor)
        while not stop.is_set():
            next_event = asyncio.ensure_future(anext(events))
            stopped = asyncio.ensure_future(stop.wait())
            done, _ = await asyncio.wait({next_event, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if next_event not in done:
                next_event.cancel()
                break
            stopped.cancel()
            event = next_event.result()
            health = monitor.health
            if as_json:
                line = json.dumps(
                    {
                        "interface": event.name,
                        "up": event.current.up,
                        "operstate": event.current.operstate,
                        "initial": event.previous is None,
                        "health": health.state,
                        "active": health.active,
                        "failover": health.failover,
                        "message": health.message,
                    }
                )
            else:
                line = f"{event.describe()}; {health.state}: {health.message}"
            print(line, flush=True)
    return 0
