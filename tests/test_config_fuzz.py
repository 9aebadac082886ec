"""Random documents fed to ``config validate``: a clean verdict every time, never a traceback."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from exo_nixos.cli import main
from exo_nixos.config import Config, MemoryLimit, default_config, parse_config
from exo_nixos.errors import ConfigError
from exo_nixos.k3s.render import render_yaml
from exo_nixos.preflight import directory_specs
from exo_nixos.supervisor.environment import build_launch, role_for

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


# Documents drawn from the committed JSON Schema (patterns, ranges, enums): most are valid, so
# this reaches what random documents rarely do, whatever uses an accepted config.
# EXO_NIXOS_FUZZ_EXAMPLES raises the count (docs/config.md gives a 10,000-document run).
FUZZ_EXAMPLES = int(os.environ.get("EXO_NIXOS_FUZZ_EXAMPLES", "150"))


SCHEMA = Config.model_json_schema(by_alias=True)


def from_schema(node: dict[str, Any], defs: dict[str, Any] | None = None) -> st.SearchStrategy[Any]:
    """Values of the JSON Schema ``node`` (the subset pydantic writes for this model), with
    now and then a key left out or a value off its bounds, so both verdicts are drawn."""
    defs = SCHEMA.get("$defs", {}) if defs is None else defs
    if "$ref" in node:
        return st.deferred(lambda: from_schema(defs[node["$ref"].rsplit("/", 1)[1]], defs))
    if "anyOf" in node:
        return st.one_of([from_schema(n, defs) for n in node["anyOf"]])
    if "enum" in node:
        return st.sampled_from(node["enum"])
    if "const" in node:
        return st.just(node["const"])
    kind = node.get("type")
    if kind == "object":
        props = node.get("properties", {})
        required = set(node.get("required", []))
        return st.fixed_dictionaries(
            {k: from_schema(v, defs) for k, v in props.items() if k in required},
            optional={k: from_schema(v, defs) for k, v in props.items() if k not in required},
        )
    if kind == "array":
        return st.lists(from_schema(node.get("items", {}), defs), max_size=3)
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low = node.get("minimum", node.get("exclusiveMinimum", -(2**31)))
        high = node.get("maximum", node.get("exclusiveMaximum", 2**31))
        return st.integers(low - 1, high + 1)
    if kind == "number":
        low = node.get("minimum", node.get("exclusiveMinimum", -1e6))
        high = node.get("maximum", node.get("exclusiveMaximum", 1e6))
        return st.floats(low - 1, high + 1, allow_nan=False)
    if kind == "string":
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True) | st.text(max_size=8)
        return st.text(max_size=12)
    return st.none()


@settings(
    max_examples=FUZZ_EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
@given(document=from_schema(SCHEMA))
def test_schema_documents_are_judged_and_accepted_ones_work_downstream(document):
    try:
        config = parse_config(document)
    except ConfigError as exc:
        assert all("\n" not in p for p in exc.problems or [str(exc)])
        return
    assert parse_config(config.to_json()) == config  # what the module writes reads back
    with tempfile.TemporaryDirectory() as tree:
        launch = build_launch(config, role_for(config), root=Path(tree))
    assert launch.argv and all("\0" not in a for a in launch.argv)
    assert all("\0" not in v and "=" not in k for k, v in launch.env.items())
    assert render_yaml(config)
    assert directory_specs(config)
    if config.hardware.memory_limit is not None:
        assert MemoryLimit.parse(config.hardware.memory_limit).resolve(64 << 30) > 0


FUZZ_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "fuzz-config"


def test_fuzz_script_refuses_a_count_that_is_not_a_positive_integer_in_one_line():
    for argv, env_count in (
        ([], "many"),
        ([], "1e3"),
        (["abc"], None),
        (["0"], None),
        (["-5"], None),
        (["12x"], None),
    ):
        env = {k: v for k, v in os.environ.items() if k != "EXO_NIXOS_FUZZ_EXAMPLES"}
        if env_count is not None:
            env["EXO_NIXOS_FUZZ_EXAMPLES"] = env_count
        result = subprocess.run(
            [str(FUZZ_SCRIPT), *argv],
            check=False,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        shown = argv[0] if argv else env_count
        assert result.returncode == 2, (argv, env_count, result)
        assert result.stdout == ""
        lines = result.stderr.splitlines()
        assert len(lines) == 1, result.stderr
        assert "positive integer" in lines[0] and f"'{shown}'" in lines[0]
        assert "Traceback" not in result.stderr
