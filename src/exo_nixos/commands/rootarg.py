"""Options several commands share: ``--root DIR`` of those that read /sys, /proc and /dev,
``--config FILE`` of the units' commands."""

from __future__ import annotations

import argparse
from pathlib import Path

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH
from exo_nixos.errors import UserError


def add_config_argument(parser: argparse.ArgumentParser) -> None:
    """``--config FILE``, default the installed config (the units pass it explicitly)."""
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG_PATH), help="the config JSON (default %(default)s)"
    )


def add_root_argument(parser: argparse.ArgumentParser, what: str = "/sys, /proc and /dev") -> None:
    parser.add_argument(
        "--root",
        type=Path,
        default=Path("/"),
        metavar="DIR",
        help=f"read {what} under DIR (a captured tree) instead of /",
    )


def checked_root(root: Path) -> Path:
    """``root`` when it is a directory; a one-line UserError otherwise."""
    if not root.is_dir():
        raise UserError(f"--root {root}: not a directory; pass the root of a captured tree or /")
    return root
