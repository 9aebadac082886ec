"""The ``--root DIR`` option every command that reads /sys, /proc and /dev shares."""

from __future__ import annotations

import argparse
from pathlib import Path

from exo_nixos.errors import UserError


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
