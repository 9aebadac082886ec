"""``exo-nixos preflight``: check the host before EXO starts; non-zero exit when a check fails."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH
from exo_nixos.commands.rootarg import add_root_argument, checked_root

if TYPE_CHECKING:
    from exo_nixos.preflight import CheckResult


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        default=DEFAULT_CONFIG_PATH,
        help="config file (default: %(default)s)",
    )
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--instance",
        metavar="NAME",
        help="also check one node of hardware.nodePerGpu: its namespace, link and GPUs",
    )
    add_root_argument(parser, "/sys, /proc, /dev and the service directories")


def format_results(results: list[CheckResult]) -> str:
    lines = []
    for result in results:
        line = f"{result.status.upper():<4}  {result.check}: {result.reason}"
        if result.fix:
            line += f"\n      fix: {result.fix}"
        lines.append(line)
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    from exo_nixos.config import load_config
    from exo_nixos.hardware import choose, detect
    from exo_nixos.hosttree import Tree
    from exo_nixos.preflight import Status, run_checks

    config = load_config(args.config)
    host = Tree(checked_root(args.root))
    inventory = detect(host.root, models_dir=config.effective_models_dir)
    results = run_checks(config, host, inventory, choose(config, inventory).accelerator)
    if args.instance is not None:
        from exo_nixos.hardware.instances import instance_for
        from exo_nixos.network.instance_checks import instance_checks

        instance = instance_for(config, args.instance)
        interface = config.networking.bond_interface or ""
        live = host.root == Path("/")
        results += instance_checks(instance, interface, inventory, live=live)
    if args.json:
        json.dump([r.to_json() for r in results], sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(format_results(results))
    failed = [r for r in results if r.status is Status.FAIL]
    if failed and not args.json:
        print(f"{len(failed)} check(s) failed", file=sys.stderr)
    return 1 if failed else 0
