"""``exo-nixos health``: probe an EXO node's API; exit 0 healthy, 1 degraded, 2 down."""

from __future__ import annotations

import argparse
import json
import math
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from exo_nixos.nodehealth import HealthReport


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


def add_target_arguments(parser: argparse.ArgumentParser) -> None:
    """``--url``, ``--config``, ``--timeout`` and ``--json``, shared with ``status``."""
    parser.add_argument(
        "--url",
        help="the node's API (default: http://127.0.0.1:{apiPort} from the config, else :52415)",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="config JSON (default: /etc/exo/config.json when it exists and --url is not given)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        metavar="S",
        help="seconds to wait for each answer (default: healthCheck.timeoutSec, else 3)",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")


def assess_target(args: argparse.Namespace) -> HealthReport:
    """Probe the node that the options of :func:`add_target_arguments` name."""
    from exo_nixos.nodehealth import assess, resolve_target

    return assess(resolve_target(args.url, args.config, args.timeout))


def print_json(report: HealthReport) -> None:
    """``--json`` output of ``health`` and ``status``: the report, one indented object."""
    json.dump(report.to_json(), sys.stdout, indent=2, sort_keys=True)
    sys.stdout.write("\n")


def configure(parser: argparse.ArgumentParser) -> None:
    add_target_arguments(parser)


def main(args: argparse.Namespace) -> int:
    report = assess_target(args)
    if args.json:
        print_json(report)
        return report.verdict.exit_code
    if report.view is None:
        print(f"down: {report.reason}")
    elif report.view.healthy:
        print(f"healthy: node {report.view.node_id} at {report.url}")
    else:
        print(f"degraded: node {report.view.node_id} at {report.url}")
        for problem in report.problems:
            print(f"  {problem}")
    return report.verdict.exit_code
