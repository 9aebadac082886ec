"""The stub NixOS options (nix/tests/stubs/nixos.nix) refuse what NixOS refuses.

Each test is a definition nixpkgs' own declaration rejects, defaults or merges in a way a
looser stub would not, so a module defect NixOS would catch fails here too.
"""

from __future__ import annotations

import json
import re
from typing import Any

import pytest

from tests.nixeval import NixEvalError, evaluate, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

EXO = "services.exo.enable = true;"


def probe(expr: str, config: str = "") -> Any:
    """The value of the Nix expression ``expr`` (over ``config``, ``lib``, ``pkgs``) in a
    configuration of ``config`` plus the exo modules."""
    module = f"""
    {{ config, lib, pkgs, ... }}: {{
      {config}
      environment.etc.probe.text = builtins.toJSON ({expr});
    }}
    """
    return json.loads(evaluate(module)["etc"]["probe"])


def node(config: str) -> dict[str, Any]:
    unit: dict[str, Any] = evaluate(f"{{ lib, pkgs, ... }}: {{ {EXO} {config} }}")["services"][
        "exo-worker"
    ]
    return unit


# systemd units: nixos/lib/systemd-lib.nix, nixos/lib/systemd-unit-options.nix


@pytest.mark.parametrize(
    "attr", ["after", "before", "wants", "requires", "bindsTo", "partOf", "wantedBy", "requiredBy"]
)
def test_unit_dependencies_need_a_unit_suffix(attr):
    with pytest.raises(NixEvalError, match=f"exo-worker.{attr}.*string matching the pattern"):
        node(f'systemd.services.exo-worker.{attr} = [ "network-online" ];')
    assert (
        "network-online.target"
        in node(f'systemd.services.exo-worker.{attr} = [ "network-online.target" ];')[attr]
    )


@pytest.mark.parametrize(
    ("key", "value"),
    [("Type", "notfy"), ("Restart", "on-crash"), ("Type", 'lib.mkForce "daemon"')],
)
def test_service_type_and_restart_values_are_checked(key, value):
    value = value if value.startswith("lib.") else f'"{value}"'
    with pytest.raises(NixEvalError, match=f"Systemd Service field `{key}' cannot have value"):
        node(f"systemd.services.exo-worker.serviceConfig.{key} = {value};")


def test_override_strategy_is_one_of_the_two_nixos_knows():
    assert node("")["overrideStrategy"] == "asDropinIfExists"
    with pytest.raises(NixEvalError, match="overrideStrategy"):
        node('systemd.services.exo-worker.overrideStrategy = "asOverride";')


def test_notify_reload_is_a_service_type():
    unit = node('systemd.services.exo-worker.serviceConfig.Type = lib.mkForce "notify-reload";')
    assert unit["serviceConfig"]["Type"] == "notify-reload"


def test_unit_settings_merge_lists_and_scalars_as_nixos_does():
    unit = node('systemd.services.exo-worker.serviceConfig.ExecStartPre = [ "/bin/true" ];')
    pre = unit["serviceConfig"]["ExecStartPre"]
    assert len(pre) == 2 and "/bin/true" in pre and any("preflight" in c for c in pre)


def test_description_is_a_single_line():
    with pytest.raises(NixEvalError, match="single-line string"):
        node('systemd.services.exo-worker.description = lib.mkForce "EXO\\nnode";')
    unit = node('systemd.services.exo-worker.description = lib.mkForce "EXO node\\n";')
    assert unit["description"] == "EXO node"
    assert "Description=EXO node\n" in render_unit(unit)


def test_start_limits_are_ints_without_default():
    unit = node("")
    assert unit["unitConfig"]["StartLimitIntervalSec"] == "0"
    assert "StartLimitBurst" not in unit["unitConfig"]
    assert "StartLimitBurst" not in render_unit(unit)
    assert "StartLimitBurst=5\n" in render_unit(
        node("systemd.services.exo-worker.startLimitBurst = 5;")
    )
    with pytest.raises(NixEvalError, match="startLimitBurst"):
        node("systemd.services.exo-worker.startLimitBurst = null;")


