"""``exo-nixos exporter --config FILE``: serve the cluster's state as Prometheus metrics."""

from __future__ import annotations

import argparse

from exo_nixos.commands.rootarg import add_config_argument
from exo_nixos.monitoring.psi import CGROUP_ROOT


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--cgroup-root",
        default=str(CGROUP_ROOT),
        metavar="DIR",
        help="where the node unit's cgroup is read (default %(default)s)",
    )


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging
    from pathlib import Path

    from exo_nixos.config import load_config
    from exo_nixos.monitoring.exporter import serve

    config = load_config(args.config)
    logging.basicConfig(
        level=config.log_level.upper(), format="%(levelname)s %(name)s: %(message)s"
    )
    asyncio.run(serve(config, Path(args.cgroup_root)))
    return 0
