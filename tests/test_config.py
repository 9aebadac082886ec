import json

import pytest

from exo_nixos.cli import main
from exo_nixos.config import Config, MemoryLimit, default_config, load_config, parse_config
from exo_nixos.errors import ConfigError


def test_default_config_is_valid():
    cfg = default_config()
    assert cfg.api_port == 52415
    assert cfg.networking.discovery_port == 52413
    assert cfg.effective_models_dir == "/var/lib/exo/models"


@pytest.mark.parametrize(
    ("text", "total", "expected"),
    [
        ("80%", 1000, 800),
        ("48G", 0, 48 << 30),
        ("512MiB", 0, 512 << 20),
        ("1.5T", 0, int(1.5 * (1 << 40))),
    ],
)
def test_memory_limit(text, total, expected):
    assert MemoryLimit.parse(text).resolve(total) == expected


@pytest.mark.parametrize("text", ["eighty percent", "0%", "150%", "-3G", "12X", ""])
def test_memory_limit_rejects(text):
    with pytest.raises(ValueError):
        MemoryLimit.parse(text)


def test_unknown_key_suggests(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"schemaVersion": 1, "networking": {"bondInterfce": "bond0"}}))
    assert main(["config", "validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "networking.bondInterfce: unknown key; did you mean 'bondInterface'?" in err


def test_every_problem_reported():
    with pytest.raises(ConfigError) as info:
        parse_config({"schemaVersion": 1, "apiPort": 70000, "mode": "boss"})
    assert len(info.value.problems) == 2


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ('{"schemaVersion": 1, "apiPort": 1, "apiPort": 2}', "key 'apiPort' appears twice"),
        ('{"schemaVersion": 1, "gateway": {"port": 1, "port": 1}}', "key 'port' appears twice"),
        ('{"schemaVersion": "1"}', "schemaVersion: '1' must be an integer"),
        ('{"schemaVersion": true}', "must be an integer"),
        ('{"schemaVersion": 1, "apiPort": "52415"}', "apiPort: '52415': Input should be a valid"),
        ('{"schemaVersion": 1, "apiPort": true}', "apiPort: true: Input should be a valid integer"),
        ('{"schemaVersion": 1, "offline": 1.0}', "offline: 1.0: Input should be a valid boolean"),
        ('{"schemaVersion": 1, "offline": "yes"}', "Input should be a valid boolean"),
        ('{"schemaVersion": 1, "healthCheck": {"failures": 3.5}}', "valid integer"),
        ('{"schemaVersion": 1, "apiPort": 1' + "0" * 5000 + "}", "more digits than any value"),
        ('{"schemaVersion": 1, "x": ' + "[" * 100_000 + "]" * 100_000 + "}", "levels deep"),
        ('{"schemaVersion": 1, "x": ' + "[" * 100 + "]" * 100 + "}", "levels deep"),
        ("{" + '"a": {' * 70 + "}" * 70 + ', "schemaVersion": 1}', "levels deep"),
    ],
)
def test_lenient_or_hostile_documents_are_one_line_errors(tmp_path, text, words):
    path = tmp_path / "config.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert words in str(caught.value)
    assert "\n" not in str(caught.value)


def test_strict_values_still_accept_what_the_module_writes():
    config = parse_config(
        {"schemaVersion": 1, "apiPort": 52415, "offline": True, "healthCheck": {"intervalSec": 5}}
    )
    assert config.health_check.interval_sec == 5.0  # an integer is a fine float


def test_schema_says_schema_version_is_required():
    schema = Config.model_json_schema(by_alias=True)
    assert "schemaVersion" in schema["required"]
    assert "default" not in schema["properties"]["schemaVersion"]


@pytest.mark.parametrize(
    ("gateway", "words"),
    [
        ({"publicPaths": ["/v1/chat/completions"]}, "one of the gateway's own paths"),
        ({"publicPaths": ["/"]}, "one of the gateway's own paths"),
        ({"maxBodyBytes": 2 << 40}, "less than or equal to 1073741824"),
    ],
)
def test_gateway_settings_that_would_open_or_sink_it_are_refused(gateway, words):
    with pytest.raises(ConfigError, match=words):
        parse_config({"schemaVersion": 1, "gateway": gateway})


def test_field_and_cross_field_problems_come_in_one_pass():
    document = {
        "schemaVersion": 1,
        "apiPort": 70000,
        "noWorker": True,  # the document's own rule: needs mode master
        "gateway": {"port": "x", "listenAddress": "0.0.0.0"},  # the section's rule: needs keys
    }
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    problems = caught.value.problems
    assert any(p.startswith("apiPort: 70000") for p in problems)
    assert any(p.startswith("gateway.port: 'x'") for p in problems)
    assert any("without apiKeysFile would expose" in p for p in problems)
    assert any("noWorker is only meaningful" in p for p in problems)
    assert len(problems) == len(set(problems)) == 4
    assert document["gateway"] == {"port": "x", "listenAddress": "0.0.0.0"}  # not changed