def test_dependencies_render_from_unit_config_as_nixos_writes_them():
    unit = node("")
    assert unit["unitConfig"]["After"] == "network-online.target"
    assert unit["unitConfig"]["PartOf"] == "exo.target"
    text = render_unit(unit)
    assert text.count("After=") == 1 and "PartOf=exo.target\n" in text


# nixos/modules/system/boot/systemd/tmpfiles.nix


def test_tmpfiles_settings_are_typed_with_defaults():
    settings = 'systemd.tmpfiles.settings."10-exo"."/var/lib/exo-extra".d.mode = "0750";'
    entry = probe('config.systemd.tmpfiles.settings."10-exo"."/var/lib/exo-extra".d', settings)
    assert entry == {
        "type": "d",
        "mode": "0750",
        "user": "-",
        "group": "-",
        "age": "-",
        "argument": "",
    }
    with pytest.raises(NixEvalError, match=re.escape("tmpfiles.settings")):
        probe(
            "config.systemd.tmpfiles.settings",
            'systemd.tmpfiles.settings."10-exo"."/x".d.mode = 750;',
        )


# nixos/modules/config/users-groups.nix


def _assertions(users: str) -> list[str]:
    messages: list[str] = evaluate(f"{{ {users} }}")["assertions"]
    return messages


def test_a_system_user_needs_a_group():
    (message,) = _assertions("users.users.svc.isSystemUser = true;")
    assert message.startswith("users.users.svc.group is unset.")


def test_exactly_one_of_system_and_normal_user():
    both = _assertions(
        'users.users.svc = { isSystemUser = true; isNormalUser = true; group = "users"; };'
    )
    assert any("Exactly one of users.users.svc.isSystemUser" in m for m in both)
    neither = _assertions('users.users.svc.group = "users";')
    assert any("Exactly one of users.users.svc.isSystemUser" in m for m in neither)


def test_the_primary_group_must_exist():
    (message,) = _assertions('users.users.svc = { isSystemUser = true; group = "svc"; };')
    assert "primary group that is undefined: svc" in message
    assert "users.groups.svc = {};" in message
    assert _assertions('users.users.svc = { isSystemUser = true; group = "render"; };') == []


def test_a_normal_user_gets_home_and_the_users_group():
    user = probe("config.users.users.alice", "users.users.alice.isNormalUser = true;")
    assert (user["group"], user["home"], user["createHome"]) == ("users", "/home/alice", True)


def test_passwd_fields_refuse_colons_and_newlines():
    with pytest.raises(NixEvalError, match="not containing newlines or colons"):
        evaluate(
            '{ users.users.svc = { isSystemUser = true; group = "users"; description = "a:b"; }; }'
        )
    with pytest.raises(NixEvalError, match=re.escape("users.users.svc.home")):
        evaluate('{ users.users.svc = { isSystemUser = true; group = "users"; home = "/a:b"; }; }')
    # the exo module refuses such a dataDir itself, before it becomes the exo user's home
    with pytest.raises(NixEvalError, match=re.escape("services.exo.security.dataDir")):
        evaluate({"services": {"exo": {"enable": True, "security": {"dataDir": "/var/lib/a:b"}}}})


def test_the_exo_user_passes_the_nixos_assertions():
    result = evaluate({"services": {"exo": {"enable": True}}})
    assert result["assertions"] == []
    assert result["users"]["users"]["exo"]["group"] == "exo"


# nixos/modules/system/etc/etc.nix


def test_etc_source_is_a_path_and_text_sets_it():
    assert (
        probe('config.environment.etc."a/b".source.name', 'environment.etc."a/b".text = "x";')
        == "etc-a-b"
    )
    with pytest.raises(NixEvalError, match=re.escape("environment.etc.x.source")):
        evaluate('{ environment.etc.x.source = "relative/file"; }')
    with pytest.raises(NixEvalError, match=re.escape("environment.etc.x.source")):
        evaluate('{ environment.etc.x.mode = "0600"; }')


