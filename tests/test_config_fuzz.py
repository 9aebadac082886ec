"""Random documents fed to ``config validate``: a clean verdict every time, never a traceback."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_nixos.cli import main
from exo_nixos.config import default_config

KNOWN_KEYS = [
    *list(default_config().to_json()),
    "bondInterface",
    "preferredAccelerator",
    "memoryLimit",
    "apiPort",
    "from",
    "to",
]
scalars = (
    st.none() | st.booleans() | st.integers(-(2**40), 2**40) | st.floats() | st.text(max_size=12)
)
keys = st.sampled_from(KNOWN_KEYS) | st.text(max_size=10)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(keys, children, max_size=5),
    max_leaves=20,
)
documents = st.one_of(
    values,
    st.dictionaries(keys, values, max_size=8).map(lambda d: {"schemaVersion": 1, **d}),
    st.builds(
        lambda base, section, sub: {**base, section: sub},
        st.just(default_config().to_json()),
        st.sampled_from(["networking", "hardware", "k3s", "security", "gateway", "healthCheck"]),
        st.dictionaries(keys, values, max_size=6),
    ),
)


@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(document=documents)
def test_random_documents_get_a_clean_verdict(tmp_path_factory, document, capsys):
    path = Path(tmp_path_factory.mktemp("fuzz")) / "config.json"
    path.write_text(json.dumps(document, allow_nan=True))
    rc = main(["config", "validate", "--quiet", str(path)])
    captured = capsys.readouterr()
    assert rc in (0, 2)
    if rc == 0:
        assert captured.err == ""
    else:
        lines = captured.err.splitlines()
        assert lines
        assert all(line.startswith("exo-nixos: error: ") for line in lines)


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "exo_nixos", *args], capture_output=True, text=True, check=False
    )


def test_bad_inputs_exit_non_zero_with_one_line(tmp_path):
    cases = {
        "not json": "{schemaVersion: 1",
        "wrong type": '{"schemaVersion": 1, "apiPort": "fast"}',
        "accelerator": '{"schemaVersion": 1, "hardware": {"preferredAccelerator": "tpu"}}',
        "memory": '{"schemaVersion": 1, "hardware": {"memoryLimit": "eighty percent"}}',
        "port": '{"schemaVersion": 1, "apiPort": 70000}',
        "version": '{"schemaVersion": 7}',
        "array": "[1, 2]",
    }
    for name, text in cases.items():
        path = tmp_path / f"{name.replace(' ', '_')}.json"
        path.write_text(text)
        result = run_cli("config", "validate", str(path))
        assert result.returncode == 2, name
        assert "Traceback" not in result.stderr
        assert len(result.stderr.splitlines()) == 1, (name, result.stderr)
    unreadable = run_cli("config", "validate", str(tmp_path))
    assert unreadable.returncode == 2
    assert "cannot read the config file" in unreadable.stderr


def test_schema_command_matches_committed_schema():
    committed = Path(__file__).resolve().parent.parent / "docs" / "config.schema.json"
    result = run_cli("config", "schema")
    assert result.returncode == 0
    assert json.loads(result.stdout) == json.loads(committed.read_text()), (
        "docs/config.schema.json is stale: run `exo-nixos config schema > docs/config.schema.json`"
    )
