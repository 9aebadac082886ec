"""``exo-nixos detect [--json | --env] [--root DIR] [--config FILE] [--no-nvml]``.

Runs at every service start: pydantic is imported only with ``--config``, pynvml only when a
GPU is bound to the nvidia driver.
"""

from __future__ import annotations

import argparse
import json
import sys

from exo_nixos.commands.rootarg import add_root_argument, checked_root


def configure(parser: argparse.ArgumentParser) -> None:
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print the full inventory as JSON")
    output.add_argument(
        "--env", action="store_true", help="print KEY=VALUE lines for a systemd EnvironmentFile"
    )
    add_root_argument(parser)
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="decide with this config's preferences and installed variants "
        "(without it: as if every EXO variant were installed)",
    )
    parser.add_argument("--no-nvml", action="store_true", help="do not ask NVML about NVIDIA GPUs")
    parser.add_argument(
        "--models-dir",
        metavar="DIR",
        help="report free disk here (default: the config's models dir, else /var/lib/exo/models)",
    )


def main(args: argparse.Namespace) -> int:
    from exo_nixos.hardware.decide import HardwareSettings, decide
    from exo_nixos.hardware.detection import DEFAULT_MODELS_DIR, detect
    from exo_nixos.hardware.instances import Instance, instances, plan
    from exo_nixos.hardware.report import env_lines, full_json, node_lines, text_lines

    if args.models_dir is not None and "\0" in args.models_dir:
        from exo_nixos.errors import UserError, describe_value

        raise UserError(f"--models-dir {describe_value(args.models_dir)}: contains a NUL byte")
    settings = HardwareSettings()
    models_dir = args.models_dir or DEFAULT_MODELS_DIR
    configured: list[Instance] = []
    if args.config:
        from exo_nixos.config import load_config

        config = load_config(args.config)
        settings = HardwareSettings.from_config(config.hardware)
        models_dir = args.models_dir or config.effective_models_dir
        configured = instances(config.hardware.node_per_gpu)
    inventory = detect(checked_root(args.root), use_nvml=not args.no_nvml, models_dir=models_dir)
    decision = decide(settings, inventory)
    nodes = plan(configured, inventory)
    if args.json:
        json.dump(full_json(inventory, decision, nodes), sys.stdout, indent=2)
        sys.stdout.write("\n")
    elif args.env:
        sys.stdout.write("".join(f"{line}\n" for line in env_lines(decision)))
        for warning in inventory.warnings:
            print(f"exo-nixos: warning: {warning}", file=sys.stderr)
    else:
        lines = text_lines(inventory, decision) + node_lines(nodes)
        sys.stdout.write("".join(f"{line}\n" for line in lines))
    return 0
