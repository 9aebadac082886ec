"""Evaluate the NixOS modules with nixpkgs' lib and stub NixOS options; render units to text.

nixpkgs' lib is found through ``EXO_NIXOS_NIXPKGS_LIB`` (a checkout of nixpkgs or of
nix-community/nixpkgs.lib, the folder holding ``lib/``). Without it, or without
``nix-instantiate``, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parent.parent
EVAL_NIX = REPO / "nix" / "tests" / "eval.nix"
LIB_ENV = "EXO_NIXOS_NIXPKGS_LIB"
NIX_ENV = dict(os.environ, NIX_CONFIG="experimental-features = nix-command\nsubstituters =")


def nixpkgs_lib() -> Path | None:
    value = os.environ.get(LIB_ENV)
    if not value:
        return None
    path = Path(value).absolute()  # nix-instantiate runs in the repository root
    return path if (path / "lib" / "default.nix").is_file() else None


def skip_reason() -> str | None:
    if shutil.which("nix-instantiate") is None:
        return "nix-instantiate not installed (apt-get install nix-bin)"
    if nixpkgs_lib() is None:
        return f"{LIB_ENV} does not point at a nixpkgs(.lib) checkout holding lib/default.nix"
    return None


requires_nix = pytest.mark.skipif(skip_reason() is not None, reason=skip_reason() or "")


class NixEvalError(Exception):
    """nix-instantiate failed; the message is its stderr."""


def instantiate(expr: str) -> subprocess.CompletedProcess[str]:
    """``nix-instantiate --eval --strict --json`` of ``expr``; relative paths from the repo root."""
    return subprocess.run(
        ["nix-instantiate", "--eval", "--strict", "--json", "--expr", expr],
        capture_output=True,
        text=True,
        env=NIX_ENV,
        cwd=REPO,
        check=False,
    )


def _nix_expr(value: Any) -> str:
    """A Nix expression for a JSON-like Python value."""
    return f"(builtins.fromJSON {json.dumps(json.dumps(value))})"


def evaluate(module: str | dict[str, Any]) -> dict[str, Any]:
    """Evaluate the modules plus ``module`` (Nix text or plain data); return eval.nix's data."""
    lib = nixpkgs_lib()
    if lib is None:
        raise NixEvalError(skip_reason() or "nixpkgs lib missing")
    with tempfile.TemporaryDirectory() as tmp:
        source = module if isinstance(module, str) else _nix_expr(module)
        module_file = Path(tmp) / "module.nix"
        module_file.write_text(source)
        result = instantiate(
            f"import {EVAL_NIX} {{ lib = import {lib}/lib; modules = [ {module_file} ]; }}"
        )
    if result.returncode != 0:
        raise NixEvalError(result.stderr.strip())
    data: dict[str, Any] = json.loads(result.stdout)
    return data


def _unit_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _section(entries: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    for key, value in entries.items():
        values = value if isinstance(value, list) else [value]
        lines.extend(f"{key}={_unit_value(v)}" for v in values)
    return lines


def render_unit(unit: dict[str, Any], kind: str = "service") -> str:
    """Render an evaluated ``systemd.services.<name>`` (or target) as unit-file text.

    Follows nixpkgs' rendering: the [Unit] section is ``unitConfig``, which (as in NixOS'
    systemd-lib.nix) holds the dependency lists joined by spaces, Description= and
    StartLimit*=; list-valued settings become repeated keys, booleans true/false,
    ``environment`` Environment= lines. The [Install] section stands in for the .wants links
    NixOS creates.
    """
    if unit.get("script") or unit.get("preStart") or unit.get("postStart"):
        raise ValueError("units must not embed shell scripts (script/preStart/postStart)")
    unit_lines = _section(unit.get("unitConfig", {}))
    text = ["[Unit]", *unit_lines]
    if kind == "service":
        service_lines = [
            f'Environment="{name}={value}"'
            for name, value in sorted(unit.get("environment", {}).items())
            if value is not None
        ]
        service_lines += _section(unit.get("serviceConfig", {}))
        text += ["", "[Service]", *service_lines]
    install = [f"WantedBy={t}" for t in unit.get("wantedBy", [])]
    install += [f"RequiredBy={t}" for t in unit.get("requiredBy", [])]
    if install:
        text += ["", "[Install]", *install]
    return "\n".join(text) + "\n"


def exposure(unit: dict[str, Any], name: str, directory: Path) -> float:
    """The overall exposure `systemd-analyze security --offline=true` gives the rendered
    ``unit`` (written to ``directory/name``); skips the test where systemd-analyze is absent."""
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    import re

    path = directory / name
    path.write_text(render_unit(unit))
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=100", str(path)],
        capture_output=True,
        text=True,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    return float(match.group(1))
