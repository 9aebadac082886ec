"""``exo-nixos status``: this node, the master, peers and running instances."""

from __future__ import annotations

import argparse
import sys

from exo_nixos.commands.health import add_target_arguments, assess_target, print_json


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def main(args: argparse.Namespace) -> int:
    from exo_nixos.nodehealth import render_status

    report = assess_target(args)
    if args.json:
        print_json(report)
    else:
        sys.stdout.write(render_status(report))
    return report.verdict.exit_code
