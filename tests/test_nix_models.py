"""services.exo.models and exo-models.service: options, config document, unit, hardening."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from exo_nixos.config import parse_config
from tests.nixeval import evaluate, exposure, render_unit, requires_nix

pytestmark = [pytest.mark.nix, requires_nix]

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def exo(**settings: Any) -> dict[str, Any]:
    return {"services": {"exo": {"enable": True, **settings}}}


def test_no_models_no_unit() -> None:
    result = evaluate(exo())
    assert "exo-models" not in result["services"]
    assert "exo-models.service" not in result["targets"]["exo"]["wants"]
    document = result["exo"]["configDocument"]
    assert document["models"] == {}
    parse_config(document)


def test_declared_models_reach_the_config_document_with_defaults() -> None:
    result = evaluate(
        exo(
            models={
                LLAMA: {},
                "mlx-community/Qwen3-0.6B-4bit": {"running": False, "minNodes": 2},
            },
            modelReconciler={"intervalSec": 10},
        )
    )
    assert result["assertions"] == []
    document = result["exo"]["configDocument"]
    assert document["models"][LLAMA] == {
        "running": True,
        "sharding": "Pipeline",
        "instanceMeta": "MlxRing",
        "minNodes": 1,
        "custom": False,
    }
    assert document["models"]["mlx-community/Qwen3-0.6B-4bit"]["minNodes"] == 2
    assert document["modelReconciler"] == {
        "enable": True,
        "intervalSec": 10,
        "placeTimeoutSec": 900,
        "repairCache": True,
        "quarantineDir": None,
    }
    config = parse_config(document)  # the Python model accepts what the module writes
    assert config.effective_quarantine_dir == "/var/lib/exo/quarantine"


def test_the_unit_follows_the_node_and_backs_off() -> None:
    result = evaluate(exo(mode="master", models={LLAMA: {}}))
    unit = result["services"]["exo-models"]
    assert unit["after"] == ["exo-master.service"]
    assert unit["requires"] == ["exo-master.service"]
    assert unit["partOf"] == ["exo.target"]
    assert "exo-models.service" in result["targets"]["exo"]["wants"]
    service = unit["serviceConfig"]
    assert " models reconcile --config /nix/store/" in service["ExecStart"]
    assert service["Type"] == "notify"
    assert service["Restart"] == "always"
    assert service["RestartSteps"] == 6
    assert service["RestartMaxDelaySec"] == 120
    assert service["User"] == "exo"
    assert sorted(service["ReadWritePaths"]) == [
        "-/run/exo",
        "-/var/lib/exo",
        "-/var/lib/exo/models",
        "-/var/lib/exo/quarantine",
    ]


def test_hardening_is_as_tight_as_the_gateway(tmp_path: Path) -> None:
    result = evaluate(exo(models={LLAMA: {}}))
    service = result["services"]["exo-models"]["serviceConfig"]
    assert service["PrivateDevices"] is True
    assert service["DevicePolicy"] == "closed"
    assert service["CapabilityBoundingSet"] == ""
    assert service["NoNewPrivileges"] is True
    assert service["ProtectSystem"] == "strict"
    assert service["ProtectHome"] is True
    assert service["MemoryDenyWriteExecute"] is True
    assert service["RestrictAddressFamilies"] == ["AF_INET", "AF_INET6", "AF_UNIX"]
    assert "~@resources" in service["SystemCallFilter"]
    level = exposure(result["services"]["exo-models"], "exo-models.service", tmp_path)
    node = exposure(result["services"]["exo-worker"], "exo-worker.service", tmp_path)
    print(f"exposure: exo-models.service {level}, exo-worker.service {node}")
    assert level <= node


def test_a_quarantine_elsewhere_is_created_and_writable() -> None:
    result = evaluate(exo(models={LLAMA: {}}, modelReconciler={"quarantineDir": "/srv/quarantine"}))
    assert "d /srv/quarantine 0750 exo exo - -" in result["tmpfiles"]
    assert "-/srv/quarantine" in result["services"]["exo-models"]["serviceConfig"]["ReadWritePaths"]


def test_disabled_reconciler_keeps_the_declaration() -> None:
    result = evaluate(exo(models={LLAMA: {}}, modelReconciler={"enable": False}))
    assert "exo-models" not in result["services"]
    assert LLAMA in result["exo"]["configDocument"]["models"]


def test_a_network_namespace_is_joined() -> None:
    result = evaluate(exo(models={LLAMA: {}}, networking={"networkNamespace": "exo"}))
    service = result["services"]["exo-models"]["serviceConfig"]
    assert service["NetworkNamespacePath"] == "/run/netns/exo"
    assert "NetworkNamespacePath=/run/netns/exo" in render_unit(result["services"]["exo-models"])


def test_bad_model_entries_are_refused_by_the_options() -> None:
    from tests.nixeval import NixEvalError

    with pytest.raises(NixEvalError, match="minNodes"):
        evaluate(exo(models={LLAMA: {"minNodes": 0}}))
    with pytest.raises(NixEvalError, match="sharding"):
        evaluate(exo(models={LLAMA: {"sharding": "Diagonal"}}))


def test_the_readme_first_model_block_declares_a_running_model() -> None:
    import re

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme.split("### Your first model", 1)[1].split("\n### ", 1)[0]
    [block] = re.findall(r"```nix\n(.*?)```", section, re.DOTALL)
    result = evaluate(block)
    assert result["assertions"] == []
    assert "exo-models" in result["services"]
    config = parse_config(result["exo"]["configDocument"])
    assert config.models["mlx-community/Llama-3.2-1B-Instruct-4bit"].running
    assert config.gateway.listen_address == "127.0.0.1"  # the curl in the README uses it
