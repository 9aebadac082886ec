"""The flake without fetching anything: every .nix file parses, flake.lock pins every input,
the outputs have the names the design promises, and the EXO variants are honest.

Evaluations use ``nix-instantiate`` with stand-in inputs (nix/tests/flake-outputs.nix,
nix/tests/variants.nix); building packages and the VM tests run on a forge with network and
KVM (.github/workflows/nix.yml). Set ``EXO_NIXOS_UPSTREAM_GIT`` to a git directory of
github.com/exo-explore/exo to also re-derive flake.lock's EXO pins from upstream.
"""

from __future__ import annotations

import base64
import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import tomllib
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.nixeval import NIX_ENV, REPO, instantiate, nixpkgs_lib, requires_nix, skip_reason

LOCK = json.loads((REPO / "flake.lock").read_text())
UPSTREAM_GIT_ENV = "EXO_NIXOS_UPSTREAM_GIT"

SYSTEMS = {"x86_64-linux", "aarch64-linux", "aarch64-darwin"}
LINUX = {"x86_64-linux", "aarch64-linux"}
SEED_PACKAGES = {
    "exo-python",
    "exo-rust-bindings",
    "exo-dashboard",
    "exo-complete",
    "exo-cuda",
    "exo-rocm",
    "exo-mlx",
}
SEED_MODULES = {"default", "exo-service", "exo-hardware", "exo-networking", "exo-k3s", "exo-api"}
# The EXO commit exo-nixos is written for (zenoh transport, IPv6 multicast discovery, the
# --zenoh-port/--discovery-port/--namespace flags): v1.0.71 + 44 commits.
EXO_REV = "b5375f8cee4368d09e1ce96a56b9f81fb0bc81aa"
EXO_BASE_RELEASE = "1.0.71"
EXO_VERSION = "1.0.71-unstable-2026-06-22"

requires_nix_instantiate = pytest.mark.skipif(
    shutil.which("nix-instantiate") is None,
    reason="nix-instantiate not installed (apt-get install nix-bin)",
)


def nix_files() -> list[Path]:
    return sorted(
        p for p in REPO.rglob("*.nix") if ".venv" not in p.parts and ".git" not in p.parts
    )


def nix_eval(expr: str) -> Any:
    result = instantiate(expr)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def nix_eval_error(expr: str) -> str:
    result = instantiate(expr)
    assert result.returncode != 0, f"expected an evaluation error, got {result.stdout}"
    return result.stderr


def lib_expr() -> str:
    lib = nixpkgs_lib()
    assert lib is not None, skip_reason()
    return f"(import {lib}/lib)"


@pytest.fixture(scope="module")
def outputs() -> dict[str, Any]:
    data: dict[str, Any] = nix_eval(
        f"import ./nix/tests/flake-outputs.nix {{ lib = {lib_expr()}; }}"
    )
    return data


def variants(system: str) -> dict[str, Any]:
    data: dict[str, Any] = nix_eval(
        f'import ./nix/tests/variants.nix {{ lib = {lib_expr()}; system = "{system}"; }}'
    )
    return data


# --- every .nix file parses ---------------------------------------------------------------


def test_the_flake_files_exist():
    names = {str(p.relative_to(REPO)) for p in nix_files()}
    assert {"flake.nix", "nix/overlays/default.nix", "nix/packages/default.nix"} <= names
    assert {f"nix/tests/vm/{t}.nix" for t in ("single-node", "two-node", "k3s")} <= names


