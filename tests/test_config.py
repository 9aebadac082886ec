import json

import pytest

from exo_nixos.cli import main
from exo_nixos.config import MemoryLimit, default_config, parse_config
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
