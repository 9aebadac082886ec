"""services.exo.hardware evaluated with nixpkgs' lib: device access, ordering, warnings."""

import re
import shutil
import subprocess

import pytest

from exo_nixos.basetypes import Accelerator
from exo_nixos.config import parse_config
from tests.nixeval import NixBuildError, NixEvalError, evaluate, exposure, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

NVIDIA_CHARS = [
    "char-nvidiactl rw",
    "char-nvidia-frontend rw",
    "char-nvidia-uvm rw",
    "char-nvidia-caps rw",
]


def _eval(hardware=None, mode="auto", **host):
    module = {"services": {"exo": {"enable": True, "mode": mode, "hardware": hardware or {}}}}
    module.update(host)
    return evaluate(module)


def _cuda_host(**extra):
    return {
        "services": {"exo": {"enable": True, **extra}, "xserver": {"videoDrivers": ["nvidia"]}},
        "hardware": {"graphics": {"enable": True}, "nvidia": {"open": True}},
    }


CUDA_PACKAGES = """
{ pkgs, ... }: {
  services.exo.enable = true;
  services.exo.hardware.packages = { cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; };
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.nvidia.open = true;
  hardware.graphics.enable = true;
}
"""


def test_cpu_only_node_gets_no_devices():
    result = _eval()
    service = result["services"]["exo-worker"]["serviceConfig"]
    assert service["DevicePolicy"] == "closed"
    assert service["PrivateDevices"] is True
    assert "DeviceAllow" not in service and "SupplementaryGroups" not in service
    assert "systemd-modules-load.service" not in result["services"]["exo-worker"]["after"]
    assert result["warnings"] == [] and result["assertions"] == []


def test_cuda_variant_gets_nvidia_devices_and_module_ordering():
    result = evaluate(CUDA_PACKAGES)
    unit = result["services"]["exo-worker"]
    config = unit["serviceConfig"]
    assert config["DeviceAllow"] == NVIDIA_CHARS
    assert config["PrivateDevices"] is False
    assert "SupplementaryGroups" not in config  # /dev/nvidia* are 0666 on NixOS
    assert "systemd-modules-load.service" in unit["after"]
    assert "systemd-modules-load.service" in unit["wants"]
    assert "systemd-udev-settle.service" not in unit["after"]
    assert result["warnings"] == [] and result["assertions"] == []
    packages = parse_config(result["etc"]["exo/config.json"]).hardware.packages
    assert set(packages) == {"cpu", "cuda"}


def test_cuda_requirements_come_from_the_cuda_package():
    result = evaluate(CUDA_PACKAGES)
    hardware = parse_config(result["etc"]["exo/config.json"]).hardware
    assert hardware.cuda_minimum_driver == "580"
    assert hardware.cuda_minimum_compute_capability == "7.5"
    own = CUDA_PACKAGES.replace(
        "hardware.graphics.enable = true;",
        'hardware.graphics.enable = true; services.exo.hardware.cudaMinimumDriver = "550.54.14";',
    )
    hardware = parse_config(evaluate(own)["etc"]["exo/config.json"]).hardware
    assert hardware.cuda_minimum_driver == "550.54.14"
    assert hardware.cuda_minimum_compute_capability == "7.5"


def test_cpu_only_node_has_no_cuda_requirements():
    hardware = parse_config(_eval()["etc"]["exo/config.json"]).hardware
    assert hardware.cuda_minimum_driver is None
    assert hardware.cuda_minimum_compute_capability is None


def _with_driver(version):
    return CUDA_PACKAGES.replace(
        "hardware.graphics.enable = true;",
        "hardware.graphics.enable = true; hardware.nvidia.package = pkgs.exo-nixos // "
        f'{{ version = "{version}"; }};',
    )


def test_configured_driver_older_than_the_cuda_variant_needs_warns():
    (warning,) = evaluate(_with_driver("550.144.03"))["warnings"]
    assert warning.startswith(
        "services.exo.hardware: the NVIDIA driver configured (hardware.nvidia.package, "
        "550.144.03) is older than 580, the oldest the CUDA variant of EXO runs on"
    )
    assert "nvidiaPackages.latest" in warning
    assert evaluate(_with_driver("580.95.05"))["warnings"] == []


def test_bad_cuda_minimum_is_a_type_error():
    with pytest.raises(NixEvalError, match="cudaMinimumComputeCapability"):
        _eval({"cudaMinimumComputeCapability": "sm_75"})


