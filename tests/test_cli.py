"""The CLI dispatcher: help, unknown commands, user errors as one line, --root checks."""

from __future__ import annotations

import subprocess
import sys

import pytest

from exo_nixos.cli import COMMANDS, main, one_line
from exo_nixos.errors import UserError


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", *args], capture_output=True, text=True, check=False
    )


def test_help_lists_every_command():
    result = run_cli("--help")
    assert result.returncode == 0
    for name in COMMANDS:
        assert name in result.stdout


def test_every_command_has_help():
    for name in COMMANDS:
        result = run_cli(name, "--help")
        assert result.returncode == 0, (name, result.stderr)


def test_unknown_command_is_a_usage_error():
    result = run_cli("frobnicate")
    assert result.returncode == 2
    assert "invalid choice" in result.stderr


def test_multi_line_user_errors_print_on_one_line(monkeypatch, capsys):
    import exo_nixos.commands.config as config_command

    def broken(_args):
        raise UserError("first line\n  quoted parser output\nlast line")

    monkeypatch.setattr(config_command, "main", broken)
    assert main(["config", "schema"]) == 2
    err = capsys.readouterr().err
    assert err == "exo-nixos: error: first line quoted parser output last line\n"
    assert one_line("a\n\tb  c") == "a b c"


@pytest.mark.parametrize("command", ["detect", "net", "doctor", "preflight"])
def test_missing_root_is_one_line(command, tmp_path):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1}')
    result = run_cli(command, "--root", str(tmp_path / "missing"), "--config", str(config))
    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        f"exo-nixos: error: --root {tmp_path / 'missing'}: not a directory; "
        "pass the root of a captured tree or /"
    ]
