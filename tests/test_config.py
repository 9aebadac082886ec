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


def test_environment_variable_names_as_systemd_and_execve_take_them():
    doc = {"schemaVersion": 1, "environmentVariables": {"EXO_X": "1", "_y2": "a=b c", "HF": ""}}
    assert parse_config(doc).environment_variables == {"EXO_X": "1", "_y2": "a=b c", "HF": ""}
    for name in ("A=B", "A\0B", "", "2X", "A-B", "A B"):
        with pytest.raises(ConfigError, match="environment variable name"):
            parse_config({"schemaVersion": 1, "environmentVariables": {name: "x"}})


@pytest.mark.parametrize("port", ["0", "65536", "99999", "x"])
def test_a_url_whose_port_cannot_be_connected_to_is_refused(port):
    with pytest.raises(ConfigError, match="the port must be 1 to 65535"):
        parse_config({"schemaVersion": 1, "k3s": {"apiServer": f"https://10.0.0.1:{port}"}})


def test_urls_with_and_without_a_port_are_taken():
    for url in ("https://10.0.0.1:6443", "https://[::1]:65535", "https://k3s.lan"):
        assert parse_config({"schemaVersion": 1, "k3s": {"apiServer": url}}).k3s.api_server == url
