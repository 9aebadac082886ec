"""The closing summary names each test layer that did not run (tests/conftest.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).with_name("conftest.py").read_text()
INI = """
[pytest]
addopts = -ra --strict-markers
markers =
    nix: n
    systemd: s
    netns: n
    upstream: u
"""


def _run(pytester: pytest.Pytester, body: str) -> str:
    pytester.makeconftest(CONFTEST)
    pytester.makeini(INI)
    pytester.makepyfile(body)
    return "\n".join(pytester.runpytest_subprocess().outlines)


def test_a_layer_whose_tests_all_skipped_is_named_loudly(pytester: pytest.Pytester):
    out = _run(
        pytester,
        """
import pytest

@pytest.mark.nix
@pytest.mark.skipif(True, reason="no nixpkgs lib here")
def test_eval(): pass

@pytest.mark.nix
@pytest.mark.skipif(True, reason="no nixpkgs lib here")
def test_eval_two(): pass

@pytest.mark.netns
def test_ran(): pass

def test_plain(): pass
""",
    )
    assert "Nix module evaluation: 0 ran, 2 skipped" in out
    assert "network namespaces: 1 ran, 0 skipped" in out
    assert "!!! LAYER NOT RUN: Nix module evaluation (no nixpkgs lib here)" in out
    assert "LAYER NOT RUN: network namespaces" not in out
    # the summary stands just above pytest's closing line
    assert out.rstrip().splitlines()[-1].startswith("=")
    assert out.index("LAYER NOT RUN") > out.index("short test summary info")


def test_a_layer_that_partly_ran_is_counted_not_flagged(pytester: pytest.Pytester):
    out = _run(
        pytester,
        """
import pytest

@pytest.mark.systemd
def test_boot(): pass

@pytest.mark.systemd
def test_skipped(): pytest.skip("needs root")
""",
    )
    assert "real systemd 257 in systemd-nspawn: 1 ran, 1 skipped" in out
    assert "LAYER NOT RUN" not in out
