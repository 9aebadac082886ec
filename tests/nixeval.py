"""Evaluate the NixOS modules with nixpkgs' lib and stub NixOS options; render units to text.

nixpkgs' lib is found through ``EXO_NIXOS_NIXPKGS_LIB`` (a checkout of nixpkgs or of
nix-community/nixpkgs.lib, the folder holding ``lib/``). Without it, or without
``nix-instantiate``, the tests that need it are skipped with the reason.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
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


class NixBuildError(Exception):
    """A derivation's command failed, as ``nixos-rebuild build`` would; the message is its
    stderr."""


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
    data["etc"] = {
        target: build(content["__build"])
        if isinstance(content, dict) and "__build" in content
        else content
        for target, content in data.get("etc", {}).items()
    }
    return data


# The packages a stub build may run, as commands of this checkout (PYTHONPATH carries over).
TOOLS = {"exo-nixos": f'exec {shlex.quote(sys.executable)} -m exo_nixos "$@"'}


def build(recipe: dict[str, Any]) -> Any:
    """Build a stub ``runCommand`` derivation (nix/tests/eval.nix's recipe) as stdenv does:
    its environment exported (a derivation as its output path: a generated file written out,
    a tool of ``nativeBuildInputs`` on PATH), its command run by bash with errexit and
    ``$out`` to write. A failing command is a NixBuildError; the result is the output's
    content (decoded JSON for a ``.json``)."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        bin_dir = root / "bin"
        bin_dir.mkdir()
        env = {
            "PATH": f"{bin_dir}:{os.environ.get('PATH', '/usr/bin:/bin')}",
            "PYTHONPATH": os.environ.get("PYTHONPATH", ""),
            "HOME": "/homeless-shelter",
            "out": str(root / "out"),
        }
        for name, given in recipe["env"].items():
            value = given
            if name == "nativeBuildInputs":
                for package in value:
                    script = bin_dir / package["package"]
                    script.write_text(f"#!/bin/sh\n{TOOLS[package['package']]}\n")
                    script.chmod(0o755)
                continue
            if isinstance(value, dict) and "generated" in value:
                path = root / f"input-{name}"
                generated = value["generated"]
                text = generated if isinstance(generated, str) else json.dumps(generated, indent=2)
                path.write_text(text)
                value = str(path)
            if isinstance(value, (dict, list)):
                raise ValueError(f"{recipe['name']}: the stub build cannot provide {name}")
            # stdenv: true as "1", false and null as ""
            env[name] = "1" if value is True else "" if value in (False, None) else str(value)
        done = subprocess.run(
            ["bash", "-e", "-u", "-o", "pipefail", "-c", recipe["command"]],
            capture_output=True,
            text=True,
            env=env,
            cwd=root,
            check=False,
        )
        if done.returncode != 0:
            raise NixBuildError(f"builder for '{recipe['name']}' failed:\n{done.stderr.strip()}")
        output = (root / "out").read_text()
    return json.loads(output) if recipe["name"].endswith(".json") else output


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
