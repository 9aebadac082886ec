import json
import os
import socket
import threading
from typing import Any

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


def test_validate_names_the_document_as_told(tmp_path, capsys):
    """The NixOS module's build check says services.exo, not the unchecked file's store path."""
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"schemaVersion": 1, "mode": "worker", "noWorker": True}))
    assert main(["config", "validate", "-q", "--name", "services.exo", str(path)]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("exo-nixos: error: services.exo: ") and str(path) not in line
    path.write_text(json.dumps({"schemaVersion": 1}))
    assert main(["config", "validate", "--name", "services.exo", str(path)]) == 0
    assert capsys.readouterr().out.startswith("services.exo: valid")


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


TOP_KEYS = (
    "apiPort, clusterNamespace, environmentVariables, exporter, extraArgs, extraModelDirs, "
    "gateway, hardware, healthCheck, k3s, logLevel, mode, modelReconciler, models, modelsDir, "
    "networking, noWorker, offline, readOnlyModelDirs, schemaVersion, security"
)
ABSOLUTE = (
    "must be an absolute path without whitespace, control characters or ':' (systemd and "
    "tmpfiles split their settings at whitespace; EXO's directory lists at ':')"
)


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([1], "config: the document must be a JSON object"),
        ({}, "schemaVersion: required but missing; this tool reads schemaVersion 1"),
        (
            {"schemaVersion": 2},
            "schemaVersion: 2 is not supported; this tool reads schemaVersion 1 "
            "(upgrade exo-nixos or the module so they match)",
        ),
        (
            {"schemaVersion": 1, "networking": {"zzz": 1}},
            "networking.zzz: unknown key (known keys: backupInterface, bondInterface, "
            "discoveryPort, downloadInterfaces, extraInterfaces, networkNamespace, "
            "rdmaEnabled, restrictInterfaces, ringPorts, zenohPort)",
        ),
        ({"schemaVersion": 1, "zzz.y": 1}, f'"zzz.y": unknown key (known keys: {TOP_KEYS})'),
        ({"schemaVersion": 1, " sp": 1}, f'" sp": unknown key (known keys: {TOP_KEYS})'),
        ({"schemaVersion": 1, "x\x01": 1}, f'"x\\u0001": unknown key (known keys: {TOP_KEYS})'),
        (
            {"schemaVersion": 1, "gateway": {"staticBackends": ["http://10.0.0.1:0"]}},
            "gateway.staticBackends.0: 'http://10.0.0.1:0': the port must be 1 to 65535",
        ),
        (
            {"schemaVersion": 1, "gateway": {"staticBackends": ["http://10.0.0.1:99999"]}},
            "gateway.staticBackends.0: 'http://10.0.0.1:99999': the port must be 1 to 65535",
        ),
        (
            {"schemaVersion": 1, "gateway": {"listenAddress": "fe80::1%eth0"}},
            "gateway.listenAddress: 'fe80::1%eth0': must be an IPv4 or IPv6 address such as "
            "0.0.0.0 or ::1",
        ),
        (
            {"schemaVersion": 1, "networking": {"extraInterfaces": ["ok", "bad name"]}},
            "networking.extraInterfaces.1: 'bad name': must be a Linux interface name: 1 to 15 "
            "printable ASCII characters, no whitespace, '/' or ':'",
        ),
        (
            {"schemaVersion": 1, "networking": {"zenohPortt": 1}},
            "networking.zenohPortt: unknown key; did you mean 'zenohPort'?",
        ),
        (
            {"schemaVersion": 1, "logLevel": "loud"},
            "logLevel: 'loud' is not allowed; input should be 'error', 'warning', 'info' or "
            "'debug'",
        ),
        (
            {"schemaVersion": 1, "gateway": {"tlsCertificateFile": "/a"}},
            "gateway: tlsCertificateFile and tlsKeyFile must be set together",
        ),
        (
            {"schemaVersion": 1, "networking": {"ringPorts": {"from": 9, "to": 2}}},
            "networking.ringPorts: 'from' (9) must not be above 'to' (2)",
        ),
        (
            {"schemaVersion": 1, "extraArgs": ["a\0b"]},
            "extraArgs.0: 'a\\x00b': must not contain a NUL byte (no program can receive one)",
        ),
        (
            {"schemaVersion": 1, "mode": "boss"},
            "mode: 'boss' is not allowed; input should be 'master', 'worker' or 'auto'",
        ),
        (
            {"schemaVersion": 1, "security": {"dataDir": "/a\0b"}},
            f"security.dataDir: '/a\\x00b': {ABSOLUTE}",
        ),
        (
            {"schemaVersion": 1, "hardware": {"packages": {"cpu": "relative"}}},
            f"hardware.packages.cpu: 'relative': {ABSOLUTE}",
        ),
    ],
)
def test_problems_are_worded_exactly(document, problem):
    with pytest.raises(ConfigError) as caught:
        parse_config(document)
    assert str(caught.value) == problem
    assert caught.value.problems in ([], [problem])


