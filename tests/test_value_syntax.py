"""The NixOS option types and the config model judge every value alike.

Both read their syntaxes from src/exo_nixos/patterns.json (Nix through
nix/modules/lib/types.nix, Python through exo_nixos.basetypes.check); IP addresses have one
judge only (Python's ipaddress, run on config.json when it is built). Each value below, and a
few hundred random ones, is put to both judges in one nix-instantiate call: a value one accepts
and the other refuses is an evaluation error where the build check would pass (or the reverse).
"""

from __future__ import annotations

import json
import random
import re
from typing import Any

import pytest

from exo_nixos.basetypes import PATTERNS, check
from tests.nixeval import instantiate, nixpkgs_lib, requires_nix, skip_reason

KINDS = sorted(k for k in PATTERNS if not k.startswith("_"))

CASES: dict[str, list[str]] = {
    "absolutePath": [
        "/srv/models",
        "/",
        "/a/b.c-d_e",
        "/srv/my models",
        "/srv/\tx",
        "/srv/x\n",
        "srv",
        "",
        "/srv/\x7f",
        "/srv/ünïcode",
        "//double",
        "/a:b",
        "/models:/more",
    ],
    "memoryLimit": [
        "80%",
        "80 %",
        "48G",
        "48gib",
        "48 G",
        "1.5T",
        "512MiB",
        "80",
        "80B",
        "0.5",
        "12X",
        "-3G",
        "",
        "80%B",
        "1.5",
        "10 K",
        "7tb",
        " 80%",
        "80% ",
        ".5G",
        "5.G",
    ],
    "interfaceName": [
        "eth0",
        "bond0",
        "enp1s0f0np0",
        "a" * 15,
        "a" * 16,
        "",
        ".",
        "..",
        "br.1",
        "a b",
        "a/b",
        "a:b",
        "bond*",
        "wlp\x01",
        "ethé",
        "é" * 8,  # 8 characters, 16 bytes
        "e" * 14 + "é",
    ],
    "k8sName": ["exo", "exo-system", "a" * 63, "a" * 64, "-a", "a-", "Exo", "a.b", ""],
    "url": [
        "http://a",
        "https://k8s.local:6443",
        "https://a/b/c",
        "ftp://a",
        "http://",
        "http://a b",
        "http://a/b c",
        "https://[::1]:6443/",
    ],
    "driverVersion": ["580", "550.54.14", "1.2.3.4", "abc", "", "12345"],
    "computeCapability": ["7.5", "10.0", "7", "7.55", "100.0"],
    "userName": ["exo", "_exo", "Exo-2", "a" * 31, "a" * 32, "2exo", "", "a b", "a:b", "ex.o"],
    "k8sSubdomain": [
        "gpu-01",
        "a.b.c",
        "GPU_01",
        "a" * 253,
        "a" * 254,
        "-a",
        "a.",
        ".a",
        "a..b",
        "",
    ],
    "envName": ["HF_TOKEN", "_x", "a1", "1a", "A=B", "A-B", "", "A B"],
    "publicPath": ["/health", "/metrics", "/v1/models", "/", "/healthz", "/health/", ""],
    "apiKeyName": ["alice", "ci-runner.2_b", "a" * 64, "a" * 65, "", "a:b", "a b", "*", "ünï"],
    "clusterNamespace": ["rack-a", "lab.1", "a" * 64, "a" * 65, "", "a b", "a/b", "a*", "\x01"],
    "deviceId": ["0", "1", "GPU-8a2f7c1e-1234-5678", "MIG-GPU-x/1/0", "", "0,1", "a b"],
    "gfxVersion": ["10.3.0", "9.0.10", "10.3", "100.0.0"],
    "modelId": [
        "mlx-community/Llama-3.2-1B-Instruct-4bit",
        "a/b",
        "Qwen/Qwen3-0.6B",
        "noslash",
        "a/b/c",
        "/a",
        "a/",
        "-a/b",
        "a b/c",
        "a/" + "b" * 96,
        "a/" + "b" * 97,
        "",
    ],
    "netnsName": ["exo", "a.b_c-d", ".", "..", "a/b", "a" * 64, "a" * 65, ""],
}


def python_accepts(kind: str, value: str) -> bool:
    try:
        check(kind, value)
    except ValueError:
        return False
    return True


