"""exo-service.nix evaluated per mode: the node unit, its restart policy, directories, hardening."""

from __future__ import annotations

from typing import Any

import pytest

from tests.nixeval import evaluate, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]


def node(extra: dict[str, Any] | None = None, mode: str = "worker") -> tuple[str, dict[str, Any]]:
    result = evaluate({"services": {"exo": {"enable": True, "mode": mode, **(extra or {})}}})
    assert result["assertions"] == []
    name = result["exo"]["nodeUnit"]
    return name, result["services"][name]


@pytest.mark.parametrize(
    ("mode", "unit", "flags"),
    [
        ("master", "exo-master", "--role master"),
        ("worker", "exo-worker", "--role worker"),
        ("auto", "exo-worker", "--role worker"),
    ],
)
def test_every_mode_runs_the_supervisor_as_a_notify_service(mode, unit, flags) -> None:
    name, service = node(mode=mode)
    assert name == unit
    sc = service["serviceConfig"]
    assert sc["Type"] == "notify"
    assert sc["NotifyAccess"] == "main"
    assert " run --config /nix/store/" in sc["ExecStart"]
    assert sc["ExecStart"].endswith(f"{flags} --stop-timeout 25")
    assert " preflight --config /nix/store/" in sc["ExecStartPre"]
    assert sc["User"] == "exo"
    assert sc["Group"] == "exo"
    assert service["partOf"] == ["exo.target"]
    assert service["wantedBy"] == ["exo.target"]
    assert sc["KillMode"] == "mixed"
    assert sc["LimitNOFILE"] == 65535
    assert "--legacy-daemon" not in sc["ExecStart"]


def test_restart_backoff_watchdog_and_timeouts_follow_the_options() -> None:
    _, service = node(
        {
            "restart": {"delaySec": 2, "steps": 5, "maxDelaySec": 120},
            "healthCheck": {"intervalSec": 2.5, "timeoutSec": 1, "failures": 4},
            "timeouts": {"startSec": 600, "stopSec": 45},
        }
    )
    sc = service["serviceConfig"]
    assert (sc["Restart"], sc["RestartSec"], sc["RestartSteps"]) == ("always", 2, 5)
    assert sc["RestartMaxDelaySec"] == 120
    assert sc["WatchdogSec"] == "11000ms"  # 2.5 s x 4 probes + 1 s timeout
    assert (sc["TimeoutStartSec"], sc["TimeoutStopSec"]) == (600, 45)
    assert sc["ExecStart"].endswith("--stop-timeout 40")
    assert service["unitConfig"]["StartLimitIntervalSec"] == "0"


def test_defaults_give_a_watchdog_of_three_missed_probes() -> None:
    _, service = node()
    assert service["serviceConfig"]["WatchdogSec"] == "18000ms"


def test_service_directories_with_strict_modes() -> None:
    _, service = node()
    sc = service["serviceConfig"]
    assert (sc["StateDirectory"], sc["StateDirectoryMode"]) == ("exo", "0750")
    assert (sc["CacheDirectory"], sc["CacheDirectoryMode"]) == ("exo", "0750")
    assert (sc["RuntimeDirectory"], sc["RuntimeDirectoryMode"]) == ("exo", "0750")
    assert sc["ConfigurationDirectory"] == "exo"
    assert sc["UMask"] == "0077"
    assert sc.get("ReadWritePaths", []) == []


def test_model_directories_outside_the_state_dir_are_made_writable() -> None:
    result = evaluate(
        {
            "services": {
                "exo": {
                    "enable": True,
                    "modelsDir": "/srv/models",
                    "extraModelDirs": ["/var/lib/exo/more", "/mnt/big"],
                    "readOnlyModelDirs": ["/nfs/models"],
                }
            }
        }
    )
    sc = result["services"]["exo-worker"]["serviceConfig"]
    assert sc["ReadWritePaths"] == ["/srv/models", "/mnt/big"]
    assert sc["ReadOnlyPaths"] == ["-/nfs/models"]
    assert "d /srv/models 0750 exo exo - -" in result["tmpfiles"]
    assert "d /mnt/big 0750 exo exo - -" in result["tmpfiles"]
    assert sc["ProtectHome"] is True


def test_directories_outside_systemds_roots_use_tmpfiles_and_read_write_paths() -> None:
    result = evaluate({"services": {"exo": {"enable": True, "security": {"dataDir": "/srv/exo"}}}})
    sc = result["services"]["exo-worker"]["serviceConfig"]
    assert "StateDirectory" not in sc
    assert "/srv/exo" in sc["ReadWritePaths"]
    assert "d /srv/exo 0750 exo exo - -" in result["tmpfiles"]


