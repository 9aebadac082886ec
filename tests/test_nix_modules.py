"""The NixOS modules, evaluated with nixpkgs' lib: options, units, users, the config contract."""

from __future__ import annotations

import json

import pytest

from exo_nixos.config import Mode, parse_config
from tests.nixeval import (
    NixBuildError,
    NixEvalError,
    _nix_expr,
    evaluate,
    render_unit,
    requires_nix,
)

pytestmark = [pytest.mark.nix, requires_nix]

USER_SCHEMA_EXAMPLE = """
{
  services.exo = {
    enable = true;
    mode = "auto";
    networking = {
      bondInterface = "bond0";
      rdmaEnabled = true;
      discoveryPort = 52413;
    };
    apiPort = 52415;
    hardware = {
      autoDetect = true;
      preferredAccelerator = null;
      memoryLimit = "80%";
    };
    k3s = {
      integration = true;
      namespace = "exo-system";
      serviceAccount = "exo";
      kubeconfigFile = "/etc/rancher/k3s/k3s.yaml";
    };
    security = {
      user = "exo";
      group = "exo";
      dataDir = "/var/lib/exo";
      configDir = "/etc/exo";
    };
  };
}
"""


def test_disabled_module_adds_nothing():
    result = evaluate("{ }")
    assert result["services"] == {}
    assert result["targets"] == {}
    assert "exo/config.json" not in result["etc"]


def test_user_schema_example_evaluates_and_contract_holds():
    result = evaluate(USER_SCHEMA_EXAMPLE)
    assert result["assertions"] == []
    config = parse_config(result["etc"]["exo/config.json"])
    assert config.mode is Mode.AUTO
    assert config.networking.bond_interface == "bond0"
    assert config.hardware.memory_limit == "80%"
    assert config.k3s.integration is True


@pytest.mark.parametrize(
    ("mode", "unit", "role"),
    [
        ("master", "exo-master", "master"),
        ("worker", "exo-worker", "worker"),
        ("auto", "exo-worker", "worker"),
    ],
)
def test_mode_selects_node_unit(mode, unit, role):
    result = evaluate({"services": {"exo": {"enable": True, "mode": mode}}})
    assert result["exo"]["nodeUnit"] == unit
    service = result["services"][unit]
    assert f"--role {role}" in service["serviceConfig"]["ExecStart"]
    assert "exo.target" in service["partOf"]
    assert f"{unit}.service" in result["targets"]["exo"]["wants"]
    other = "exo-worker" if unit == "exo-master" else "exo-master"
    assert other not in result["services"]


def test_system_user_and_group_created():
    result = evaluate({"services": {"exo": {"enable": True}}})
    assert result["users"]["users"]["exo"]["isSystemUser"] is True
    assert result["users"]["groups"]["exo"] is not None


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        (
            {"mode": "worker", "noWorker": True},
            "noWorker is only meaningful with mode 'master': set mode to 'master'",
        ),
        (
            {"networking": {"zenohPort": 52415}},
            "networking.zenohPort and apiPort are both TCP port 52415",
        ),
        (
            {"networking": {"ringPorts": {"from": 60000, "to": 50000}}},
            "networking.ringPorts: 'from' (60000) must not be above 'to' (50000)",
        ),
        (
            "{ pkgs, ... }: { services.exo.hardware.packages.tpu = pkgs.exo-cuda; }",
            "hardware.packages.tpu.[key]: 'tpu' is not allowed",
        ),
    ],
)
def test_contract_rules_fail_the_config_check_with_the_fix(settings, fragment):
    """Rules of the config contract are the model's, judged when config.json is built."""
    module = settings if isinstance(settings, str) else {"services": {"exo": settings}}
    source = module if isinstance(module, str) else _nix_expr(module)
    with pytest.raises(NixBuildError) as refused:
        evaluate(f"{{ imports = [ ({source}) ]; services.exo.enable = true; }}")
    assert "exo-nixos: error: services.exo: " in str(refused.value)
    assert fragment in str(refused.value)


