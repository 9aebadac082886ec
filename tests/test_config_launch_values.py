"""Config values that reach execve and sockets: env names, NUL bytes, URL ports."""

import pytest

from exo_nixos.config import parse_config
from exo_nixos.errors import ConfigError


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