def test_models_under_home_relax_protect_home_to_read_only() -> None:
    _, service = node({"readOnlyModelDirs": ["/home/alice/models"]})
    assert service["serviceConfig"]["ProtectHome"] == "read-only"


@pytest.mark.parametrize(
    ("limit", "memory_max"),
    [("80%", "80%"), ("48G", "48G"), ("64GiB", "64G"), ("512m", "512M"), ("2GB", "2G")],
)
def test_memory_limit_becomes_memory_max(limit: str, memory_max: str) -> None:
    _, service = node({"hardware": {"memoryLimit": limit}})
    assert service["serviceConfig"]["MemoryMax"] == memory_max


def test_no_memory_limit_no_memory_max() -> None:
    _, service = node()
    assert "MemoryMax" not in service["serviceConfig"]


def test_secrets_come_from_the_environment_file_only() -> None:
    result = evaluate(
        {"services": {"exo": {"enable": True, "environmentFile": "/run/secrets/exo.env"}}}
    )
    service = result["services"]["exo-worker"]
    assert service["serviceConfig"]["EnvironmentFile"] == "/run/secrets/exo.env"
    assert "HF_TOKEN" not in str(result["etc"])


HARDENING = {
    "CapabilityBoundingSet": "",
    "AmbientCapabilities": "",
    "NoNewPrivileges": True,
    "DevicePolicy": "closed",
    "PrivateTmp": True,
    "PrivateUsers": True,
    "ProtectSystem": "strict",
    "ProtectClock": True,
    "ProtectControlGroups": True,
    "ProtectHostname": True,
    "ProtectKernelLogs": True,
    "ProtectKernelModules": True,
    "ProtectKernelTunables": True,
    "ProtectProc": "invisible",
    "LockPersonality": True,
    "RestrictNamespaces": True,
    "RestrictRealtime": True,
    "RestrictSUIDSGID": True,
    "RemoveIPC": True,
    "SystemCallArchitectures": "native",
    "SystemCallFilter": ["@system-service", "~@privileged"],
    "RestrictAddressFamilies": ["AF_UNIX", "AF_INET", "AF_INET6", "AF_NETLINK"],
}


def test_hardening_directives() -> None:
    _, service = node()
    sc = service["serviceConfig"]
    for key, value in HARDENING.items():
        assert sc[key] == value, key


def test_cpu_only_hosts_get_a_private_dev_gpu_hosts_do_not() -> None:
    _, cpu = node()
    assert cpu["serviceConfig"]["PrivateDevices"] is True
    gpu = evaluate(
        """{ pkgs, ... }: { services.exo = { enable = true;
             hardware.packages = { cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; }; }; }"""
    )
    assert gpu["services"]["exo-worker"]["serviceConfig"]["PrivateDevices"] is False


def test_target_wanted_by_multi_user_and_unit_renders() -> None:
    result = evaluate({"services": {"exo": {"enable": True, "mode": "master", "noWorker": True}}})
    assert result["targets"]["exo"]["wantedBy"] == ["multi-user.target"]
    text = render_unit(result["services"]["exo-master"])
    assert "\nWatchdogSec=18000ms\n" in text
    assert "\nSystemCallFilter=@system-service\nSystemCallFilter=~@privileged\n" in text
    doc = result["etc"]["exo/config.json"]
    assert doc["noWorker"] is True
    assert doc["mode"] == "master"


def _offline_analyze() -> str | None:
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        return "systemd-analyze not installed (apt-get install systemd)"
    probe = subprocess.run(
        ["systemd-analyze", "security", "--help"], capture_output=True, text=True, check=False
    )
    if "--offline" not in probe.stdout:
        return "systemd-analyze is older than 252 (no --offline)"
    return None


@pytest.mark.skipif(_offline_analyze() is not None, reason=_offline_analyze() or "")
@pytest.mark.parametrize(
    "module",
    [
        "{ services.exo = { enable = true; }; }",
        """{ pkgs, ... }: { services.exo = { enable = true; mode = "master";
             hardware.packages = { cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; }; }; }""",
    ],
    ids=["cpu-only", "with-gpu-variant"],
)
def test_offline_exposure_at_most_2_0(module: str, tmp_path) -> None:
    import subprocess

    result = evaluate(module)
    name = result["exo"]["nodeUnit"]
    unit = tmp_path / f"{name}.service"
    unit.write_text(render_unit(result["services"][name]))
    done = subprocess.run(
        ["systemd-analyze", "security", "--offline=true", "--threshold=20", unit.name],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert "Overall exposure level" in done.stdout, done.stderr
    assert done.returncode == 0, done.stdout[-400:]