def test_nesting_limit_is_exact():
    from exo_nixos import jsonio

    def nested(levels: int) -> dict[str, Any]:
        document: dict[str, Any] = {"schemaVersion": 1}
        inner: dict[str, Any] = document
        for _ in range(levels - 1):
            inner["environmentVariables"] = {}
            inner = inner["environmentVariables"]
        return document

    at_limit = nested(jsonio.MAX_DEPTH)
    assert jsonio.depth(at_limit) == jsonio.MAX_DEPTH
    with pytest.raises(ConfigError) as caught:
        parse_config(at_limit)
    assert "levels deep" not in str(caught.value)  # a schema problem, not the depth limit
    with pytest.raises(ConfigError) as caught:
        parse_config(nested(jsonio.MAX_DEPTH + 1))
    assert str(caught.value) == f"config: nested more than {jsonio.MAX_DEPTH} levels deep"


def test_urls_lose_trailing_slashes_and_packages_give_executables():
    from exo_nixos.config import Accelerator

    config = parse_config(
        {
            "schemaVersion": 1,
            "gateway": {"staticBackends": ["http://10.0.0.1:5/", "http://10.0.0.2:6//"]},
            "hardware": {"packages": {"cpu": "/nix/store/x"}},
        }
    )
    assert config.gateway.static_backends == ["http://10.0.0.1:5", "http://10.0.0.2:6"]
    assert str(config.hardware.executable(Accelerator.CPU)) == "/nix/store/x/bin/exo"
    assert config.hardware.executable(Accelerator.CUDA) is None


def test_load_config_failures_are_one_line_each(tmp_path):
    with pytest.raises(ConfigError) as caught:
        load_config("/etc/a\0b")
    assert str(caught.value) == "--config '/etc/a\\x00b': a path cannot contain a NUL byte"
    missing = tmp_path / "absent.json"
    with pytest.raises(ConfigError) as caught:
        load_config(missing)
    assert str(caught.value) == (
        f"{missing}: no such config file; on NixOS set services.exo.enable, "
        "elsewhere pass --config FILE"
    )
    with pytest.raises(ConfigError) as caught:
        load_config(tmp_path)
    assert str(caught.value) == f"{tmp_path}: cannot read the config file: Is a directory"
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"schemaVersion": 1, "mode": "\xe9"}')
    with pytest.raises(ConfigError) as caught:
        load_config(latin1)
    assert str(caught.value).startswith(f"{latin1}: cannot read the config file: 'utf-8' codec")
    bad = tmp_path / "bad.json"
    bad.write_text('{"schemaVersion": 1, "mode": "boss"}')
    with pytest.raises(ConfigError) as caught:
        load_config(bad)
    problem = f"{bad}: mode: 'boss' is not allowed; input should be 'master', 'worker' or 'auto'"
    assert str(caught.value) == problem
    assert caught.value.problems == [problem]
    # an endless device or a file far larger than any config is refused at 8 MiB
    zero = tmp_path / "zero.json"
    zero.symlink_to("/dev/zero")
    with pytest.raises(ConfigError) as caught:
        load_config(zero)
    assert str(caught.value) == (
        f"{zero}: cannot read the config file: larger than {8 << 20} bytes"
    )
    huge = tmp_path / "huge.json"
    with huge.open("wb") as out:
        out.truncate((8 << 20) + 1)
    with pytest.raises(ConfigError) as caught:
        load_config(huge)
    assert str(caught.value).endswith(f"larger than {8 << 20} bytes")
    socket_path = tmp_path / "config.sock"
    with socket.socket(socket.AF_UNIX) as listener:
        listener.bind(str(socket_path))
        with pytest.raises(ConfigError) as caught:
            load_config(socket_path)
    assert str(caught.value).endswith(": cannot read the config file: No such device or address")


