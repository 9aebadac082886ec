"""``exo-nixos status``: this node, the master, peers and running instances."""

from __future__ import annotations

import argparse
import json
import sys

from exo_nixos.commands.health import add_target_arguments


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from exo_nixos.nodehealth import assess, render_status, resolve_target

    report = assess(resolve_target(args.url, args.config, args.timeout))
    if args.json:
        json.dump(report.to_json(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_status(report))
    return report.verdict.exit_code
