"""Put the evaluated module's units, the tool and the EXO test double into a guest tree.

The unit files are rendered from the evaluated NixOS module (``tests.nixeval``) and installed
verbatim: instead of rewriting their ``/nix/store`` paths, the guest gets files at exactly
those paths. The tool's store path holds a ``bin/exo-nixos`` that runs this checkout's
``exo_nixos`` with the guest's Python 3.13 (pydantic, aiohttp, prometheus-client and uvloop
from Debian); a coreutils path holds the ``bin/kill`` of the gateway's ExecReload; each EXO
package path holds a ``bin/exo`` running ``tests/systemd/fake_exo.py`` (sandbox self-check,
then the EXO test double); the config document's store path holds the evaluated JSON.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.nixeval import evaluate, render_unit

REPO = Path(__file__).resolve().parents[2]
STORE_PATH = re.compile(r"/nix/store/[a-z0-9]{32}-[^/\s\"']+")
GUEST_LIB = "/opt/exo-nixos"  # where this checkout's Python code goes inside the guest


def _store_paths(text: str) -> set[str]:
    return set(STORE_PATH.findall(text))


def _script(path: Path, body: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)


def install_code(root: Path) -> None:
    lib = root / GUEST_LIB.lstrip("/")
    if lib.exists():
        shutil.rmtree(lib)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(REPO / "src" / "exo_nixos", lib / "exo_nixos", ignore=ignore)
    (lib / "tests").mkdir(parents=True)
    (lib / "tests" / "__init__.py").write_text("")
    shutil.copytree(REPO / "tests" / "exo_double", lib / "tests" / "exo_double", ignore=ignore)
    (lib / "tests" / "systemd").mkdir()
    (lib / "tests" / "systemd" / "__init__.py").write_text("")
    shutil.copy2(REPO / "tests" / "systemd" / "fake_exo.py", lib / "tests" / "systemd")


def provision(root: Path, module: str) -> dict[str, Any]:
    """Evaluate ``module``, install its units and everything they reference into ``root``."""
    result = evaluate(module)
    if result["assertions"]:
        raise AssertionError(f"module assertions failed: {result['assertions']}")
    node = result["exo"]["nodeUnit"]
    units = {
        f"{node}.service": render_unit(result["services"][node]),
        "exo.target": render_unit(result["targets"]["exo"], "target"),
    }
    for extra in ("exo-api", "exo-netns", "exo-models", "exo-exporter"):
        if extra in result["services"]:
            units[f"{extra}.service"] = render_unit(result["services"][extra])
    # a node per GPU: the namespace template, the host's link, each instance's drop-in
    for name, service in result["services"].items():
        if name in ("exo-netns@", "exo-host-link"):
            units[f"{name}.service"] = render_unit(service)
        elif name.startswith(node) and name != node:
            units[f"{name}.service.d/overrides.conf"] = render_unit(service)
    document = result["etc"]["exo/config.json"]
    config_text = json.dumps(document, indent=2, sort_keys=True)
    install_code(root)
    packages = set(document.get("hardware", {}).get("packages", {}).values())
    for path in _store_paths("\n".join(units.values())) | packages:
        target = root / path.lstrip("/")
        if path.endswith("-exo-nixos"):
            _script(
                target / "bin" / "exo-nixos",
                f'PYTHONPATH={GUEST_LIB} exec /usr/bin/python3 -m exo_nixos "$@"\n',
            )
        elif path.endswith(".json"):
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(config_text)
        elif path.endswith("-iproute2"):
            _script(target / "bin" / "ip", 'exec /usr/bin/ip "$@"\n')
        elif path.endswith("-coreutils"):
            # ExecReload's `kill -HUP $MAINPID`: the shell's kill does the same
            _script(target / "bin" / "kill", 'kill "$@"\n')
        elif path in packages:
            _script(
                target / "bin" / "exo",
                f'PYTHONPATH={GUEST_LIB} exec /usr/bin/python3 -m tests.systemd.fake_exo "$@"\n',
            )
        else:
            raise AssertionError(f"unit references {path}, which the guest cannot provide")
    if result["tmpfiles"]:  # applied at boot by systemd-tmpfiles-setup, as on NixOS
        tmpfiles = root / "etc" / "tmpfiles.d" / "exo.conf"
        tmpfiles.parent.mkdir(parents=True, exist_ok=True)
        tmpfiles.write_text("\n".join(result["tmpfiles"]) + "\n")
    etc = root / "etc" / "exo"
    etc.mkdir(parents=True, exist_ok=True)
    (etc / "config.json").write_text(config_text)
    system = root / "etc" / "systemd" / "system"
    for name, text in units.items():
        (system / name).parent.mkdir(parents=True, exist_ok=True)
        (system / name).write_text(text)
    subprocess.run(
        [
            "chroot",
            str(root),
            "useradd",
            "--system",
            "--user-group",
            "--home-dir",
            document.get("security", {}).get("dataDir", "/var/lib/exo"),
            "--no-create-home",
            "--shell",
            "/usr/sbin/nologin",
            "exo",
        ],
        check=True,
        capture_output=True,
    )
    return {"node": node, "units": units, "config": document}