def test_a_config_from_a_pipe_is_read(tmp_path):
    """``--config <(...)`` (a FIFO) and ``--config /dev/stdin`` work like a file."""
    fifo = tmp_path / "config.fifo"
    os.mkfifo(fifo)
    writer = threading.Thread(
        target=lambda: fifo.write_text('{"schemaVersion": 1, "mode": "worker"}')
    )
    writer.start()
    try:
        assert load_config(fifo).mode == "worker"
    finally:
        writer.join(5)


def test_json_schema_is_the_one_in_docs():
    from pathlib import Path

    from exo_nixos.config import json_schema

    docs = Path(__file__).resolve().parents[1] / "docs" / "config.schema.json"
    assert json_schema() == json.loads(docs.read_text())


def test_addresses_and_the_json_form():
    config = parse_config(
        {"schemaVersion": 1, "gateway": {"listenAddress": "::1"}, "extraArgs": ["--x"]}
    )
    assert config.gateway.listen_address == "::1"
    document = config.to_json()
    assert document["gateway"]["listenAddress"] == "::1"
    assert document["extraArgs"] == ["--x"]
    assert parse_config(document) == config


# Each rule the NixOS module once asserted as well, now judged by the model alone (the module
# builds config.json through `config validate`): the model must refuse every such document.
MODULE_RULES: dict[str, tuple[dict[str, Any], str]] = {
    "noWorker without master": (
        {"mode": "worker", "noWorker": True},
        "noWorker is only meaningful with mode 'master': set mode to 'master'",
    ),
    "exposed gateway without keys": (
        {"gateway": {"listenAddress": "0.0.0.0"}},
        "set apiKeysFile or listen on 127.0.0.1",
    ),
    "TLS certificate without key": (
        {"gateway": {"tlsCertificateFile": "/run/secrets/cert.pem"}},
        "tlsCertificateFile and tlsKeyFile must be set together",
    ),
    "gateway on EXO's port": (
        {"gateway": {"port": 52415}},
        "gateway.port and apiPort are both TCP port 52415; give each its own port",
    ),
    "zenoh on EXO's port": (
        {"networking": {"zenohPort": 52415}},
        "networking.zenohPort and apiPort are both TCP port 52415",
    ),
    "no backend": (
        {"gateway": {"localBackend": False}},
        "set localBackend to true or list staticBackends",
    ),
    "ring ports reversed": (
        {"networking": {"ringPorts": {"from": 60000, "to": 50000}}},
        "'from' (60000) must not be above 'to' (50000)",
    ),
    "token without API server": (
        {"k3s": {"integration": True, "tokenFile": "/run/secrets/t"}},
        "k3s.tokenFile needs k3s.apiServer",
    ),
    "both K3s credentials": (
        {"k3s": {"kubeconfigFile": "/etc/k.yaml", "tokenFile": "/run/secrets/t"}},
        "set k3s.kubeconfigFile or k3s.tokenFile, not both",
    ),
    "memory limit of zero": ({"hardware": {"memoryLimit": "0M"}}, "a size must be above zero"),
    "memory limit over 100%": (
        {"hardware": {"memoryLimit": "150%"}},
        "a percentage must be above 0% and at most 100%",
    ),
    "unknown accelerator package": (
        {"hardware": {"packages": {"tpu": "/nix/store/x-exo"}}},
        "hardware.packages.tpu.[key]: 'tpu' is not allowed",
    ),
    "environment name execve refuses": (
        {"environmentVariables": {"A=B": "1"}},
        "environmentVariables.A=B.[key]: 'A=B': must be an environment variable name",
    ),
    "listen address out of range": (
        {"gateway": {"listenAddress": "999.1.1.1"}},
        "gateway.listenAddress: '999.1.1.1': must be an IPv4 or IPv6 address",
    ),
}


@pytest.mark.parametrize("case", sorted(MODULE_RULES))
def test_rules_the_module_no_longer_asserts_are_the_models(case):
    document, message = MODULE_RULES[case]
    with pytest.raises(ConfigError) as refused:
        parse_config({"schemaVersion": 1, **document})
    assert any(message in p for p in refused.value.problems or [str(refused.value)]), (
        refused.value.problems
    )
