"""``exo-nixos run --config FILE --role master|worker [--instance gpuN]``: the ExecStart of the
EXO node unit, or of one instance of it on a host that runs a node per GPU."""

from __future__ import annotations

import argparse
import os
import signal
from pathlib import Path
from typing import TYPE_CHECKING

from exo_nixos.addresses import local_api_url
from exo_nixos.commands.rootarg import add_config_argument

if TYPE_CHECKING:
    from exo_nixos.config import Config
    from exo_nixos.hardware.instances import Instance
    from exo_nixos.supervisor.environment import Launch
    from exo_nixos.supervisor.runner import LinkSource, Supervisor

ROLES = ("master", "worker")


def configure(parser: argparse.ArgumentParser) -> None:
    add_config_argument(parser)
    parser.add_argument(
        "--role",
        choices=ROLES,
        help="master adds --force-master (and --no-worker if configured); default from mode",
    )
    parser.add_argument(
        "--stop-timeout",
        type=float,
        default=20.0,
        metavar="SECONDS",
        help="SIGTERM to SIGKILL grace for EXO; keep it below TimeoutStopSec (%(default)s)",
    )
    parser.add_argument(
        "--host-root",
        default="/",
        metavar="DIR",
        help="read /dev, /proc and /sys below DIR when choosing the variant (default /)",
    )
    parser.add_argument(
        "--instance",
        metavar="NAME",
        help="run the node of one GPU group (hardware.nodePerGpu), e.g. gpu0: its GPUs only, "
        "its own directories",
    )
    parser.add_argument(
        "--dry-run",
        action="store_true",
        help="print the EXO command line and environment it would use, then exit",
    )


def main(args: argparse.Namespace) -> int:
    import asyncio

    from exo_nixos.config import load_config
    from exo_nixos.errors import UserError, describe_value
    from exo_nixos.hardware.instances import instance_for
    from exo_nixos.monitoring.psi import own_cgroup
    from exo_nixos.supervisor.environment import (
        build_launch,
        instance_dirs,
        role_for,
        snapshot_path,
    )
    from exo_nixos.supervisor.logs import setup_logging
    from exo_nixos.supervisor.notify import Notifier
    from exo_nixos.supervisor.runner import Settings, Supervisor
    from exo_nixos.supervisor.snapshot import SnapshotStore

    if "\0" in args.host_root:
        raise UserError(f"--host-root {describe_value(args.host_root)}: contains a NUL byte")
    config = load_config(args.config)
    role = args.role or role_for(config)
    if role == "master" and config.mode.value != "master":
        raise UserError(
            f"--role master needs mode 'master' in {args.config} (it is '{config.mode}'); "
            'set services.exo.mode = "master"'
        )
    if args.stop_timeout <= 0:
        raise UserError("--stop-timeout must be above zero seconds")
    host_root = Path(args.host_root)
    if not host_root.is_dir():
        raise UserError(f"--host-root {host_root}: not a directory; pass / or a captured tree")
    instance = instance_for(config, args.instance) if args.instance is not None else None
    setup_logging(config.log_level)
    launch = build_launch(config, role, root=host_root, instance=instance)
    if args.dry_run:
        return _dry_run(launch)
    shown_role = role if instance is None else f"{role}@{instance.name}"
    _record_start(config, shown_role, launch, instance)
    hc = config.health_check
    settings = Settings(
        role=shown_role,
        api_url=local_api_url(config.api_port),
        interval=hc.interval_sec,
        timeout=hc.timeout_sec,
        failures=hc.failures,
        stop_timeout=args.stop_timeout,
    )
    notifier = Notifier.from_environ()
    supervisor = Supervisor(
        launch,
        settings,
        notifier,
        SnapshotStore(snapshot_path(config, instance)),
        hint_dir=Path(instance_dirs(config, instance)[2]),
    )
    supervisor.links = _link_monitor(config, supervisor, host_root)
    supervisor.memory_cgroup = own_cgroup(host_root / "sys/fs/cgroup")
    try:
        status = asyncio.run(supervisor.run())
    finally:
        notifier.close()
    child = supervisor.child
    if child is not None and child.returncode is not None and child.returncode < 0:
        sig = -child.returncode
        if sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            # die the way EXO died, so systemd sees a clean stop by signal
            signal.signal(sig, signal.SIG_DFL)
            os.kill(os.getpid(), sig)
    return status


def _record_start(config: Config, role: str, launch: Launch, instance: Instance | None) -> None:
    """Count the start and leave the facts ``status`` and the exporter read (never fatal)."""
    import logging
    import time

    from exo_nixos.monitoring.facts import SupervisorFacts, write_facts
    from exo_nixos.supervisor import oom
    from exo_nixos.supervisor.environment import instance_dirs

    data_dir, _, runtime_dir = instance_dirs(config, instance)
    record = oom.record_start(oom.record_path(data_dir))
    facts = SupervisorFacts(
        role=role,
        accelerator=launch.selection.accelerator.value,
        fallback=launch.selection.fallback,
        memory_offer_mb=launch.memory_mb,
        memory_backoff_steps=record.steps_at(time.time()),
        started_at=time.time(),
    )
    try:
        Path(runtime_dir).mkdir(parents=True, exist_ok=True, mode=0o750)
        write_facts(runtime_dir, facts)
    except OSError as exc:
        logging.getLogger(__name__).warning("cannot write %s: %s", runtime_dir, exc)


def _dry_run(launch: Launch) -> int:
    """What a start would do: the accelerator and why, the command line, EXO's environment;
    exit 1 when the executable it would start is missing (a start would fail)."""
    selection = launch.selection
    print(f"accelerator: {selection.accelerator}")
    for reason in selection.reasons:
        print(f"  because: {reason}")
    if selection.fallback:
        print(f"  fallback: {selection.fallback}")
    print(" ".join(launch.argv))
    for key in sorted(launch.env):
        if key.startswith(("EXO_", "XDG_", "OVERRIDE_", "CUDA_", "HIP_", "HSA_")):
            print(f"{key}={launch.env[key]}")
    executable = Path(launch.argv[0])
    if not os.access(executable, os.X_OK):
        print(f"error: {executable} is not an executable file: a start would fail", flush=True)
        return 1
    return 0


def _link_monitor(config: Config, supervisor: Supervisor, root: Path) -> LinkSource | None:
    """The cluster-link watcher, or None when there is no interface to watch."""
    import logging

    from exo_nixos.network.watch import LinkMonitor

    try:
        return LinkMonitor.for_config(config, supervisor.on_link_change, root=root)
    except Exception as exc:  # a garbled /sys must not keep EXO from starting
        logging.getLogger(__name__).warning("not watching the cluster link: %s", exc)
        return None
