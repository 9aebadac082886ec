"""The pinned EXO accepts every command line the supervisor builds.

The supervisor starts ``exo`` with ``--zenoh-port``, ``--discovery-port``, ``--namespace`` and
more; an EXO without one of them exits 2 at start (argparse), on every node. These tests read
the pinned revision's ``src/exo/main.py`` from a git directory of github.com/exo-explore/exo
(``EXO_NIXOS_UPSTREAM_GIT``), rebuild its argument parser from the ``add_argument`` calls of
``Args.parse`` (only those statements run, with a stand-in ``os`` so the environment does not
change defaults), and parse the argv ``exo_nixos.supervisor.environment`` builds for several
configurations. ``extraArgs`` are the operator's own and are left out.
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import io
import json
import os
import re
import subprocess
import types
from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import Accelerator, Config, parse_config
from exo_nixos.supervisor.environment import Selection, build_launch, role_for

REPO = Path(__file__).resolve().parent.parent
LOCK = json.loads((REPO / "flake.lock").read_text())
PINNED_REV = str(LOCK["nodes"][LOCK["nodes"]["root"]["inputs"]["exo"]]["locked"]["rev"])
UPSTREAM_GIT_ENV = "EXO_NIXOS_UPSTREAM_GIT"
EXTRA_ARGS = ["--no-batch", "--some-future-flag"]


def upstream_git() -> Path | None:
    value = os.environ.get(UPSTREAM_GIT_ENV)
    return Path(value) if value and Path(value).is_dir() else None


requires_upstream = pytest.mark.skipif(
    upstream_git() is None,
    reason=f"set {UPSTREAM_GIT_ENV} to a git dir of github.com/exo-explore/exo to check "
    "exo's command line at the pinned revision",
)


def git(*args: str) -> str:
    git_dir = upstream_git()
    assert git_dir is not None
    result = subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def _calls_parse_args(node: ast.AST) -> bool:
    return any(
        isinstance(n, ast.Call)
        and isinstance(n.func, ast.Attribute)
        and n.func.attr == "parse_args"
        for n in ast.walk(node)
    )


def upstream_parser(rev: str) -> argparse.ArgumentParser:
    """exo's ArgumentParser at ``rev``: ``Args.parse`` up to its ``parse_args()`` call."""
    module = ast.parse(git("show", f"{rev}:src/exo/main.py"))
    args_class = next(n for n in module.body if isinstance(n, ast.ClassDef) and n.name == "Args")
    parse = next(n for n in args_class.body if isinstance(n, ast.FunctionDef) and n.name == "parse")
    body: list[ast.stmt] = []
    for statement in parse.body:
        if _calls_parse_args(statement):
            break
        body.append(statement)
    else:
        pytest.fail(f"{rev}: Args.parse never calls parse_args(); upstream changed its CLI")
    code = compile(ast.Module(body=body, type_ignores=[]), f"{rev}:src/exo/main.py", "exec")
    clean_env = types.SimpleNamespace(getenv=lambda _name, default=None: default)
    namespace: dict[str, Any] = {
        "argparse": argparse,
        "os": clean_env,
        "__version__": "pinned",
    }
    # Runs the pinned dependency's own parser definition (add_argument calls only).
    exec(code, namespace)
    parser = namespace["parser"]
    assert isinstance(parser, argparse.ArgumentParser)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    """What exo's argparse makes of argv; fails with argparse's own message on exit 2."""
    stderr = io.StringIO()
    try:
        with contextlib.redirect_stderr(stderr):
            return parser.parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"exo would exit {exc.code} at start: {stderr.getvalue().strip()}")


def cfg(**doc: object) -> Config:
    return parse_config({"schemaVersion": 1, "extraArgs": EXTRA_ARGS, **doc})


CONFIGS = {
    "defaults": cfg(),
    "worker": cfg(mode="worker"),
    "auto": cfg(mode="auto"),
    "master": cfg(mode="master"),
    "master-no-worker": cfg(mode="master", noWorker=True),
    "offline": cfg(offline=True),
    "cluster-namespace": cfg(clusterNamespace="lab-2"),
    "debug": cfg(logLevel="debug"),
    "ports": cfg(apiPort=6000, networking={"zenohPort": 6001, "discoveryPort": 6002}),
    "everything": cfg(
        mode="master",
        noWorker=True,
        offline=True,
        clusterNamespace="lab",
        logLevel="debug",
        apiPort=6000,
        networking={"zenohPort": 6001, "discoveryPort": 6002},
    ),
}


def supervisor_argv(config: Config) -> list[str]:
    """The arguments the supervisor passes to exo, without the executable and extraArgs."""
    selection = Selection(Accelerator.CPU, "/nix/store/x-exo/bin/exo")
    launch = build_launch(config, role_for(config), base_env={}, selection=selection)
    assert launch.argv[0] == selection.executable
    assert launch.argv[-len(EXTRA_ARGS) :] == EXTRA_ARGS
    return launch.argv[1 : -len(EXTRA_ARGS)]


@pytest.fixture(scope="module")
def pinned_parser() -> argparse.ArgumentParser:
    return upstream_parser(PINNED_REV)


@pytest.mark.upstream
@requires_upstream
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_pinned_exo_accepts_the_supervisors_command_line(
    pinned_parser: argparse.ArgumentParser, name: str
):
    config = CONFIGS[name]
    args = parse(pinned_parser, supervisor_argv(config))
    # ... and reads each value where the tool means it to go.
    assert args.api_port == config.api_port
    assert args.zenoh_port == config.networking.zenoh_port
    assert args.discovery_port == config.networking.discovery_port
    if config.cluster_namespace:
        assert args.namespace == config.cluster_namespace
    assert args.force_master == (role_for(config) == "master")
    assert args.no_worker == (role_for(config) == "master" and config.no_worker)
    assert args.offline == config.offline
    assert args.verbosity == (1 if config.log_level == "debug" else 0)
    assert args.legacy_daemon is False


@pytest.mark.upstream
@requires_upstream
def test_every_flag_the_supervisor_uses_is_covered(pinned_parser: argparse.ArgumentParser):
    # The configurations above reach every flag the argv builder can emit.
    known = {o for action in pinned_parser._actions for o in action.option_strings}
    used = {a for c in CONFIGS.values() for a in supervisor_argv(c) if a.startswith("-")}
    assert used == {
        "--api-port",
        "--zenoh-port",
        "--discovery-port",
        "--namespace",
        "--force-master",
        "--no-worker",
        "--offline",
        "-v",
    }
    assert used <= known


@pytest.mark.upstream
@requires_upstream
def test_exo_v1_0_71_would_reject_it():
    # The check can fail: the v1.0.71 release still had libp2p and --libp2p-port.
    if not git("tag", "--list", "v1.0.71").strip():
        pytest.skip("the upstream git dir has no tag v1.0.71")
    parser = upstream_parser("v1.0.71")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), pytest.raises(SystemExit) as exited:
        parser.parse_args(supervisor_argv(CONFIGS["defaults"]))
    assert exited.value.code == 2
    assert "--zenoh-port" in stderr.getvalue()


def test_the_double_is_modelled_on_the_pinned_commit():
    # The EXO test double (and with it the supervisor's and health tests) follows one
    # upstream commit; flake.lock must pin the same one.
    text = (REPO / "docs/test-double.md").read_text()
    match = re.search(r"at commit\s+`([0-9a-f]{40})`", text)
    assert match, "docs/test-double.md names no upstream commit"
    assert match.group(1) == PINNED_REV
