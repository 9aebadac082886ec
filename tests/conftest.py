"""The test suite's closing summary: which layers ran, and loudly, which did not.

A layer is a marker in pyproject.toml (Nix evaluation, the real systemd tier, network
namespaces, upstream EXO's source). A skipped test already prints its own reason; this
summary says per layer how many of its tests ran, so a run where a whole layer was skipped
(no nixpkgs lib, no nspawn) cannot pass for a full one.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from collections.abc import Generator

import pytest

# marker -> (the layer's name, what makes it run)
LAYERS = {
    "nix": (
        "Nix module evaluation",
        "apt-get install nix-bin; scripts/fetch-nixpkgs-lib or EXO_NIXOS_NIXPKGS_LIB",
    ),
    "systemd": (
        "real systemd 257 in systemd-nspawn",
        "run as root with systemd-container and debootstrap installed",
    ),
    "netns": ("network namespaces", "run as root with iproute2"),
    "upstream": (
        "upstream EXO source at the pinned commit",
        "EXO_NIXOS_UPSTREAM_GIT=<a git dir of github.com/exo-explore/exo>",
    ),
}


def _layer(report: pytest.TestReport) -> str | None:
    return next((marker for marker in LAYERS if marker in report.keywords), None)


@pytest.hookimpl(wrapper=True, tryfirst=True)  # outermost: after the skip list, above the total
def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> Generator[None]:
    yield
    _layers(terminalreporter)


def _layers(terminalreporter: pytest.TerminalReporter) -> None:
    ran: Counter[str] = Counter()
    skipped: dict[str, Counter[str]] = defaultdict(Counter)
    for outcome in ("passed", "failed", "error", "skipped", "xfailed", "xpassed"):
        for report in terminalreporter.stats.get(outcome, []):
            if not isinstance(report, pytest.TestReport):
                continue
            layer = _layer(report)
            if layer is None or (report.when != "call" and outcome != "skipped"):
                continue
            if outcome == "skipped":
                reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else ""
                skipped[layer][reason.removeprefix("Skipped: ")] += 1
            else:
                ran[layer] += 1
    if not ran and not skipped:
        return
    write = terminalreporter.write_line
    terminalreporter.section("test layers")
    missing = []
    for marker, (name, _fix) in LAYERS.items():
        done, left = ran[marker], sum(skipped[marker].values())
        if done == 0 and left == 0:
            continue
        write(f"{name}: {done} ran, {left} skipped")
        if left and not done:
            missing.append(marker)
    for marker in missing:
        name, fix = LAYERS[marker]
        reason, _ = skipped[marker].most_common(1)[0]
        write(f"!!! LAYER NOT RUN: {name} ({reason}); to run it: {fix}", red=True, bold=True)
