"""``exo-nixos k3s render`` and ``exo-nixos k3s register``."""

from __future__ import annotations

import argparse
import sys

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    render = sub.add_parser(
        "render",
        help="print the static objects (Namespace, RBAC, Service, NetworkPolicy) as YAML",
    )
    render.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="config JSON")
    render.add_argument("--output", "-o", help="write the YAML to this file instead of stdout")

    register = sub.add_parser(
        "register",
        help="keep this node's EndpointSlice ready while EXO is healthy; remove it on stop",
    )
    register.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="config JSON")
    register.add_argument(
        "--resync-sec",
        type=float,
        default=60.0,
        help="re-read the slice this often to repair changes made by others (default 60)",
    )
    register.add_argument(
        "--backoff-initial-sec",
        type=float,
        default=1.0,
        help="first retry delay while the API server fails (default 1, doubling)",
    )
    register.add_argument(
        "--backoff-max-sec",
        type=float,
        default=60.0,
        help="longest retry delay while the API server fails (default 60)",
    )
    register.add_argument(
        "--request-timeout-sec",
        type=float,
        default=10.0,
        help="timeout of one API request (default 10)",
    )
    register.add_argument(
        "--stop-timeout-sec",
        type=float,
        default=10.0,
        help="how long to keep trying to delete the endpoint on stop (default 10)",
    )


def main(args: argparse.Namespace) -> int:
    from exo_nixos.config import load_config

    config = load_config(args.config)
    if args.action == "render":
        from exo_nixos.fsutil import write_output
        from exo_nixos.k3s.render import render_yaml

        text = render_yaml(config)
        if args.output:
            write_output("--output", args.output, text)
        else:
            sys.stdout.write(text)
        return 0
    from exo_nixos.k3s.service import build_registrar, run_registrar

    registrar = build_registrar(
        config,
        resync=args.resync_sec,
        backoff_initial=args.backoff_initial_sec,
        backoff_max=args.backoff_max_sec,
        request_timeout=args.request_timeout_sec,
        stop_timeout=args.stop_timeout_sec,
    )
    return run_registrar(config, registrar)
