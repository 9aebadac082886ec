"""``exo-nixos doctor``: a readable report of what this host would run and what is wrong."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH
from exo_nixos.commands.rootarg import add_root_argument, checked_root


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config",
        type=Path,
        help=f"config file, which must exist (default: {DEFAULT_CONFIG_PATH}, or when that is "
        "absent the defaults of services.exo.enable)",
    )
    add_root_argument(parser)
    parser.add_argument("--no-nvml", action="store_true", help="do not ask the NVIDIA driver")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")


def main(args: argparse.Namespace) -> int:
    from exo_nixos.doctor import diagnose

    named = args.config is not None
    report = diagnose(
        args.config if named else DEFAULT_CONFIG_PATH,
        checked_root(args.root),
        use_nvml=not args.no_nvml,
        required=named,
    )
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print(report.text())
    return 1 if report.problems else 0
