"""The ``exo-nixos`` command line.

Only the invoked command's module is imported, so start-up stays fast: each command module
keeps heavy libraries out of its top level and imports them where they are used.
"""

from __future__ import annotations

import argparse
import importlib
import signal
import sys
from collections.abc import Sequence
from typing import Protocol

from exo_nixos import __version__
from exo_nixos.errors import ConfigError, UserError

# command -> (module under exo_nixos.commands, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "doctor": ("doctor", "report what this host would run and the problems found"),
    "config": ("config", "validate a config file or print its JSON Schema"),
    "preflight": ("preflight", "check ports, interfaces, directories, memory and devices"),
    "health": ("health", "probe an EXO node's API (exit 0 healthy, 1 degraded, 2 down)"),
    "status": ("status", "show the cluster: nodes, memory, instances, downloads, pressure"),
    "detect": ("detect", "detect GPUs, CPU and memory and choose the accelerator"),
    "net": ("net", "inspect interfaces, bonds, Thunderbolt and RDMA; pick the cluster link"),
    "run": ("run", "supervise an EXO node under systemd (Type=notify, watchdog)"),
    "instance-net": (
        "instance_net",
        "make the network namespace and macvlan of a node per GPU (or the host's link)",
    ),
    "gateway": ("gateway", "serve the authenticated, health-aware API gateway"),
    "exporter": ("exporter", "serve the cluster's state as Prometheus metrics"),
    "record-stop": ("record_stop", "record how the node's run ended (ExecStopPost; OOM back-off)"),
    "k3s": ("k3s", "render K3s manifests or keep this node registered in an EndpointSlice"),
    "models": ("models", "declared models: list, pull, place, remove, reconcile, verify the cache"),
}


class CommandModule(Protocol):
    def configure(self, parser: argparse.ArgumentParser) -> None: ...

    def main(self, args: argparse.Namespace) -> int: ...


def _load(command: str) -> CommandModule:
    module_name, _ = COMMANDS[command]
    module: CommandModule = importlib.import_module(f"exo_nixos.commands.{module_name}")
    return module


def build_parser(command: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="exo-nixos",
        description="Run EXO distributed AI inference on NixOS machines.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        child = sub.add_parser(name, help=help_text, description=help_text)
        if name == command:
            _load(name).configure(child)
    return parser


def one_line(message: str) -> str:
    """Messages quoting other tools (YAML parsers, OpenSSL) can span lines; the CLI's do not."""
    return " ".join(message.split())


def main(argv: Sequence[str] | None = None) -> int:
    args_list = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in args_list if not a.startswith("-")), None)
    parser = build_parser(command if command in COMMANDS else None)
    args = parser.parse_args(args_list)
    try:
        return _load(args.command).main(args)
    except ConfigError as exc:
        for line in exc.problems or [str(exc)]:
            print(f"exo-nixos: error: {one_line(line)}", file=sys.stderr)
        return exc.exit_code
    except UserError as exc:
        print(f"exo-nixos: error: {one_line(str(exc))}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    except BrokenPipeError:
        return 0