def nix_accepts(pairs: list[tuple[str, str]]) -> list[bool]:
    lib = nixpkgs_lib()
    assert lib is not None, skip_reason()
    expr = (
        f"let lib = import {lib}/lib; t = import ./nix/modules/lib/types.nix {{ inherit lib; }}; "
        f"in map (p: t.${{builtins.elemAt p 0}}.check (builtins.elemAt p 1)) "
        f"(builtins.fromJSON {json.dumps(json.dumps(pairs))})"
    )
    done = instantiate(expr)
    assert done.returncode == 0, done.stderr
    verdicts: list[bool] = json.loads(done.stdout)
    return verdicts


ALPHABETS: dict[str, str] = {
    "absolutePath": "/ab. \t-_:",
    "memoryLimit": "0123456789.% KMGTkmgtiIbBX",
    "interfaceName": "eth0.:/ *",
    "k8sName": "ab0-.A",
    "url": "htps:/a.b[]1 ",
    "driverVersion": "0123456789.a",
    "computeCapability": "0123456789.",
    "gfxVersion": "0123456789.",
    "netnsName": "ab_.-/ ",
    "userName": "ab_-2:. A",
    "clusterNamespace": "ab-._/ *",
    "deviceId": "G0-:,. ",
    "publicPath": "/healthmetrics",
    "apiKeyName": "ab._-:* ",
    "envName": "AB_=1 -",
    "k8sSubdomain": "ab0-._A",
}


def _mutate(rng: random.Random, value: str, alphabet: str) -> str:
    chars = list(value)
    for _ in range(rng.randint(1, 2)):
        where = rng.randint(0, len(chars))
        action = rng.choice("ids") if chars else "i"
        if action == "i":
            chars.insert(where, rng.choice(alphabet))
        elif where < len(chars):
            if action == "d":
                del chars[where]
            else:
                chars[where] = rng.choice(alphabet)
    return "".join(chars)


def _random_values(seed: int = 42, per_kind: int = 60) -> list[tuple[str, str]]:
    """Values one or two edits away from the listed ones: near the boundary of each syntax."""
    rng = random.Random(seed)
    return [
        (kind, _mutate(rng, rng.choice(CASES[kind]), alphabet))
        for kind, alphabet in ALPHABETS.items()
        for _ in range(per_kind)
    ]


def _null_safe(pairs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return [(k, v) for k, v in pairs if "\0" not in v]  # Nix strings cannot hold NUL


@pytest.mark.nix
@requires_nix
def test_every_kind_has_cases():
    assert set(CASES) == set(KINDS)


@pytest.mark.nix
@requires_nix
def test_option_types_and_config_model_agree_on_listed_values():
    pairs = _null_safe([(kind, value) for kind in KINDS for value in CASES[kind]])
    verdicts = nix_accepts(pairs)
    disagree: list[Any] = [
        (kind, value, nix)
        for (kind, value), nix in zip(pairs, verdicts, strict=True)
        if nix != python_accepts(kind, value)
    ]
    assert disagree == [], disagree


@pytest.mark.nix
@requires_nix
def test_option_types_and_config_model_agree_on_random_values():
    pairs = _null_safe(_random_values())
    verdicts = nix_accepts(pairs)
    disagree = [
        (kind, value, nix)
        for (kind, value), nix in zip(pairs, verdicts, strict=True)
        if nix != python_accepts(kind, value)
    ]
    assert disagree == [], disagree
    # the random values are not all trivially refused (or accepted)
    assert 0.05 < sum(verdicts) / len(verdicts) < 0.95


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("absolutePath", "/srv/my models"),
        ("absolutePath", "/srv/x\n"),
        ("memoryLimit", "80"),
    ],
)
def test_the_defects_values_are_refused(kind: str, value: str):
    assert not python_accepts(kind, value)


def test_pattern_file_uses_only_the_shared_regex_subset():
    for kind in KINDS:
        pattern = PATTERNS[kind]["pattern"]
        assert "[:" not in pattern and "\\d" not in pattern and "\\s" not in pattern, kind
        for bracket in re.findall(r"\[[^\]]*\]", pattern):
            assert "\\" not in bracket, (kind, bracket)
