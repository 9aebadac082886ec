"""``exo-nixos k3s render``: the objects, and kubernetes-validate --strict on three versions."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import yaml

from exo_nixos.cli import main as cli_main
from exo_nixos.config import default_config, parse_config
from exo_nixos.k3s.render import exposure, manifests, render_yaml

REPO = Path(__file__).resolve().parent.parent
VALIDATOR = Path(sys.executable).with_name("kubernetes-validate")
KUBERNETES_VERSIONS = ["1.29.0", "1.32.0", "1.35.0"]


needs_validator = pytest.mark.skipif(
    not VALIDATOR.exists() and shutil.which("kubernetes-validate") is None,
    reason="kubernetes-validate not installed (pip install kubernetes-validate)",
)


def validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    """kubernetes-validate --strict on ``path`` for Kubernetes ``version``."""
    validator = str(VALIDATOR) if VALIDATOR.exists() else "kubernetes-validate"
    return subprocess.run(
        [validator, "--strict", "-k", version, str(path)],
        capture_output=True,
        text=True,
        check=False,
    )


def config_with(**document: Any) -> Any:
    return parse_config({"schemaVersion": 1, **document})


FULL = {
    "gateway": {"enable": True, "listenAddress": "0.0.0.0", "apiKeysFile": "/run/keys"},
    "k3s": {"integration": True, "allowedNamespaces": ["ai-apps", "notebooks"]},
}


def by_kind(objects: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] == kind]


def test_contract_key_is_k3s() -> None:
    assert "k3s" in default_config().to_json()


def test_objects_and_their_namespace() -> None:
    objects = manifests(config_with(**FULL))
    assert [o["kind"] for o in objects] == [
        "Namespace",
        "ServiceAccount",
        "Secret",
        "Role",
        "RoleBinding",
        "Service",
        "NetworkPolicy",
        "NetworkPolicy",
    ]
    assert by_kind(objects, "Namespace")[0]["metadata"]["name"] == "exo-system"
    for obj in objects[1:6]:
        assert obj["metadata"]["namespace"] == "exo-system"
    secret = by_kind(objects, "Secret")[0]
    assert secret["type"] == "kubernetes.io/service-account-token"
    assert secret["metadata"]["annotations"] == {"kubernetes.io/service-account.name": "exo"}


def test_service_has_no_selector_and_a_named_port() -> None:
    service = by_kind(manifests(config_with(**FULL)), "Service")[0]
    assert service["metadata"]["name"] == "exo-api"
    assert "selector" not in service["spec"]
    assert service["spec"]["ports"] == [
        {
            "name": "http",
            "protocol": "TCP",
            "port": 52417,
            "targetPort": 52417,
            "appProtocol": "http",
        }
    ]


def test_role_is_least_privilege_and_bound_to_the_service_account() -> None:
    objects = manifests(config_with(k3s={"serviceAccount": "runner", "namespace": "inference"}))
    role = by_kind(objects, "Role")[0]
    assert role["rules"] == [
        {
            "apiGroups": ["discovery.k8s.io"],
            "resources": ["endpointslices"],
            "verbs": ["get", "create", "update", "delete"],
        }
    ]
    binding = by_kind(objects, "RoleBinding")[0]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]
    assert binding["subjects"] == [
        {"kind": "ServiceAccount", "name": "runner", "namespace": "inference"}
    ]
    assert not [o for o in objects if o["kind"].startswith("Cluster")]


def test_network_policy_per_allowed_namespace() -> None:
    policies = by_kind(manifests(config_with(**FULL)), "NetworkPolicy")
    assert [p["metadata"]["namespace"] for p in policies] == ["ai-apps", "notebooks"]
    assert policies[0]["spec"]["policyTypes"] == ["Egress"]
    assert policies[0]["spec"]["egress"] == [{"ports": [{"protocol": "TCP", "port": 52417}]}]
    assert by_kind(manifests(default_config()), "NetworkPolicy") == []


@pytest.mark.parametrize(
    ("gateway", "port", "via_gateway"),
    [
        ({"enable": True, "listenAddress": "0.0.0.0", "apiKeysFile": "/k"}, 52417, True),
        (
            {"enable": True, "listenAddress": "10.1.2.3", "apiKeysFile": "/k", "port": 8443},
            8443,
            True,
        ),
        ({"enable": True}, 52415, False),  # loopback gateway: pods cannot reach it
        ({"enable": False}, 52415, False),
    ],
)
def test_exposed_port_prefers_a_reachable_gateway(
    gateway: dict[str, Any], port: int, via_gateway: bool
):
    found = exposure(config_with(gateway=gateway))
    assert (found.port, found.via_gateway) == (port, via_gateway)


def test_render_yaml_round_trips() -> None:
    text = render_yaml(config_with(**FULL))
    assert list(yaml.safe_load_all(text)) == manifests(config_with(**FULL))


def test_cli_render_to_file_and_stdout(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "k3s": {"integration": true, "namespace": "ai"}}')
    out = tmp_path / "exo.yaml"
    assert cli_main(["k3s", "render", "--config", str(config), "--output", str(out)]) == 0
    assert next(d["kind"] for d in yaml.safe_load_all(out.read_text())) == "Namespace"
    assert cli_main(["k3s", "render", "--config", str(config)]) == 0
    assert capsys.readouterr().out == out.read_text()


@pytest.mark.parametrize(
    ("where", "words"),
    [
        ("missing/exo.yaml", "does not exist"),
        (".", "is a directory"),
    ],
)
def test_cli_render_to_a_path_that_cannot_take_it_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], where: str, words: str
) -> None:
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "k3s": {"integration": true}}')
    out = tmp_path / where
    assert cli_main(["k3s", "render", "--config", str(config), "-o", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and "--output" in err, err


def test_cli_render_writes_into_a_pipe_and_through_a_link_without_replacing_them(
    tmp_path: Path,
) -> None:
    """``-o`` names a FIFO (or a device such as /dev/stdout): the YAML goes into it and it
    stays a FIFO; ``-o`` names a symbolic link: the file it points to gets the YAML and the
    link stays a link. (Replacing them, as a rename onto the path would, is what a device
    like /dev/full must never suffer.)"""
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "k3s": {"integration": true}}')
    fifo = tmp_path / "manifests.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    assert cli_main(["k3s", "render", "--config", str(config), "-o", str(fifo)]) == 0
    reader.join(5)
    assert stat.S_ISFIFO(fifo.lstat().st_mode)
    assert received and b"kind: Namespace" in received[0]
    (tmp_path / "real").mkdir()
    real = tmp_path / "real" / "exo.yaml"
    real.write_text("old")
    link = tmp_path / "exo.yaml"
    link.symlink_to(real)
    assert cli_main(["k3s", "render", "--config", str(config), "-o", str(link)]) == 0
    assert link.is_symlink() and "kind: Namespace" in real.read_text()
    assert sorted(p.name for p in (tmp_path / "real").iterdir()) == ["exo.yaml"]  # no leftovers


def test_cli_render_bad_config_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    config = tmp_path / "config.json"
    config.write_text('{"schemaVersion": 1, "k3s": {"namespace": "Not_A_Label"}}')
    assert cli_main(["k3s", "render", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "k3s.namespace" in err and "Traceback" not in err


@needs_validator
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
@pytest.mark.parametrize("case", ["default", "full"])
def test_manifests_pass_strict_validation(tmp_path: Path, version: str, case: str) -> None:
    config = default_config() if case == "default" else config_with(**FULL)
    path = tmp_path / "exo.yaml"
    path.write_text(render_yaml(config))
    result = validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == len(manifests(config))


@needs_validator
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_registrar_endpoint_slices_pass_strict_validation(tmp_path: Path, version: str) -> None:
    from exo_nixos.k3s.registrar import SliceSpec, build_slice

    spec = SliceSpec("exo-system", "exo-api", "node-a.example.com", 52415)
    slices = [
        build_slice(spec, "10.0.0.5", True).to_dict(),
        build_slice(spec, "fd00::5", False).to_dict(),
    ]
    path = tmp_path / "slices.yaml"
    path.write_text(yaml.safe_dump_all(slices))
    result = validate(path, version)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count(" passed for resource ") == 2


@needs_validator
def test_validator_rejects_a_broken_object(tmp_path: Path) -> None:
    """The validation test can fail: an unknown field is caught in strict mode."""
    objects = manifests(default_config())
    by_kind(objects, "Service")[0]["spec"]["selectorr"] = {"a": "b"}
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump_all(objects))
    result = validate(path, KUBERNETES_VERSIONS[-1])
    assert result.returncode != 0
