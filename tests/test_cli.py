"""The CLI dispatcher: help, unknown commands, user errors as one line, --root checks."""

from __future__ import annotations

import json
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


UNUSABLE_BY_EXECVE = {
    "variable name with '='": ({"environmentVariables": {"A=B": "x"}}, "environmentVariables"),
    "variable name with NUL": ({"environmentVariables": {"A\0B": "x"}}, "environmentVariables"),
    "empty variable name": ({"environmentVariables": {"": "x"}}, "environmentVariables"),
    "variable name starting with a digit": (
        {"environmentVariables": {"1A": "x"}},
        "environmentVariables",
    ),
    "variable value with NUL": (
        {"environmentVariables": {"HF_HOME": "/a\0b"}},
        "environmentVariables.HF_HOME",
    ),
    "extra argument with NUL": ({"extraArgs": ["--ok", "--no\0batch"]}, "extraArgs.1"),
}


@pytest.mark.parametrize("command", ["preflight", "run", "detect"])
@pytest.mark.parametrize(
    ("fields", "where"), UNUSABLE_BY_EXECVE.values(), ids=UNUSABLE_BY_EXECVE.keys()
)
def test_names_and_values_execve_refuses_are_config_errors(command, fields, where, tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"schemaVersion": 1, "gateway": {"enable": False}, **fields}))
    args = [command, "--config", str(config)]
    if command == "run":
        args.append("--dry-run")  # a config error stops it before anything starts
    result = run_cli(*args)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"exo-nixos: error: {config}: {where}")
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args",
    [
        ["preflight", "--config", "/etc/exo\0/config.json"],
        ["run", "--config", "/etc/exo\0/config.json"],
        ["detect", "--config", "/etc/exo\0/config.json"],
        ["detect", "--models-dir", "/var/lib/exo\0/models"],
        ["run", "--config", "{config}", "--host-root", "/ho\0st", "--dry-run"],
    ],
)
def test_a_nul_in_a_path_argument_is_one_line(args, tmp_path, capsys):
    """Not from a shell (execve refuses such an argv), but from any caller of ``main``."""
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "gateway": {"enable": false}}')
    assert main([a.replace("{config}", str(config)) for a in args]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("exo-nixos: error: ")
    assert "NUL" in err