def test_rendered_unit_lists_each_device_rule():
    text = render_unit(evaluate(CUDA_PACKAGES)["services"]["exo-worker"])
    for rule in NVIDIA_CHARS:
        assert f"DeviceAllow={rule}\n" in text
    assert "DevicePolicy=closed\n" in text
    assert "After=network-online.target systemd-modules-load.service\n" in text


def test_persistenced_and_udev_settle_ordering():
    module = CUDA_PACKAGES.replace(
        "hardware.graphics.enable = true;",
        "hardware.graphics.enable = true; hardware.nvidia.nvidiaPersistenced = true;"
        " services.exo.hardware.waitForDeviceNodes = true;",
    )
    unit = evaluate(module)["services"]["exo-worker"]
    for name in ("nvidia-persistenced.service", "systemd-udev-settle.service"):
        assert name in unit["after"] and name in unit["wants"]


def test_rocm_gets_kfd_drm_and_render_group_and_a_warning():
    result = evaluate("""
    { pkgs, ... }: {
      services.exo = {
        enable = true;
        mode = "master";
        hardware.packages.rocm = pkgs.exo-rocm;
        hardware.preferredAccelerator = "rocm";
      };
    }
    """)
    config = result["services"]["exo-master"]["serviceConfig"]
    assert config["DeviceAllow"] == ["char-kfd rw", "char-drm rw"]
    assert config["SupplementaryGroups"] == ["render"]
    assert any("upstream EXO has no ROCm backend" in w for w in result["warnings"])
    assert not any("has no rocm variant" in w for w in result["warnings"])


def test_cuda_preferred_without_nvidia_driver_warns_with_the_fix():
    result = _eval({"preferredAccelerator": "cuda"})
    (driver,) = [w for w in result["warnings"] if "no NVIDIA driver is configured" in w]
    assert 'Add "nvidia" to services.xserver.videoDrivers' in driver
    assert "hardware.nvidia.datacenter.enable = true" in driver
    assert any("has no cuda variant" in w for w in result["warnings"])


@pytest.mark.parametrize("accelerator", ["cuda", "rocm"])
def test_preferred_accelerator_without_its_variant_gets_no_devices(accelerator, tmp_path):
    """It can never be chosen (the warning says so), so the unit stays as closed as CPU-only."""
    result = _eval({"preferredAccelerator": accelerator})
    unit = result["services"]["exo-worker"]
    config = unit["serviceConfig"]
    assert "DeviceAllow" not in config and "SupplementaryGroups" not in config
    assert config["PrivateDevices"] is True
    assert "systemd-modules-load.service" not in unit["after"]
    assert any(f"has no {accelerator} variant" in w for w in result["warnings"])
    assert exposure(unit, "exo-worker.service", tmp_path) == exposure(
        _eval()["services"]["exo-worker"], "cpu.service", tmp_path
    )


DATACENTER = CUDA_PACKAGES.replace(
    'services.xserver.videoDrivers = [ "nvidia" ];', "hardware.nvidia.datacenter.enable = true;"
)


def test_datacenter_driver_counts_as_configured():
    dc_580 = DATACENTER.replace(
        "hardware.graphics.enable = true;",
        "hardware.graphics.enable = true; hardware.nvidia.package = pkgs.exo-nixos // "
        '{ version = "580.159.04"; };',
    )
    result = evaluate(dc_580)
    assert result["warnings"] == [] and result["assertions"] == []


def test_default_datacenter_driver_is_too_old_for_cuda_13():
    # nixos-25.11's nvidiaPackages.dc is the 570 line; nvidiaPackages.latest is no DC driver
    result = evaluate(DATACENTER)
    (warning,) = result["warnings"]
    assert "(hardware.nvidia.package, 570.172.08) is older than 580" in warning
    assert "nvidiaPackages.dc_580" in warning and "nvidiaPackages.latest" not in warning
    assert result["assertions"] == []


def test_cuda_without_graphics_driver_libraries_warns():
    module = CUDA_PACKAGES.replace("hardware.graphics.enable = true;", "")
    (warning,) = evaluate(module)["warnings"]
    assert "hardware.graphics.enable = true" in warning


def test_mlx_on_nixos_warns():
    result = _eval({"preferredAccelerator": "mlx"})
    assert any("needs Metal (macOS)" in w for w in result["warnings"])
    assert "DeviceAllow" not in result["services"]["exo-worker"]["serviceConfig"]


def test_useless_settings_warn():
    result = _eval({"visibleDevices": ["0"]})
    assert any("visibleDevices has no effect" in w for w in result["warnings"])


