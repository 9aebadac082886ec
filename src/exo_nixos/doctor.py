"""``exo-nixos doctor``: what this host would run, and what stands in the way.

Works on any Linux host, NixOS or not, with or without a config file: without one it shows what
``services.exo.enable = true`` would do here. It brings together the pieces every other command
uses (hardware decision, cluster interface choice, pre-flight checks, the node's health) and
reports them; it decides nothing of its own.
"""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from exo_nixos import __version__
from exo_nixos.addresses import local_api_url
from exo_nixos.config import Config, default_config, load_config
from exo_nixos.findings import Finding, Severity, of
from exo_nixos.hosttree import Tree
from exo_nixos.preflight import CheckResult, Status, run_checks

if TYPE_CHECKING:
    from exo_nixos.hardware import Decision, Inventory

NODE_PROBE_TIMEOUT_S = 1.5


@dataclass
class Section:
    title: str
    summary: str
    lines: list[str] = field(default_factory=list)
    findings: list[Finding] = field(default_factory=list)  # its problems and warnings

    def add(self, severity: Severity, lines: list[str]) -> None:
        self.findings += [Finding(severity, line) for line in lines]

    @property
    def problems(self) -> list[str]:
        return [f.line() for f in of(self.findings, Severity.PROBLEM)]

    @property
    def warnings(self) -> list[str]:
        return [f.line() for f in of(self.findings, Severity.WARNING)]

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "summary": self.summary,
            "details": self.lines,
            "problems": self.problems,
            "warnings": self.warnings,
        }


@dataclass
class Report:
    host: str
    config_source: str
    installed: bool
    sections: list[Section]

    @property
    def problems(self) -> list[str]:
        return [p for s in self.sections for p in s.problems]

    @property
    def warnings(self) -> list[str]:
        return [w for s in self.sections for w in s.warnings]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "version": __version__,
            "config": self.config_source,
            "installed": self.installed,
            "sections": [s.to_json() for s in self.sections],
            "problems": self.problems,
            "warnings": self.warnings,
        }

    def text(self) -> str:
        out = [f"exo-nixos {__version__} doctor on {self.host}", f"Config: {self.config_source}"]
        for section in self.sections:
            out.append("")
            out.append(f"{section.title}: {section.summary}")
            out.extend(f"  {line}" for line in section.lines)
            out.extend(f"  PROBLEM: {p}" for p in section.problems)
            out.extend(f"  warning: {w}" for w in section.warnings)
        out.append("")
        if self.problems:
            out.append(f"{len(self.problems)} problem(s), {len(self.warnings)} warning(s).")
        else:
            out.append(f"No problems found ({len(self.warnings)} warning(s)).")
        return "\n".join(out)


def _load(config_path: Path, *, required: bool) -> tuple[Config, str, bool]:
    if required or config_path.exists():
        config = load_config(config_path)
        return config, f"{config_path} (valid, mode {config.mode})", True
    return (
        default_config(),
        f"none at {config_path}: exo-nixos is not installed as a service here; showing what "
        "`services.exo.enable = true` would do on this host",
        False,
    )


def _accelerator_section(
    config: Config, installed: bool, inventory: Inventory
) -> tuple[Section, Decision]:
    from exo_nixos.hardware import HardwareSettings, decide
    from exo_nixos.hardware.instances import instances, plan
    from exo_nixos.hardware.report import node_lines, text_lines

    settings = HardwareSettings.from_config(config.hardware)
    if not installed:
        # no config: judge as if every EXO variant were installed, as `detect` does
        settings = HardwareSettings(packages=None)
    decision = decide(settings, inventory)
    section = Section("Accelerator", str(decision.accelerator))
    # detection warnings (garbled files, NVML) count as warnings, and are not listed twice
    section.lines += [line for line in text_lines(inventory, decision) if "warning: " not in line]
    section.add(Severity.WARNING, inventory.warnings)
    # how many nodes this host runs (hardware.nodePerGpu), and what stands in their way
    nodes = plan(instances(config.hardware.node_per_gpu), inventory)
    section.lines += node_lines(nodes)
    section.findings += of(nodes.findings, Severity.WARNING)
    return section, decision


def _network_section(config: Config, root: Path) -> Section:
    from exo_nixos.network import choose_cluster_interface, inspect

    choice = choose_cluster_interface(config, inspect(root))
    section = Section("Cluster interface", choice.name or "none")
    section.lines += [f"- {reason}" for reason in choice.reasons]
    section.lines += [f"note: {note}" for note in choice.notes]
    section.add(Severity.PROBLEM, choice.problems)
    section.add(Severity.WARNING, choice.warnings)
    return section


def _checks_section(results: list[CheckResult], installed: bool) -> Section:
    failed = [r for r in results if r.status is Status.FAIL]
    section = Section(
        "Pre-flight",
        f"{len(results) - len(failed)} of {len(results)} checks pass"
        + ("" if installed else " (directories: not installed here, not counted)"),
    )
    for result in results:
        line = f"{result.status.upper():<4} {result.check}: {result.reason}"
        section.lines.append(line + (f" (fix: {result.fix})" if result.fix else ""))
    section.add(Severity.PROBLEM, [f"{r.check}: {r.reason}" for r in failed])
    section.add(
        Severity.WARNING, [f"{r.check}: {r.reason}" for r in results if r.status is Status.WARN]
    )
    return section


def _node_section(config: Config) -> tuple[Section, bool]:
    """The local node's section, and whether this node's EXO answers (holds its ports)."""
    from exo_nixos.nodehealth import Target, Verdict, assess

    url = local_api_url(config.api_port)
    report = assess(Target(url, NODE_PROBE_TIMEOUT_S))
    section = Section("EXO node", f"{report.verdict.value} at {url}")
    if report.view is not None:
        view = report.view
        section.lines.append(
            f"- node {view.node_id}: {len(view.peers)} peer(s), {len(view.instances)} instance(s)"
        )
    section.lines += [f"- {problem}" for problem in report.problems]
    if report.verdict is Verdict.DOWN:
        section.lines.append("- (expected when EXO is not running on this host)")
    return section, report.view is not None


def diagnose(
    config_path: Path, root: Path = Path("/"), use_nvml: bool = True, *, required: bool = False
) -> Report:
    """``required``: the config was named explicitly, so a missing file is an error."""
    config, source, installed = _load(config_path, required=required)
    host = Tree(root)
    from exo_nixos.hardware import detect

    inventory = detect(root, use_nvml=use_nvml, models_dir=config.effective_models_dir)
    accelerator, decision = _accelerator_section(config, installed, inventory)
    network = _network_section(config, root)
    if host.is_live:
        node, exo_running = _node_section(config)
    else:
        node = Section("EXO node", f"not probed: {root} is a captured tree, not this host")
        exo_running = False
    # the network section already judges the cluster interface
    results = run_checks(
        config, host, inventory, decision.accelerator, interface=False, exo_running=exo_running
    )
    if not installed:
        results = [r for r in results if not r.check.startswith("directory ")]
    sections = [accelerator, network, _checks_section(results, installed), node]
    return Report(socket.gethostname(), source, installed, sections)