@requires_nix_instantiate
@pytest.mark.parametrize("path", nix_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_nix_file_parses(path: Path):
    result = subprocess.run(
        ["nix-instantiate", "--parse", str(path)],
        capture_output=True,
        text=True,
        env=NIX_ENV,
        check=False,
    )
    assert result.returncode == 0, result.stderr


# --- flake.lock -----------------------------------------------------------------------------


@requires_nix_instantiate
def test_every_flake_input_is_locked_at_the_root():
    inputs = nix_eval("builtins.mapAttrs (_: i: i.url) (import ./flake.nix).inputs")
    root = LOCK["nodes"][LOCK["root"]]
    assert set(root["inputs"]) == set(inputs)
    for name, url in inputs.items():
        node = LOCK["nodes"][root["inputs"][name]]
        kind, _, rest = url.partition(":")
        owner, repo, ref = rest.split("/")
        # Nix reads a 40-digit hex third component of a github: URL as a rev, else as a ref.
        pin = "rev" if re.fullmatch(r"[0-9a-f]{40}", ref) else "ref"
        assert node["original"] == {"type": kind, "owner": owner, "repo": repo, pin: ref}


def test_lock_file_version_is_read_by_nix_2_8():
    assert LOCK["version"] == 7
    assert LOCK["root"] == "root"


@pytest.mark.parametrize("key", sorted(k for k in LOCK["nodes"] if k != LOCK["root"]))
def test_lock_node_is_pinned(key: str):
    node = LOCK["nodes"][key]
    locked = node["locked"]
    assert locked["type"] == "github"
    assert re.fullmatch(r"[0-9a-f]{40}", locked["rev"]), locked
    assert re.fullmatch(r"sha256-[A-Za-z0-9+/]{43}=", locked["narHash"]), locked
    assert len(base64.b64decode(locked["narHash"].removeprefix("sha256-"))) == 32
    assert isinstance(locked["lastModified"], int) and locked["lastModified"] > 1_500_000_000
    assert locked["owner"] == node["original"]["owner"]
    assert locked["repo"] == node["original"]["repo"]


def resolve(path: list[str]) -> str:
    """The node a `follows` path (absolute from the root, as in lock version 7) names."""
    key = str(LOCK["root"])
    for name in path:
        ref = LOCK["nodes"][key]["inputs"][name]
        key = resolve(ref) if isinstance(ref, list) else str(ref)
    return key


def test_every_lock_reference_resolves_and_every_node_is_used():
    reached = {LOCK["root"]}
    pending = [LOCK["root"]]
    while pending:
        node = LOCK["nodes"][pending.pop()]
        for ref in node.get("inputs", {}).values():
            key = resolve(ref) if isinstance(ref, list) else ref
            assert key in LOCK["nodes"], ref
            if key not in reached:
                reached.add(key)
                pending.append(key)
    assert reached == set(LOCK["nodes"])


def test_exo_is_pinned_to_the_commit_the_tool_is_written_for():
    exo = LOCK["nodes"][LOCK["nodes"]["root"]["inputs"]["exo"]]
    # flake.nix names the commit itself, not a moving tag or branch.
    assert exo["original"] == {
        "type": "github",
        "owner": "exo-explore",
        "repo": "exo",
        "rev": EXO_REV,
    }
    assert exo["locked"]["rev"] == EXO_REV
    # `git archive` of the commit, hashed with `nix hash path` (re-derived below when
    # EXO_NIXOS_UPSTREAM_GIT is set).
    assert exo["locked"]["narHash"] == "sha256-eftfZkz97NE5V9y89nz+B7cVJRh/kTfIt+AKMlIwARA="


def test_package_version_names_the_release_and_the_pinned_commit_date():
    exo = LOCK["nodes"][LOCK["nodes"]["root"]["inputs"]["exo"]]
    day = datetime.fromtimestamp(exo["locked"]["lastModified"], tz=UTC).strftime("%Y-%m-%d")
    assert f"{EXO_BASE_RELEASE}-unstable-{day}" == EXO_VERSION
    packages = (REPO / "nix/packages/default.nix").read_text()
    assert re.findall(r'^  version = "([^"]*)";', packages, flags=re.MULTILINE) == [EXO_VERSION]


def test_our_nixpkgs_is_upstream_exos_nixpkgs():
    root = LOCK["nodes"]["root"]["inputs"]
    ours = LOCK["nodes"][root["nixpkgs"]]
    theirs = LOCK["nodes"][LOCK["nodes"][root["exo"]]["inputs"]["nixpkgs"]]
    assert ours == theirs
    assert ours["original"]["ref"] == "nixos-25.11"


def nix_store_usable() -> bool:
    """`nix flake metadata` copies the flake into the store: a writable one or a daemon."""
    store = Path(os.environ.get("NIX_STORE_DIR", "/nix/store"))
    daemon = Path("/nix/var/nix/daemon-socket/socket")
    return shutil.which("nix") is not None and (os.access(store.parent, os.W_OK) or daemon.exists())


@pytest.mark.skipif(
    not nix_store_usable(),
    reason="nix not installed, or no writable Nix store and no nix-daemon (run as root)",
)
def test_nix_reads_the_lock_as_current_without_network(tmp_path: Path):
    # `--no-update-lock-file` fails if the lock misses an input or disagrees with flake.nix;
    # Nix then writes its own serialization of the lock graph, which must equal ours.
    for name in ("flake.nix", "flake.lock"):
        shutil.copy(REPO / name, tmp_path / name)
    result = subprocess.run(
        [
            "nix",
            "flake",
            "metadata",
            f"path:{tmp_path}",
            "--offline",
            "--no-update-lock-file",
            "--no-write-lock-file",
            "--json",
        ],
        capture_output=True,
        text=True,
        env=dict(
            os.environ,
            NIX_CONFIG="experimental-features = nix-command flakes\nsubstituters =",
        ),
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["locks"] == LOCK


def upstream_git() -> Path | None:
    value = os.environ.get(UPSTREAM_GIT_ENV)
    return Path(value) if value and Path(value).is_dir() else None


def git(*args: str) -> bytes:
    git_dir = upstream_git()
    assert git_dir is not None
    return subprocess.run(
        ["git", f"--git-dir={git_dir}", *args], capture_output=True, check=True
    ).stdout


requires_upstream = pytest.mark.skipif(
    upstream_git() is None or shutil.which("nix") is None,
    reason=f"{UPSTREAM_GIT_ENV} (a git dir of exo-explore/exo) or nix not available",
)


@pytest.mark.upstream
@requires_upstream
def test_exo_pin_rederived_from_upstream():
    exo = LOCK["nodes"]["exo"]["locked"]
    assert git("rev-parse", f"{exo['rev']}^{{commit}}").decode().strip() == exo["rev"]
    # The version's release part is the newest tag the commit contains.
    described = git("describe", "--tags", "--abbrev=0", exo["rev"]).decode().strip()
    assert described == f"v{EXO_BASE_RELEASE}"
    assert int(git("log", "-1", "--format=%ct", exo["rev"])) == exo["lastModified"]
    # A GitHub tarball holds what `git archive` exports unless .gitattributes says otherwise,
    # and holds no submodule contents.
    entries = git("ls-tree", "-r", exo["rev"]).decode().splitlines()
    assert not [e for e in entries if e.split("\t", 1)[1].endswith(".gitattributes")]
    assert not [e for e in entries if e.startswith("160000 ")]
    with tempfile.TemporaryDirectory() as tmp:
        with tarfile.open(fileobj=io.BytesIO(git("archive", exo["rev"]))) as archive:
            archive.extractall(tmp, filter="tar")
        result = subprocess.run(
            ["nix", "hash", "path", tmp],
            capture_output=True,
            text=True,
            check=True,
            env=dict(os.environ, NIX_CONFIG="experimental-features = nix-command"),
        )
    assert result.stdout.strip() == exo["narHash"]


@pytest.mark.upstream
@requires_upstream
def test_exo_dependencies_are_upstreams_own_pins():
    upstream = json.loads(git("show", f"{LOCK['nodes']['exo']['locked']['rev']}:flake.lock"))

    def rebased(node: dict[str, Any]) -> dict[str, Any]:
        # A dependency's follows paths start at its own root; in our lock, at ours (via exo).
        if "inputs" not in node:
            return node
        inputs = {k: ["exo", *v] if isinstance(v, list) else v for k, v in node["inputs"].items()}
        return {**node, "inputs": inputs}

    assert LOCK["nodes"]["exo"]["inputs"] == rebased(upstream["nodes"]["root"])["inputs"]
    for key, node in upstream["nodes"].items():
        if key != "root":
            assert LOCK["nodes"][key] == rebased(node), key


# --- outputs --------------------------------------------------------------------------------


@pytest.mark.nix
@requires_nix
def test_outputs_and_their_systems(outputs):
    assert set(outputs["outputs"]) == {
        "packages",
        "overlays",
        "nixosModules",
        "checks",
        "devShells",
        "formatter",
        "apps",
    }
    for output in ("packages", "checks", "devShells", "apps"):
        assert set(outputs[output]) == SYSTEMS, output
    assert set(outputs["formatter"]) == SYSTEMS


@pytest.mark.nix
@requires_nix
def test_packages_carry_the_seed_names(outputs):
    for system, names in outputs["packages"].items():
        expected = SEED_PACKAGES - ({"exo-mlx"} if system in LINUX else {"exo-cuda", "exo-rocm"})
        assert expected <= set(names), system
        assert {"default", "exo-nixos"} <= set(names)
    # MLX with Metal exists on Apple silicon only; CUDA and the ROCm-named CPU build on Linux only.
    assert "exo-mlx" not in outputs["packages"]["x86_64-linux"]
    assert "exo-cuda" not in outputs["packages"]["aarch64-darwin"]
    assert "exo-rocm" not in outputs["packages"]["aarch64-darwin"]


@pytest.mark.nix
@requires_nix
def test_overlays_and_modules(outputs):
    assert set(outputs["overlays"]) == {"default", "python-overrides", "rust-overrides"}
    assert set(outputs["nixosModules"]) == SEED_MODULES


@pytest.mark.parametrize("name", ["default", "python-overrides", "rust-overrides"])
def test_overlay_first_argument_is_named_final(name: str):
    # `nix flake check` rejects an overlay whose first argument is not called `final`.
    text = (REPO / "nix/overlays" / f"{name}.nix").read_text()
    body = re.sub(r"^\s*#.*$", "", text, flags=re.MULTILINE)
    assert re.match(r"\s*(\{ exo \}:\s*)?final: \w+:", body), body[:80]


@pytest.mark.nix
@requires_nix
def test_checks_include_module_eval_and_vm_tests_on_linux(outputs):
    vm_tests = {f"vm-{test}" for test in VM_TESTS}
    for system, names in outputs["checks"].items():
        assert {"module-eval", "exo-nixos"} <= set(names)
        assert (vm_tests <= set(names)) == (system in LINUX), system


@pytest.mark.nix
@requires_nix
def test_apps_and_dev_shell(outputs):
    for system in SYSTEMS:
        assert outputs["devShells"][system] == ["default"]
        assert {"default", "exo-nixos"} <= set(outputs["apps"][system])
        stub = outputs["appPrograms"][system]["default"]
        assert stub.startswith("/nix/store/"), stub
        assert f"exo-complete-{system}" in stub


@pytest.mark.nix
@requires_nix
def test_every_module_defaults_to_this_flakes_packages(outputs):
    complete = outputs["stubPackages"]["exo-complete"]
    for name, document in outputs["modules"].items():
        assert document["hardware"]["packages"] == {"cpu": complete}, name
    # Importing several of the flake's modules merges the package defaults once (a second
    # copy of the glue would define services.exo.package twice and fail evaluation).
    assert outputs["combined"].count("exo-nixos-x86_64-linux") == 1


@pytest.mark.nix
@requires_nix
def test_nix_config_names_the_exo_cache(outputs):
    config = outputs["nixConfig"]
    substituters = config["extra-substituters"].split()
    keys = config["extra-trusted-public-keys"].split()
    assert "https://exo.cachix.org" in substituters
    assert len(keys) == len(substituters)
    for url in substituters:
        host = url.removeprefix("https://")
        assert any(k.startswith(host) for k in keys), host


# --- variants -------------------------------------------------------------------------------


@pytest.mark.nix
@requires_nix
@pytest.mark.parametrize("system", sorted(SYSTEMS))
def test_overlay_names_match_platforms(system: str):
    data = variants(system)
    assert sorted(data["available"]) == sorted(data["expectedHere"])
    assert set(data["names"]) >= SEED_PACKAGES


@pytest.mark.nix
@requires_nix
def test_exo_rocm_is_an_honest_cpu_build():
    rocm = variants("x86_64-linux")["packages"]["exo-rocm"]
    assert rocm["accelerator"] == "cpu"
    assert rocm["requestedAccelerator"] == "rocm"
    assert rocm["wraps"] == "exo"  # upstream's CPU build, nothing ROCm about it
    assert "cpu" in rocm["pname"]
    assert "no ROCm backend" in rocm["note"]
    assert "CPU" in rocm["description"]


@pytest.mark.nix
@requires_nix
def test_accelerated_variants_wrap_the_matching_upstream_build():
    linux = variants("x86_64-linux")["packages"]
    assert (linux["exo-complete"]["accelerator"], linux["exo-complete"]["wraps"]) == ("cpu", "exo")
    assert (linux["exo-cuda"]["accelerator"], linux["exo-cuda"]["wraps"]) == (
        "cuda",
        "exo-cuda-13",
    )
    assert "exo-cuda-12" not in linux  # upstream no longer exports it
    # what MLX's CUDA 13 build needs; the module's cudaMinimum* defaults come from here
    assert linux["exo-cuda"]["requirements"] == {"nvidiaDriver": "580", "computeCapability": "7.5"}
    assert linux["exo-complete"]["requirements"] == {}
    # upstream's package names at the pinned commit
    assert linux["exo-python"] == {"name": "exo"}
    assert linux["exo-rust-bindings"] == {"name": "exo-rs"}
    assert linux["exo-dashboard"] == {"name": "dashboard"}
    darwin = variants("aarch64-darwin")["packages"]
    assert (darwin["exo-mlx"]["accelerator"], darwin["exo-mlx"]["wraps"]) == ("mlx", "exo")
    for variant in (*linux.values(), *darwin.values()):
        if "accelerator" in variant:
            assert variant["version"] == EXO_VERSION
            assert variant["resources"].endswith("-source/resources")
            assert variant["dashboard"] == "dashboard"
            assert variant["note"] is None or variant["requestedAccelerator"] == "rocm"


@pytest.mark.nix
@requires_nix
@pytest.mark.parametrize(
    ("system", "name", "reason"),
    [
        ("x86_64-linux", "exo-mlx", "Apple-silicon (Metal) build"),
        ("aarch64-darwin", "exo-cuda", "CUDA backend for Linux only"),
        ("aarch64-darwin", "exo-rocm", "no ROCm backend"),
        ("x86_64-linux", "exo-cuda-12", "stopped building its CUDA 12 variant"),
        ("aarch64-linux", "exo-cuda-12", "use exo-cuda (CUDA 13"),
    ],
)
def test_unavailable_variant_fails_evaluation_with_its_reason(system: str, name: str, reason: str):
    lib = lib_expr()
    error = nix_eval_error(
        f"let lib = {lib}; final = {{ inherit lib; stdenv.hostPlatform.system = "
        f'"{system}"; }}; in (import ./nix/packages {{ exo = {{ }}; }} final {{ }}).{name}'
    )
    assert f"{name} is not available on {system}" in error
    assert reason in error


@pytest.mark.nix
@requires_nix
@pytest.mark.parametrize(
    ("name", "missing"),
    [("exo-python", "exo"), ("exo-cuda", "exo-cuda-13"), ("exo-dashboard", "dashboard")],
)
def test_a_build_the_pinned_exo_lacks_fails_evaluation_naming_it(name: str, missing: str):
    # Upstream renames and drops package outputs between commits (exo_pyo3_bindings became
    # exo-rs, exo-cuda-12 was commented out); a re-pin that loses one says which.
    lib = lib_expr()
    error = nix_eval_error(
        f'let lib = {lib}; exo = {{ outPath = "/x"; packages.x86_64-linux = {{ }}; }}; '
        'final = { inherit lib; stdenv.hostPlatform.system = "x86_64-linux"; '
        "callPackage = _: args: builtins.seq args.exo args; }; "
        f"in (import ./nix/packages {{ inherit exo; }} final {{ }}).{name}"
    )
    expected = f"upstream EXO {EXO_VERSION} (flake.lock) exports no packages.x86_64-linux.{missing}"
    assert expected in error


@pytest.mark.nix
@requires_nix
def test_rust_bindings_are_upstreams_exo_rs():
    lib = lib_expr()
    wheel = nix_eval(
        f'let lib = {lib}; exo = {{ packages.aarch64-linux.exo-rs = "wheel"; }}; '
        'final = { inherit lib; stdenv.hostPlatform.system = "aarch64-linux"; }; '
        "in (import ./nix/overlays/rust-overrides.nix { inherit exo; } final { }).exo-rs"
    )
    assert wheel == "wheel"
    error = nix_eval_error(
        f"let lib = {lib}; exo = {{ packages.aarch64-linux = {{ }}; }}; "
        'final = { inherit lib; stdenv.hostPlatform.system = "aarch64-linux"; }; '
        "in (import ./nix/overlays/rust-overrides.nix { inherit exo; } final { }).exo-rs"
    )
    assert "exports no packages.aarch64-linux.exo-rs" in error


# --- the exo-nixos package ------------------------------------------------------------------


def pyproject_dependency_names() -> list[str]:
    deps = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    names = []
    for dep in deps:
        match = re.match(r"[A-Za-z0-9_.-]+", dep)
        assert match, dep
        names.append(match.group(0).lower())
    return names


def exo_nixos_args(available: list[str]) -> str:
    lib = lib_expr()
    packages = " ".join(f'"{n}" = "pkg:{n}";' for n in available)
    return (
        f"import ./nix/packages/exo-nixos.nix {{ lib = {lib}; "
        f'python = {{ pname = "python3"; }}; pythonPackages = {{ {packages} }}; '
        f'setuptools = "pkg:setuptools"; buildPythonPackage = args: args; }}'
    )


@pytest.mark.nix
@requires_nix
def test_exo_nixos_package_takes_its_dependencies_from_pyproject():
    names = pyproject_dependency_names()
    args = nix_eval(
        f"let a = {exo_nixos_args(names)}; in "
        "{ inherit (a) pname version pythonImportsCheck dependencies; "
        "inherit (a.meta) mainProgram; build = a.build-system; }"
    )
    assert args["dependencies"] == [f"pkg:{n}" for n in names]
    assert args["build"] == ["pkg:setuptools"]
    assert args["mainProgram"] == "exo-nixos"
    assert "exo_nixos.cli" in args["pythonImportsCheck"]


@pytest.mark.nix
@requires_nix
def test_exo_nixos_package_names_a_missing_dependency():
    names = pyproject_dependency_names()
    error = nix_eval_error(f"({exo_nixos_args(names[1:])}).dependencies")
    assert names[0] in error
    assert "nix/overlays/python-overrides.nix" in error


# --- the VM tests: their nodes evaluate, their scripts are valid ---------------------------

VM_TESTS = ["single-node", "two-node", "k3s", "netns"]
# Warnings a VM test's node knowingly gets (prefixes); any other warning fails the test.
VM_WARNINGS = {
    ("k3s", "server"): ["services.exo.k3s: the exo-api Service points at EXO's own API port"],
}


@functools.cache
def vm_test(test: str) -> dict[str, Any]:
    """nix/tests/vm-nodes.nix's evaluation of one VM test: its nodes and rendered script."""
    data: dict[str, Any] = nix_eval(
        f'(import ./nix/tests/vm-nodes.nix {{ lib = {lib_expr()}; }})."{test}"'
    )
    return data


@pytest.fixture(scope="module")
def vm_scripts() -> dict[str, Any]:
    return {test: vm_test(test) for test in VM_TESTS}


@pytest.mark.nix
@requires_nix
@pytest.mark.parametrize("test", VM_TESTS)
def test_vm_test_nodes_evaluate_as_run_nixos_test_merges_them(test: str):
    nodes = vm_test(test)["nodes"]
    assert nodes
    for name, node in nodes.items():
        assert node["assertions"] == [], (name, node["assertions"])
        expected = VM_WARNINGS.get((test, name), [])
        assert len(node["warnings"]) == len(expected), (name, node["warnings"])
        for warning, prefix in zip(node["warnings"], expected, strict=True):
            assert warning.startswith(prefix), (name, warning)
        assert node["hostName"] == name
        assert node["virtualisation"]["memorySize"] >= 4096  # EXO's Python stack
        assert "exo" in node["targets"]  # exo.target


@pytest.mark.nix
@requires_nix
def test_vm_test_node_sizes_are_defaults_a_test_can_raise():
    """common.nix's sizes are defaults: k3s.nix raises them without a conflict."""
    assert vm_test("k3s")["nodes"]["server"]["virtualisation"]["memorySize"] == 6144
    assert vm_test("single-node")["nodes"]["machine"]["virtualisation"]["memorySize"] == 4096
    two = vm_test("two-node")["nodes"]
    assert [two[n]["primaryIPAddress"] for n in ("alpha", "beta")] == [
        "192.168.1.1",
        "192.168.1.2",
    ]


@pytest.mark.nix
@requires_nix
def test_vm_node_with_conflicting_sizes_fails_to_evaluate():
    """The driver stub is as strict as qemu-vm.nix: two sizes at one priority conflict."""
    error = nix_eval_error(
        f"(import ./nix/tests/evaluate.nix {{ lib = {lib_expr()}; modules = [ "
        "./nix/tests/vm-driver.nix { virtualisation.memorySize = 4096; } "
        "{ virtualisation.memorySize = 6144; } ]; }).config.virtualisation.memorySize"
    )
    assert "conflicting definition values" in error


@pytest.mark.nix
@requires_nix
@pytest.mark.parametrize("test", VM_TESTS)
def test_vm_test_script_is_valid_python(vm_scripts, test: str):
    rendered = vm_scripts[test]
    compile(rendered["script"], f"{test}.py", "exec")
    # pyflakes' checks (ruff F), minus undefined names: the driver defines the machines,
    # start_all and friends.
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run(
        [
            ruff,
            "check",
            "--isolated",
            "--select",
            "F",
            "--ignore",
            "F821",
            "--stdin-filename",
            f"{test}.py",
            "-",
        ],
        input=rendered["script"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    for node in rendered["nodes"]:  # every VM is driven by the script
        assert re.search(rf"\b{node}\b", rendered["script"]), node


@pytest.mark.nix
@requires_nix
def test_vm_tests_check_what_the_issue_asks(vm_scripts):
    single = vm_scripts["single-node"]["script"]
    assert 'wait_for_unit("exo-worker.service"' in single
    assert "/node_id" in single
    two = vm_scripts["two-node"]
    assert sorted(two["nodes"]) == ["alpha", "beta"]
    assert ".topology.nodes | any(. == $id)" in two["script"]
    k3s = vm_scripts["k3s"]["script"]
    assert "endpointslices" in k3s
    assert "kubernetes.io/service-name=exo-api" in k3s


# --- the forge workflow ---------------------------------------------------------------------


@pytest.mark.nix
@requires_nix
def test_binary_caches_are_the_same_in_the_module_the_flake_and_ci():
    caches = nix_eval("import ./nix/caches.nix")
    config = nix_eval("(import ./flake.nix).nixConfig")
    assert config["extra-substituters"].split() == caches["substituters"]
    assert config["extra-trusted-public-keys"].split() == caches["trusted-public-keys"]
    workflow = yaml.safe_load((REPO / ".github/workflows/nix.yml").read_text())
    settings = dict(
        line.split(" = ", 1) for line in workflow["env"]["NIX_CACHE_CONFIG"].strip().splitlines()
    )
    assert settings["extra-substituters"].split() == caches["substituters"]
    assert settings["extra-trusted-public-keys"].split() == caches["trusted-public-keys"]
    readme = (REPO / "README.md").read_text()
    assert f'extra-substituters "{" ".join(caches["substituters"])}"' in readme
    assert f'extra-trusted-public-keys "{" ".join(caches["trusted-public-keys"])}"' in readme
    # each key names its cache's host
    for url, key in zip(caches["substituters"], caches["trusted-public-keys"], strict=True):
        assert key.split(":")[0].removesuffix("-1") == url.removeprefix("https://")


def test_workflow_runs_flake_check_with_kvm():
    workflow = yaml.safe_load((REPO / ".github/workflows/nix.yml").read_text())
    check = next(
        job
        for job in workflow["jobs"].values()
        if any(s.get("run", "").startswith("nix flake check -L") for s in job["steps"])
    )
    nix_config = "".join(s.get("with", {}).get("extra_nix_config", "") for s in check["steps"])
    features = re.search(r"system-features = (.*)", nix_config)
    assert features and {"kvm", "nixos-test"} <= set(features.group(1).split())
    assert any("/dev/kvm" in s.get("run", "") or "kvm" in s.get("name", "") for s in check["steps"])
    assert "exo.cachix.org" in json.dumps(workflow)
    runs = "\n".join(s.get("run", "") for j in workflow["jobs"].values() for s in j["steps"])
    assert "nix flake check --no-build --all-systems" in runs


def test_workflow_builds_natively_on_aarch64_linux():
    workflow = yaml.safe_load((REPO / ".github/workflows/nix.yml").read_text())
    arm = [j for j in workflow["jobs"].values() if str(j["runs-on"]).endswith("-arm")]
    assert len(arm) == 1
    runs = "\n".join(s.get("run", "") for s in arm[0]["steps"])
    assert ".#packages.aarch64-linux.exo-complete" in runs
    assert ".#packages.aarch64-linux.exo-nixos" in runs
    assert ".#checks.aarch64-linux.module-eval" in runs
    assert "vm-" not in runs  # the VM tests need KVM: x86_64-linux only
    assert "exo.cachix.org" in json.dumps(workflow["env"])
