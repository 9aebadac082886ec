"""The config contract's ``models`` and ``modelReconciler``: judged by the config model."""

from __future__ import annotations

import pytest

from exo_nixos.config import parse_config
from exo_nixos.errors import ConfigError

LLAMA = "mlx-community/Llama-3.2-1B-Instruct-4bit"


def problems(document: dict[str, object]) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config({"schemaVersion": 1, **document})
    return caught.value.problems or [str(caught.value)]


def test_defaults() -> None:
    config = parse_config({"schemaVersion": 1, "models": {LLAMA: {}}})
    spec = config.models[LLAMA]
    assert (spec.running, str(spec.sharding), str(spec.instance_meta), spec.min_nodes) == (
        True,
        "Pipeline",
        "MlxRing",
        1,
    )
    assert config.model_reconciler.place_timeout_sec == 900
    assert config.effective_quarantine_dir == "/var/lib/exo/quarantine"


def test_enum_values_are_quoted_as_written() -> None:
    [line] = problems({"models": {LLAMA: {"sharding": "Diagonal"}}})
    assert line == (
        f"models.\"{LLAMA}\".sharding: 'Diagonal' is not allowed; input should be 'Pipeline' "
        "or 'Tensor'"
    )


@pytest.mark.parametrize(
    ("document", "needle"),
    [
        ({"models": {"noslash": {}}}, "must be an EXO model id"),
        (
            {"models": {LLAMA: {"minNodes": 0}}},
            "minNodes: 0: Input should be greater than or equal to 1",
        ),
        ({"models": {LLAMA: {"running": "yes"}}}, "running"),
        ({"modelReconciler": {"intervalSec": 0}}, "intervalSec"),
        ({"modelReconciler": {"quarantineDir": "relative"}}, "quarantineDir"),
        (
            {"offline": True, "models": {"acme/x": {"custom": True}}},
            'models."acme/x".custom fetches the model card from Hugging Face, which offline '
            "forbids",
        ),
    ],
)
def test_bad_values_are_one_line_each(document: dict[str, object], needle: str) -> None:
    [line] = problems(document)
    assert needle in line
