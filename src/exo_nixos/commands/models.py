"""``exo-nixos models``: the declared models, the cluster's downloads and instances, the cache.

``list``, ``pull``, ``place`` and ``remove`` talk to a node's API or, with ``--api-key-file``,
to the gateway; ``reconcile`` is ``exo-models.service``; ``verify`` checks model directories
offline (exit 0 clean, 1 damage found, 2 usage error).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.basetypes import DEFAULT_CONFIG_PATH
from exo_nixos.commands.health import _positive_seconds
from exo_nixos.errors import UserError
from exo_nixos.units import size

if TYPE_CHECKING:
    from exo_nixos.config import Config
    from exo_nixos.models.verify import ModelReport, Owner


def _add_target(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        help="a node's API or the gateway (default: this node's API from the config)",
    )
    parser.add_argument(
        "--api-key-file",
        type=Path,
        metavar="FILE",
        help="file holding an API key for the gateway (the part after 'name:'), sent as Bearer",
    )
    parser.add_argument(
        "--config",
        metavar="FILE",
        help="config JSON (default: /etc/exo/config.json when it exists)",
    )
    parser.add_argument(
        "--timeout",
        type=_positive_seconds,
        default=10.0,
        metavar="S",
        help="seconds to wait for each answer (default 10)",
    )


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", metavar="ACTION", required=True)

    listing = sub.add_parser("list", help="declared, downloaded and running models, per node")
    _add_target(listing)
    listing.add_argument("--json", action="store_true", help="print one JSON object")

    for name, text in (
        ("pull", "download a model onto the nodes a placement would use, with progress"),
        ("place", "place an instance of a model and wait until it is ready, with progress"),
    ):
        action = sub.add_parser(name, help=text, description=text)
        _add_target(action)
        action.add_argument("model", metavar="MODEL_ID", help="EXO model id (owner/name)")
        action.add_argument(
            "--wait",
            type=_positive_seconds,
            default=3600.0,
            metavar="S",
            help="give up after this many seconds (default 3600)",
        )
        action.add_argument(
            "--no-progress", action="store_true", help="plain lines even on a terminal"
        )
        if name == "place":
            # checked against the config model's enums when used (no pydantic at start-up)
            action.add_argument("--sharding", default="Pipeline", help="Pipeline or Tensor")
            action.add_argument("--instance-meta", default="MlxRing", help="MlxRing or MlxJaccl")
            action.add_argument("--min-nodes", type=int, default=1, metavar="N")

    remove = sub.add_parser("remove", help="delete the model's instances (its files stay)")
    _add_target(remove)
    remove.add_argument("model", metavar="MODEL_ID")

    reconcile = sub.add_parser(
        "reconcile",
        help="converge the cluster to the declared models (exo-models.service)",
    )
    reconcile.add_argument("--config", default=str(DEFAULT_CONFIG_PATH), help="config JSON")
    reconcile.add_argument("--url", help="this node's API (default: from the config)")
    reconcile.add_argument(
        "--once", action="store_true", help="one pass, then exit (0 converged, 1 not yet)"
    )

    verify = sub.add_parser(
        "verify",
        help="check model directories offline (exit 0 clean, 1 damage found, 2 usage error)",
    )
    verify.add_argument(
        "dirs",
        nargs="*",
        type=Path,
        metavar="DIR",
        help="a models directory or one model's directory (default: the config's model dirs)",
    )
    verify.add_argument("--repair", action="store_true", help="move damaged files to quarantine")
    verify.add_argument("--config", metavar="FILE", help="config JSON (default: /etc/exo/...)")
    verify.add_argument(
        "--quarantine", type=Path, metavar="DIR", help="default: the config's dataDir/quarantine"
    )
    verify.add_argument(
        "--owner",
        metavar="USER[:GROUP]",
        help="expected owner of the files (default with the config: its user and group)",
    )
    verify.add_argument(
        "--partial-age",
        type=_positive_seconds,
        default=None,
        metavar="S",
        help="a .partial file untouched this long is a leftover download (default 3600)",
    )
    verify.add_argument("--json", action="store_true", help="print one JSON object")


def main(args: argparse.Namespace) -> int:
    if args.action == "verify":
        return _verify(args)
    if args.action == "reconcile":
        from exo_nixos.models.reconcile import main as reconcile_main

        return reconcile_main(args)
    from exo_nixos.models.people import main as people_main

    return people_main(args)


# -- verify ------------------------------------------------------------------------------------


def _maybe_config(path: str | None) -> Config | None:
    from exo_nixos.config import load_config

    if path is not None:
        return load_config(path)
    return load_config(DEFAULT_CONFIG_PATH) if DEFAULT_CONFIG_PATH.exists() else None


def parse_owner(text: str) -> Owner:
    """``USER[:GROUP]`` (names or numbers) -> ids; a UserError names what does not exist."""
    import grp
    import pwd

    from exo_nixos.models.verify import Owner

    user, _, group = text.partition(":")
    try:
        uid = int(user) if user.isdigit() else pwd.getpwnam(user).pw_uid
    except KeyError:
        raise UserError(f"--owner {text!r}: no user {user!r} on this host") from None
    gid: int | None = None
    if group:
        try:
            gid = int(group) if group.isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            raise UserError(f"--owner {text!r}: no group {group!r} on this host") from None
    return Owner(uid, gid)


def _config_owner(config: Config) -> Owner | None:
    try:
        return parse_owner(f"{config.security.user}:{config.security.group}")
    except UserError:
        return None  # the service user is created on the node; elsewhere nothing to compare


def _verify(args: argparse.Namespace) -> int:
    from exo_nixos.models.verify import DEFAULT_PARTIAL_AGE_S, quarantine, verify

    config = _maybe_config(args.config) if args.config or not args.dirs else None
    owner = parse_owner(args.owner) if args.owner else None
    read_only: list[Path] = []
    if args.dirs:
        roots = list(args.dirs)
    elif config is not None:
        roots = [Path(config.effective_models_dir), *map(Path, config.extra_model_dirs)]
        read_only = [Path(d) for d in config.read_only_model_dirs]
        owner = owner or _config_owner(config)
    else:
        raise UserError(
            f"no DIR given and no {DEFAULT_CONFIG_PATH}: name the model directories to check"
        )
    for root in args.dirs:
        if not root.is_dir():
            raise UserError(f"{root}: not a directory: name a models directory or a model's")
    quarantine_dir = args.quarantine or (
        Path(config.effective_quarantine_dir) if config is not None else None
    )
    if args.repair and quarantine_dir is None:
        raise UserError("--repair needs --quarantine DIR (or a config naming the data dir)")
    age = args.partial_age or DEFAULT_PARTIAL_AGE_S
    reports = verify([r for r in roots if r.is_dir()], owner=owner, partial_age_s=age)
    reports += verify([r for r in read_only if r.is_dir()], partial_age_s=age)
    if args.repair and quarantine_dir is not None:
        writable = [r for r in reports if not any(_inside(r.directory, d) for d in read_only)]
        quarantine(writable, quarantine_dir)
    if args.json:
        json.dump(_verify_json(reports, quarantine_dir), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        sys.stdout.write(render_verify(reports, quarantine_dir if args.repair else None))
    return 1 if any(not r.clean for r in reports) else 0


def _inside(path: Path, parent: Path) -> bool:
    return path == parent or parent in path.parents


def render_verify(reports: list[ModelReport], quarantine_dir: Path | None) -> str:
    lines: list[str] = []
    for report in reports:
        state = "ok" if report.clean else "DAMAGED"
        lines.append(
            f"{state:<8}{report.directory} ({report.files} files, {size(report.bytes, 2)})"
        )
        lines += [f"  {d.line()}" for d in report.damage]
        lines += [f"  note: {n}" for n in report.notes]
        lines += [f"  moved {a} -> {b}" for a, b in report.moved]
    damaged = sum(len(r.damage) for r in reports)
    moved = sum(len(r.moved) for r in reports)
    summary = f"{len(reports)} model dir(s) checked, {damaged} problem(s)"
    if quarantine_dir is not None:
        summary += f", {moved} file(s) moved to {quarantine_dir}"
        if damaged > moved:
            summary += " (the rest: see each line; EXO downloads missing shards again)"
    elif damaged:
        summary += ": `exo-nixos models verify --repair` moves damaged files to quarantine"
    lines.append(summary)
    return "\n".join(lines) + "\n"


def _verify_json(reports: list[ModelReport], quarantine_dir: Path | None) -> dict[str, object]:
    return {
        "clean": all(r.clean for r in reports),
        "quarantine": str(quarantine_dir) if quarantine_dir else None,
        "models": [r.to_json() for r in reports],
    }
