"""``exo-nixos config validate FILE`` and ``exo-nixos config schema``."""

from __future__ import annotations

import argparse
import json
import sys


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
    validate = sub.add_parser("validate", help="check a config file; one line per problem")
    validate.add_argument("file", help="the config JSON (on a host: /etc/exo/config.json)")
    validate.add_argument("--quiet", "-q", action="store_true", help="print nothing when valid")
    validate.add_argument(
        "--name",
        metavar="NAME",
        help="call the document NAME in messages (the NixOS module's build check: services.exo)",
    )
    sub.add_parser("schema", help="print the JSON Schema of the config document")


def main(args: argparse.Namespace) -> int:
    from exo_nixos import config

    if args.action == "schema":
        json.dump(config.json_schema(), sys.stdout, indent=2, sort_keys=True)
        sys.stdout.write("\n")
        return 0
    loaded = config.load_config(args.file, name=args.name)
    if not args.quiet:
        shown = args.name or args.file
        print(f"{shown}: valid (schemaVersion {loaded.schema_version}, mode {loaded.mode})")
    return 0
