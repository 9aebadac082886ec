"""``exo-nixos record-stop --config FILE [--instance gpuN]``: the node unit's ``ExecStopPost``.

systemd tells ``ExecStopPost`` how the run ended in ``$SERVICE_RESULT`` (``success``,
``exit-code``, ``signal``, ``watchdog``, ``oom-kill``, ...). An ``oom-kill`` makes the next
start offer EXO less memory (:mod:`exo_nixos.supervisor.oom`).
"""

from __future__ import annotations

import argparse
import os

from exo_nixos.commands.rootarg import add_config_argument


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--result",
        default=None,
        help="how the run ended, as systemd's $SERVICE_RESULT names it (default: that variable)",
    )
    parser.add_argument(
        "--instance",
        default=None,
        help="with hardware.nodePerGpu: the node whose run ended (gpuN), as `run --instance`",
    )


def main(args: argparse.Namespace) -> int:
    import logging

    from exo_nixos.config import load_config
    from exo_nixos.hardware.instances import instance_for
    from exo_nixos.supervisor import oom
    from exo_nixos.supervisor.environment import instance_dirs
    from exo_nixos.supervisor.logs import setup_logging

    config = load_config(args.config)
    setup_logging(config.log_level)
    result = args.result if args.result is not None else os.environ.get("SERVICE_RESULT", "")
    instance = instance_for(config, args.instance) if args.instance is not None else None
    path = oom.record_path(instance_dirs(config, instance)[0])
    try:
        record = oom.record_stop(path, result)
    except OSError as exc:
        logging.getLogger(__name__).error("cannot record the stop in %s: %s", path, exc)
        return 1
    if result == oom.OOM_RESULT:
        logging.getLogger(__name__).warning(
            "EXO was killed for lack of memory (%d kill(s) recorded): the next start offers "
            "it %d%% less memory than the hardware decision",
            record.oom_kills,
            round(record.steps * oom.STEP * 100),
        )
    return 0
