"""services.exo.hardware.nodePerGpu evaluated with nixpkgs' lib: one node unit instance per GPU.

For 1, 2 and 8 GPUs: the template and each instance's drop-in, the device access of each
instance (and the exposure systemd-analyze gives each instance unit), directories, memory
split, the namespace units, what exo.target and the gateway want, and the config document.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import parse_config
from exo_nixos.hardware.instances import instances
from tests.nixeval import evaluate, exposure, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

SHARED = ["/dev/nvidiactl rw", "char-nvidia-uvm rw", "char-nvidia-caps rw"]


def _host(gpus: list[int], extra: str = "") -> dict[str, Any]:
    return evaluate(
        f"""{{ pkgs, ... }}: {{
  services.exo.enable = true;
  services.exo.networking.bondInterface = "bond0";
  services.exo.hardware.packages = {{ cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; }};
  services.exo.hardware.nodePerGpu = {{ enable = true; gpus = [ {" ".join(map(str, gpus))} ]; }};
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.nvidia.open = true;
  hardware.graphics.enable = true;
  {extra}
}}"""
    )


def _merged(template: dict[str, Any], dropin: dict[str, Any]) -> dict[str, Any]:
    """The instance unit systemd sees: the template plus its drop-in (lists add up)."""
    unit = {**template, "unitConfig": dict(template.get("unitConfig", {}))}
    config = dict(template["serviceConfig"])
    for key, value in dropin.get("serviceConfig", {}).items():
        config[key] = [*config.get(key, []), *value] if isinstance(value, list) else value
    unit["serviceConfig"] = config
    for key, value in dropin.get("unitConfig", {}).items():
        unit["unitConfig"][key] = f"{unit['unitConfig'].get(key, '')} {value}".strip()
    return unit


@pytest.mark.parametrize("count", [1, 2, 8])
def test_one_instance_per_gpu_with_its_own_device(count: int, tmp_path: Path) -> None:
    result = _host(list(range(count)))
    assert result["warnings"] == [] and result["assertions"] == []
    services = result["services"]
    assert "exo-worker" not in services
    template = services["exo-worker@"]
    config = template["serviceConfig"]
    assert config["DeviceAllow"] == SHARED, "no GPU of its own in the template"
    assert config["DevicePolicy"] == "closed" and config["PrivateDevices"] is False
    assert config["ExecStart"].endswith(" --instance %i")
    assert config["StateDirectory"] == "exo exo/instances/%i"
    assert config["CacheDirectory"] == "exo exo/instances/%i"
    assert config["RuntimeDirectory"] == "exo/%i"
    assert template["wantedBy"] == [] and template["partOf"] == ["exo.target"]
    names = [f"gpu{n}" for n in range(count)]
    wanted = result["targets"]["exo"]["wants"]
    assert [w for w in wanted if w.startswith("exo-worker@")] == [
        f"exo-worker@{n}.service" for n in names
    ]
    assert "exo-host-link.service" in wanted
    scores = set()
    for minor, name in enumerate(names):
        dropin = services[f"exo-worker@{name}"]
        assert dropin["overrideStrategy"] == "asDropin"
        assert dropin["serviceConfig"]["DeviceAllow"] == [f"/dev/nvidia{minor} rw"]
        assert dropin["serviceConfig"]["NetworkNamespacePath"] == f"/run/netns/exo-{name}"
        assert dropin["requires"] == [f"exo-netns@{name}.service"]
        unit = _merged(template, dropin)
        others = [f"/dev/nvidia{n} rw" for n in range(count) if n != minor]
        assert not set(others) & set(unit["serviceConfig"]["DeviceAllow"])
        assert "char-nvidia-frontend rw" not in unit["serviceConfig"]["DeviceAllow"]
        scores.add(exposure(unit, f"exo-worker@{name}.service", tmp_path))
    # every instance unit is exposed alike; the report names the figure
    assert len(scores) == 1
    print(f"{count} GPU(s): exposure of each instance unit {scores.pop()}")
    document = parse_config(result["etc"]["exo/config.json"])
    assert [i.name for i in instances(document.hardware.node_per_gpu)] == names


def test_groups_and_the_memory_split() -> None:
    result = _host(
        [],
        """services.exo.hardware.nodePerGpu.groups = [ [ 0 1 ] [ 2 3 ] ];
  services.exo.hardware.memoryLimit = "64G";""",
    )
    services = result["services"]
    assert services["exo-worker@gpu0-1"]["serviceConfig"]["DeviceAllow"] == [
        "/dev/nvidia0 rw",
        "/dev/nvidia1 rw",
    ]
    assert services["exo-worker@gpu2-3"]["serviceConfig"]["MemoryMax"] == str(32 << 30)
    assert services["exo-worker@"]["serviceConfig"]["MemoryMax"] == "64G"


@pytest.mark.parametrize(
    ("limit", "share"), [("80%", "26%"), ("1.5T", str(int(1.5 * (1 << 40)) // 3))]
)
def test_memory_shares_in_the_forms_memory_max_takes(limit: str, share: str) -> None:
    result = _host([0, 1, 2], f'services.exo.hardware.memoryLimit = "{limit}";')
    assert result["services"]["exo-worker@gpu1"]["serviceConfig"]["MemoryMax"] == share


def test_namespace_units_and_the_gateway() -> None:
    result = _host([0, 1])
    services = result["services"]
    netns = services["exo-netns@"]
    start = netns["serviceConfig"]["ExecStart"]
    assert " instance-net up --config " in start and start.endswith(" --instance %i")
    assert " instance-net down " in netns["serviceConfig"]["ExecStop"]
    assert netns["serviceConfig"]["CapabilityBoundingSet"] == ["CAP_SYS_ADMIN", "CAP_NET_ADMIN"]
    assert netns["bindsTo"] == ["sys-subsystem-net-devices-bond0.device"]
    assert netns["restartIfChanged"] is False
    host = services["exo-host-link"]
    assert "instance-net host" in host["serviceConfig"]["ExecStart"]
    gateway = services["exo-api"]
    assert gateway["wants"] == ["exo-worker@gpu0.service", "exo-worker@gpu1.service"]
    assert gateway["requires"] == [], "one node going must not stop the gateway"
    render_unit(services["exo-worker@"])  # no shell scripts in the template


def test_off_keeps_the_single_node_unit() -> None:
    result = evaluate(
        """{ pkgs, ... }: {
  services.exo.enable = true;
  services.exo.hardware.packages = { cpu = pkgs.exo-complete; cuda = pkgs.exo-cuda; };
  services.xserver.videoDrivers = [ "nvidia" ];
  hardware.nvidia.open = true;
  hardware.graphics.enable = true;
}"""
    )
    services = result["services"]
    assert "exo-worker@" not in services and "exo-netns@" not in services
    assert "char-nvidia-frontend rw" in services["exo-worker"]["serviceConfig"]["DeviceAllow"]
    assert services["exo-api"]["requires"] == ["exo-worker.service"]


def test_without_a_cuda_variant_it_warns() -> None:
    result = evaluate(
        """{
  services.exo.enable = true;
  services.exo.networking.bondInterface = "bond0";
  services.exo.hardware.nodePerGpu = { enable = true; gpus = [ 0 ]; };
}"""
    )
    assert any("no cuda variant is installed" in w for w in result["warnings"])


def test_template_and_instance_drop_in_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    import re
    import shutil
    import subprocess

    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze not installed")
    services = _host([0, 1], 'services.exo.hardware.memoryLimit = "80%";')["services"]
    # the store paths of the evaluation's stand-in packages do not exist here
    exec_lines = re.compile(r"^(ExecStart(?:Pre)?|ExecStop(?:Post)?)=.*$", re.MULTILINE)
    for name in ("exo-worker@", "exo-netns@"):
        text = exec_lines.sub(r"\1=/bin/true", render_unit(services[name]))
        (tmp_path / f"{name}.service").write_text(text)
    dropin = tmp_path / "exo-worker@gpu1.service.d"
    dropin.mkdir()
    (dropin / "overrides.conf").write_text(render_unit(services["exo-worker@gpu1"]))
    result = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "exo-worker@gpu1.service")],
        capture_output=True,
        text=True,
        check=False,
        cwd=tmp_path,
        env={"SYSTEMD_UNIT_PATH": f"{tmp_path}:", "PATH": "/usr/bin:/bin"},
    )
    noise = re.compile(r"Unknown key '(RestartSteps|RestartMaxDelaySec)'|bond0\.device")
    errors = [line for line in result.stderr.splitlines() if not noise.search(line)]
    assert errors == [], result.stderr