def test_config_check_runs_the_build_platforms_tool_on_the_document():
    probe = (
        "{ config, ... }: { services.exo.enable = true;"
        ' environment.etc."probe".text = builtins.toJSON {'
        " inherit (config.services.exo.configFile) env command; }; }"
    )
    recipe = json.loads(evaluate(probe)["etc"]["probe"])
    (tool,) = recipe["env"]["nativeBuildInputs"]
    assert tool.startswith("/nix/store/") and tool.endswith("-exo-nixos")
    assert recipe["env"]["preferLocalBuild"] is True
    assert "exo-nixos config validate --quiet --name services.exo" in recipe["command"]


def test_type_errors_are_reported():
    with pytest.raises(NixEvalError, match="apiPort"):
        evaluate({"services": {"exo": {"enable": True, "apiPort": 70000}}})
    with pytest.raises(NixEvalError, match="preferredAccelerator"):
        evaluate(
            {"services": {"exo": {"enable": True, "hardware": {"preferredAccelerator": "tpu"}}}}
        )


def test_rendered_unit_text():
    result = evaluate({"services": {"exo": {"enable": True, "mode": "master"}}})
    text = render_unit(result["services"]["exo-master"])
    assert text.startswith("[Unit]\n")
    assert "PartOf=exo.target" in text
    assert "Type=notify" in text
    assert "[Install]\nWantedBy=exo.target" in text


def test_config_dir_decides_where_config_json_goes():
    result = evaluate(
        {"services": {"exo": {"enable": True, "security": {"configDir": "/etc/ai/exo"}}}}
    )
    assert "ai/exo/config.json" in result["etc"]
    assert "exo/config.json" not in result["etc"]
    result = evaluate(
        {"services": {"exo": {"enable": True, "security": {"configDir": "/srv/exo"}}}}
    )
    assert any("must lie below /etc" in m for m in result["assertions"])


@pytest.mark.parametrize("limit", ["0M", "0%", "150%", "0.0G"])
def test_memory_limit_out_of_range_is_refused(limit):
    with pytest.raises(NixBuildError, match=f"hardware.memoryLimit: '{limit}': a "):
        evaluate({"services": {"exo": {"enable": True, "hardware": {"memoryLimit": limit}}}})


@pytest.mark.parametrize("limit", ["80%", "80 %", "48G", "48gib", "48 G", "1.5T", "512MiB"])
def test_memory_limit_syntax_agrees_with_the_config_model(limit):
    result = evaluate({"services": {"exo": {"enable": True, "hardware": {"memoryLimit": limit}}}})
    assert result["assertions"] == []
    assert parse_config(result["etc"]["exo/config.json"]).hardware.memory_limit == limit


@pytest.mark.parametrize(
    ("options", "name"),
    [
        ({"hardware": {"memoryLimit": "80"}}, "memoryLimit"),  # 80 bytes: an OOM restart loop
        ({"modelsDir": "/srv/my models"}, "modelsDir"),  # split in two by ReadWritePaths=
        ({"readOnlyModelDirs": ["/nfs/models\n"]}, "readOnlyModelDirs"),
        ({"security": {"dataDir": "/var/lib/exo\t2"}}, "dataDir"),
    ],
)
def test_values_the_config_model_refuses_fail_evaluation(options, name):
    with pytest.raises(NixEvalError, match=name):
        evaluate({"services": {"exo": {"enable": True, **options}}})


@pytest.mark.parametrize("address", ["localhost", "999.1.1.1", "fe80::1%eth0"])
def test_addresses_are_judged_by_the_config_check(address):
    """Python's ipaddress is the one judge of addresses (the option type is a string)."""
    for options in ({"gateway": {"listenAddress": address}}, {"k3s": {"nodeAddress": address}}):
        with pytest.raises(NixBuildError, match="must be an IPv4 or IPv6 address"):
            evaluate({"services": {"exo": {"enable": True, **options}}})


def test_registrar_in_host_namespace_is_warned_about():
    result = evaluate(
        {
            "services": {
                "exo": {
                    "enable": True,
                    "networking": {"networkNamespace": "exo"},
                    "k3s": {"integration": True, "kubeconfigFile": "/etc/rancher/k3s/k3s.yaml"},
                }
            }
        }
    )
    assert any("network namespace exo" in w for w in result["warnings"])