def test_the_gfx_override_is_retired_with_the_way_to_set_it():
    """Upstream EXO has no ROCm backend: the option could only ever warn that it did nothing."""
    result = _eval({"rocmGfxOverride": "11.0.0"})
    (message,) = [m for m in result["assertions"] if "rocmGfxOverride" in m]
    assert "no longer has any effect" in message and "no ROCm backend" in message
    assert "services.exo.environmentVariables.HSA_OVERRIDE_GFX_VERSION" in message
    assert "rocmGfxOverride" not in result["etc"]["exo/config.json"]["hardware"]


def test_cpu_variant_is_always_installed_next_to_the_others():
    module = """
    { pkgs, ... }: {
      services.exo.enable = true;
      services.exo.hardware.packages = { cuda = pkgs.exo-cuda; };
    }
    """
    result = evaluate(module)
    packages = parse_config(result["etc"]["exo/config.json"]).hardware.packages
    assert set(packages) == {"cpu", "cuda"}
    assert packages[Accelerator.CPU].endswith("-exo-complete")
    assert packages[Accelerator.CUDA].endswith("-exo-cuda")


def test_removing_the_cpu_variant_is_an_assertion():
    module = """
    { lib, pkgs, ... }: {
      services.exo.enable = true;
      services.exo.hardware.packages = lib.mkForce { cuda = pkgs.exo-cuda; };
    }
    """
    (message,) = evaluate(module)["assertions"]
    assert "services.exo.hardware.packages.cpu = pkgs.exo-complete" in message


@pytest.mark.parametrize(
    ("limit", "memory_max"),
    [("80%", "80%"), ("80 %", "80%"), ("64GiB", "64G"), ("48G", "48G"), ("512m", "512M")],
)
def test_memory_limit_becomes_memory_max(limit, memory_max):
    result = _eval({"memoryLimit": limit})
    assert result["services"]["exo-worker"]["serviceConfig"]["MemoryMax"] == memory_max
    assert parse_config(result["etc"]["exo/config.json"]).hardware.memory_limit == limit


def test_no_memory_limit_no_memory_max():
    assert "MemoryMax" not in _eval()["services"]["exo-worker"]["serviceConfig"]


def test_service_hardening_can_override_the_defaults():
    module = """
    { lib, ... }: {
      services.exo.enable = true;
      systemd.services.exo-worker.serviceConfig.DevicePolicy = "strict";
    }
    """
    config = evaluate(module)["services"]["exo-worker"]["serviceConfig"]
    assert config["DevicePolicy"] == "strict"


def test_unknown_accelerator_key_is_rejected():
    module = """
    { pkgs, ... }: {
      services.exo.enable = true;
      services.exo.hardware.packages = { cpu = pkgs.exo-complete; tpu = pkgs.exo-cuda; };
    }
    """
    with pytest.raises(
        NixBuildError, match=r"hardware\.packages\.tpu\.\[key\]: 'tpu' is not allowed"
    ):
        evaluate(module)


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_rendered_gpu_unit_passes_systemd_analyze_verify(tmp_path):
    module = CUDA_PACKAGES.replace(
        "cuda = pkgs.exo-cuda;", "cuda = pkgs.exo-cuda; rocm = pkgs.exo-rocm;"
    ).replace(
        "services.exo.enable = true;",
        'services.exo.enable = true; services.exo.hardware.memoryLimit = "64GiB";',
    )
    text = render_unit(evaluate(module)["services"]["exo-worker"])
    assert "SupplementaryGroups=render\n" in text and "MemoryMax=64G\n" in text
    # the store paths of the evaluation's stand-in packages do not exist here
    text = re.sub(
        r"^(ExecStart(?:Pre)?|ExecStopPost)=.*$", r"\1=/bin/true", text, flags=re.MULTILINE
    )
    unit = tmp_path / "exo-worker.service"
    unit.write_text(text)
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert _without_newer_keys(result.stderr) == "", result.stderr


def _without_newer_keys(stderr: str) -> str:
    """Drop the warnings of a systemd older than 254 about the node unit's backoff keys.

    RestartSteps= and RestartMaxDelaySec= (exo-service.nix) arrived in systemd 254; the
    nspawn tier verifies the same unit under systemd 257 with no warning allowed.
    """
    version = subprocess.run(
        ["systemd-analyze", "--version"], capture_output=True, text=True, check=False
    ).stdout.split()
    if len(version) > 1 and version[1].isdigit() and int(version[1]) >= 254:
        return stderr
    newer = re.compile(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'")
    return "\n".join(line for line in stderr.splitlines() if not newer.search(line))