# nixos/modules/tasks/network-interfaces.nix


def test_host_name_is_a_dns_label_defaulting_to_nixos():
    assert probe("config.networking.hostName") == "nixos"
    with pytest.raises(NixEvalError, match=re.escape("networking.hostName")):
        probe("config.networking.hostName", 'networking.hostName = "node1.lab";')


# nixos/modules/config/sysctl.nix


@pytest.mark.parametrize(("host", "merged"), [(1 << 27, 1 << 27), (1 << 20, 1 << 26)])
def test_socket_buffer_maxima_take_the_highest_value(host, merged):
    config = f'boot.kernel.sysctl."net.core.rmem_max" = lib.mkDefault {host};'
    config += f' boot.kernel.sysctl."net.core.wmem_max" = lib.mkDefault {host};'
    sysctl = evaluate(f"{{ lib, ... }}: {{ {EXO} {config} }}")["sysctl"]
    assert sysctl["net.core.rmem_max"] == sysctl["net.core.wmem_max"] == merged


def test_sysctl_values_are_strings_ints_or_bools():
    with pytest.raises(NixEvalError, match=re.escape("vm.swappiness")):
        evaluate('{ boot.kernel.sysctl."vm.swappiness" = 1.5; }')
    with pytest.raises(NixEvalError, match=re.escape("net.core.rmem_max")):
        evaluate('{ boot.kernel.sysctl."net.core.rmem_max" = "big"; }')


# nixos/modules/services/x11/xserver.nix, nixos/modules/hardware/video/nvidia.nix


def test_video_drivers_default():
    assert probe("config.services.xserver.videoDrivers") == ["modesetting", "fbdev"]


def test_the_default_nvidia_driver_has_a_version():
    desktop = 'services.xserver.videoDrivers = [ "nvidia" ];'
    assert probe("config.hardware.nvidia.package.version", desktop) == "580.105.08"
    datacenter = "hardware.nvidia.datacenter.enable = true;"
    assert probe("config.hardware.nvidia.package.version", datacenter) == "570.172.08"


def test_nvidia_open_must_be_set_from_driver_560():
    desktop = '{ services.xserver.videoDrivers = [ "nvidia" ]; }'
    (message,) = evaluate(desktop)["assertions"]
    assert message.startswith("You must configure `hardware.nvidia.open`")
    assert evaluate(desktop.replace("}", "hardware.nvidia.open = false; }"))["assertions"] == []
    older = desktop.replace(
        "}", 'hardware.nvidia.package = { name = "nvidia-x11"; version = "550.144.03"; }; }'
    )
    assert evaluate(older)["assertions"] == []


def test_nvidia_x11_and_datacenter_exclude_each_other():
    both = (
        '{ services.xserver.videoDrivers = [ "nvidia" ];'
        " hardware.nvidia = { datacenter.enable = true; open = true; }; }"
    )
    assert evaluate(both)["assertions"] == [
        "You cannot configure both X11 and Data Center drivers at the same time."
    ]


# nixos/modules/services/cluster/rancher/default.nix (services.k3s)


def test_k3s_manifest_target_defaults_to_the_name_with_yaml():
    manifests = probe(
        "lib.mapAttrs (_: m: m.target) config.services.k3s.manifests",
        "services.k3s.manifests = { app.source = pkgs.exo-nixos;"
        ' other.source = pkgs.exo-nixos; other.target = "x.yml";'
        ' "kept.yml".source = pkgs.exo-nixos; };',
    )
    assert manifests == {"app": "app.yaml", "other": "x.yml", "kept.yml": "kept.yml"}


def test_k3s_manifest_content_makes_the_source_and_one_of_them_is_required():
    source = probe(
        "config.services.k3s.manifests.app.source.name",
        'services.k3s.manifests.app.content = { kind = "Namespace"; };',
    )
    assert source == "app-manifest-app"
    with pytest.raises(NixEvalError, match=re.escape("services.k3s.manifests.app.source")):
        evaluate("{ services.k3s.manifests.app.enable = true; }")