@pytest.mark.parametrize(
    ("options", "option"),
    [
        ({"modelsDir": "/home/alice/models"}, "modelsDir"),
        ({"extraModelDirs": ["/home/alice/more"]}, "extraModelDirs"),
        ({"readOnlyModelDirs": ["/home/alice"]}, "readOnlyModelDirs"),
        ({"modelsDir": "/root/models"}, "modelsDir"),
    ],
)
def test_model_dir_in_a_closed_home_fails_evaluation_with_the_fix(options, option):
    result = evaluate(
        {
            "services": {"exo": {"enable": True, **options}},
            "users": {"users": {"alice": {"isNormalUser": True, "home": "/home/alice"}}},
        }
    )
    (message,) = [m for m in result["assertions"] if "cannot enter" in m]
    assert message.startswith(f"services.exo.{option}: ")
    assert "(mode 700)" in message
    assert '"/srv/models"' in message and 'options = [ "bind" ]' in message


def test_model_dir_in_a_searchable_home_is_fine():
    result = evaluate(
        {
            "services": {"exo": {"enable": True, "modelsDir": "/home/alice/models"}},
            "users": {
                "users": {"alice": {"isNormalUser": True, "home": "/home/alice", "homeMode": "711"}}
            },
        }
    )
    assert result["assertions"] == [] and result["warnings"] == []


def test_model_dir_in_an_undeclared_home_warns():
    result = evaluate({"services": {"exo": {"enable": True, "modelsDir": "/home/bob/models"}}})
    assert result["assertions"] == []
    (warning,) = result["warnings"]
    assert "does not declare" in warning and "/home/bob/models" in warning


NIXOS_CACHE = "https://cache.nixos.org/"
NIXOS_KEY = "cache.nixos.org-1:6NCHdD59X431o0gWypbMrAURkbJ16ZPMQFGspcDShjY="


def test_binary_caches_are_off_by_default():
    settings = evaluate({"services": {"exo": {"enable": True}}})["nixSettings"]
    assert settings == {"substituters": [NIXOS_CACHE], "trusted-public-keys": [NIXOS_KEY]}


def test_binary_caches_join_nixos_own_cache_in_nix_conf():
    settings = evaluate({"services": {"exo": {"enable": True, "binaryCaches": {"enable": True}}}})[
        "nixSettings"
    ]
    assert settings["substituters"] == [
        "https://exo.cachix.org",
        "https://cache.nixos-cuda.org",
        NIXOS_CACHE,  # still there, and still last
    ]
    assert NIXOS_KEY in settings["trusted-public-keys"]
    assert any(k.startswith("exo.cachix.org-1:") for k in settings["trusted-public-keys"])


def test_environment_variable_names_execve_refuses_fail_the_config_check():
    with pytest.raises(NixBuildError) as refused:
        evaluate(
            {"services": {"exo": {"enable": True, "environmentVariables": {"A=B": "1", "OK": "2"}}}}
        )
    assert "environmentVariables.A=B.[key]: 'A=B': must be an environment variable name" in str(
        refused.value
    )
    assert "'OK'" not in str(refused.value)


def test_the_modules_defaults_are_the_models():
    """Every value the module writes by default is the model's own default (the module's
    option defaults are the one place the two could disagree), so a host with only
    `services.exo.enable` runs as a hand-written `{"schemaVersion": 1}` would."""
    from exo_nixos.config import default_config

    written = parse_config(
        evaluate({"services": {"exo": {"enable": True}}})["etc"]["exo/config.json"]
    )
    module, model = written.to_json(), default_config().to_json()
    # what only the module can know: the installed variants and what they need
    for key in ("packages", "cudaMinimumDriver", "cudaMinimumComputeCapability"):
        module["hardware"].pop(key), model["hardware"].pop(key)
    assert module == model


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"healthCheck": {"intervalSec": 4000}}, "healthCheck.intervalSec: 4000: Input should be"),
        (
            {"gateway": {"connectTimeoutSec": 700}},
            "gateway.connectTimeoutSec: 700: Input should be",
        ),
    ],
)
def test_values_the_types_let_through_but_the_model_refuses_fail_the_build(settings, message):
    """Before the build check these evaluated and the node then refused its config at start."""
    with pytest.raises(NixBuildError, match=message):
        evaluate({"services": {"exo": {"enable": True, **settings}}})
