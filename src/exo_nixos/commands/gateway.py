"""``exo-nixos gateway --config FILE``: the authenticated, health-aware API gateway."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import TYPE_CHECKING

from exo_nixos.commands.rootarg import add_config_argument

if TYPE_CHECKING:
    import asyncio


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--check",
        action="store_true",
        help="only check the config, API key file and TLS files, then exit (0 usable, 2 not)",
    )


def main(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    from exo_nixos.config import load_config
    from exo_nixos.errors import UserError
    from exo_nixos.gateway.server import check, serve
    from exo_nixos.gateway.workers import default_workers, supervise

    config = load_config(args.config)
    if not config.gateway.enable:
        raise UserError(f"{args.config}: gateway.enable is false; enable it to run the gateway")
    if args.check:
        print(check(config))
        return 0
    logging.basicConfig(
        level=config.log_level.upper(),
        format="%(levelname)s %(name)s: %(message)s",
    )
    workers = config.gateway.workers or default_workers()
    if workers > 1:
        return supervise(config, workers, _loop_factory())
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(serve(config))
    return 0


def _loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop where it is installed (faster proxying); asyncio's otherwise."""
    try:
        import uvloop
    except ImportError:
        return None
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory
